"""Benchmark commands of the ``advprune`` CLI (``taxonomy``, ``bench ...``, ``leaderboard``,
``import``, ``zoo``, ``benchmark``).

Each module here defines ``register(sub, bench)``: ``sub`` is the top-level subparsers object,
``bench`` the subparsers of ``advprune bench``. A parser sets ``func=`` (a function of the
parsed ``argparse.Namespace`` returning the exit status) with ``set_defaults``. Modules are
found automatically; keep their imports light (import heavy modules inside the functions).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

__all__ = ["register_all"]


def register_all(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Let every command module of this package add its parsers."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub, bench)
