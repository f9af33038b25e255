"""Plot helpers shared by the evaluation (security curves) and certification (certified
accuracy): accuracy-versus-radius styling and atomic PNG + SVG files. matplotlib is imported
by the callers that draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advprune.io import atomic_path

__all__ = ["finish_accuracy_plot", "save_figure"]


def finish_accuracy_plot(
    fig: Any, ax: Any, xlabel: str, ylabel: str, title: str | None, path: str | Path | None
) -> Any:
    """Label and style an accuracy-versus-radius plot (0-100 %, from 0), save it as PNG + SVG
    when ``path`` is given, and return the figure (security and certified-accuracy curves)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Any, path: str | Path) -> list[Path]:
    """Save a matplotlib figure as ``path`` with suffixes ``.png`` (150 dpi) and ``.svg``,
    each written atomically; returns the two paths."""
    base = Path(path).with_suffix("")
    written = []
    for suffix in (".png", ".svg"):
        target = base.with_suffix(suffix)
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            fig.savefig(fh, format=suffix[1:], dpi=150)
        written.append(target)
    return written
