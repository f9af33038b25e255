"""Security curves: robust accuracy as a function of eps, from minimum-norm distances.

A sample is robust at eps iff its distance is larger than eps; distances are 0 where the clean
prediction is already wrong and ``inf`` where the attack found no adversarial example, so the
curve starts at the clean accuracy (eps 0) and never increases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advprune.errors import ConfigError
from advprune.plotting import finish_accuracy_plot, save_figure

__all__ = [
    "default_eps_grid",
    "plot_security_curve",
    "robust_accuracy_at",
    "save_figure",
    "security_curve",
]


def _distances(distances: Any) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ConfigError("no distances: the evaluation set is empty")
    if np.isnan(d).any() or (d < 0).any():
        raise ConfigError("distances must be >= 0 (0: clean error, inf: attack failed), not nan")
    return d


def robust_accuracy_at(distances: Any, eps: float) -> float:
    """Fraction of samples whose distance is larger than ``eps``."""
    return float((_distances(distances) > eps).mean())


def security_curve(distances: Any, eps_grid: Sequence[float] | np.ndarray) -> np.ndarray:
    """Robust accuracy at each eps of ``eps_grid`` (any order): ``mean(distance > eps)``."""
    d = np.sort(_distances(distances))
    grid = np.asarray(eps_grid, dtype=np.float64).reshape(-1)
    # number of distances <= eps, by binary search: O((n + m) log n)
    broken = np.searchsorted(d, grid, side="right")
    return (d.size - broken) / d.size


def default_eps_grid(eps: float, points: int = 101, span: float = 2.0) -> np.ndarray:
    """``points`` values evenly spaced on ``[0, span * eps]``, with ``eps`` itself included
    exactly (so the curve can be read at the nominal eps without interpolation)."""
    if eps <= 0:
        raise ConfigError(f"eps must be > 0 for a curve grid, got {eps}")
    grid = np.linspace(0.0, span * eps, points)
    return np.unique(np.append(grid, eps))


def _curve_of(item: Any, eps_grid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(eps, accuracy, reliable) of a Report, a per-sample mapping or an array of distances."""
    from advprune.evaluation.report import Report

    if isinstance(item, Report):
        if item.curve is None:
            raise ConfigError("the report has no security curve (no minimum-norm attack ran)")
        if eps_grid is not None and item.samples is not None:
            key = f"distance_{item.curve['attack']}"
            return eps_grid, security_curve(item.samples[key], eps_grid), item.reliable
        return (
            np.asarray(item.curve["eps"]),
            np.asarray(item.curve["robust_accuracy"]),
            (item.reliable),
        )
    if eps_grid is None:
        raise ConfigError("pass eps_grid (or eps) to plot distances")
    return eps_grid, security_curve(item, eps_grid), True


def plot_security_curve(
    results: Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    eps: float | None = None,
    eps_grid: Sequence[float] | np.ndarray | None = None,
    norm: str | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """Plot robust accuracy versus eps for several models on one figure.

    Args:
        results: one item per model: a :class:`~advprune.evaluation.Report` (its curve) or an
            array of minimum-norm distances.
        names: legend labels, one per item (default ``model 1``, ``model 2``...). Unreliable
            reports are labelled ``(UNRELIABLE)``.
        eps: the nominal eps, drawn as a dashed vertical line (default: the first report's).
        eps_grid: where to evaluate distances (default: 0 to 2·eps, 101 points).
        norm: axis label (default: the first report's).
        path: if given, the figure is saved as ``path`` with suffix ``.png`` and ``.svg``.
        title: figure title.

    Returns:
        The matplotlib figure (not shown; PNG rendered by Agg).
    """
    # a bare Figure (no pyplot): rendered by Agg (PNG) and the SVG backend, no window, and the
    # user's global matplotlib backend is left alone
    from matplotlib.figure import Figure

    from advprune.evaluation.report import Report

    items = list(results)
    if not items:
        raise ConfigError("nothing to plot: pass at least one report or distance array")
    labels = list(names) if names is not None else [f"model {i + 1}" for i in range(len(items))]
    if len(labels) != len(items):
        raise ConfigError(f"{len(labels)} names for {len(items)} results")
    first = next((r for r in items if isinstance(r, Report)), None)
    if eps is None and first is not None:
        eps = first.eps_value
    if norm is None and first is not None:
        norm = first.norm
    grid = None
    if eps_grid is not None:
        grid = np.asarray(eps_grid, dtype=np.float64)
    elif eps is not None and any(not isinstance(r, Report) for r in items):
        grid = default_eps_grid(eps)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for item, label in zip(items, labels):
        xs, ys, reliable = _curve_of(item, grid)
        ax.plot(xs, 100 * np.asarray(ys), label=label if reliable else f"{label} (UNRELIABLE)")
    if eps is not None:
        ax.axvline(eps, linestyle="--", color="gray", linewidth=1, label=f"eps = {eps:.4g}")
    return finish_accuracy_plot(
        fig, ax, f"eps ({norm})" if norm else "eps", "robust accuracy (%)", title, path
    )
