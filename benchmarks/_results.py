"""Shared by the benchmark scripts: print a results page and write it atomically."""

from __future__ import annotations

from pathlib import Path


def write_results(lines: list[str], out: str | Path) -> None:
    """Print ``lines`` (a Markdown page) and write them to ``out``."""
    from advprune.io import atomic_path

    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    print(f"wrote {out}")
