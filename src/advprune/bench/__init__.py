"""The benchmark platform (the Adversarial Pruning Benchmark, reliable and offline).

- :mod:`~advprune.bench.keys`: model keys ``{method}_{arch}_{dataset}_{US|S}_{sparsity}``;
- :mod:`~advprune.bench.taxonomy`: the benchmark's taxonomy as typed data;
- :mod:`~advprune.bench.reference`: the benchmark's reported leaderboard as data;
- :mod:`~advprune.bench.store`: the SQLite results store;
- :mod:`~advprune.bench.leaderboard`: Markdown and offline HTML leaderboards;
- :mod:`~advprune.bench.zoo`: hashed checkpoints by model key;
- :mod:`~advprune.bench.importers`: HYDRA / HARP / dense reference checkpoints;
- :mod:`~advprune.bench.contribute`: ``benchmark()``, the contribution flow;
- :mod:`~advprune.bench.grid`: grid runs (``advprune bench run GRID.yaml``).

The names below are imported lazily, so the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_key": "keys",
    "parse_key": "keys",
    "ModelKey": "keys",
    "load_taxonomy": "taxonomy",
    "taxonomy_entry": "taxonomy",
    "filter_taxonomy": "taxonomy",
    "reference_results": "reference",
    "ResultsStore": "store",
    "protocol_of": "store",
    "leaderboard": "leaderboard",
    "load_model": "zoo",
    "import_checkpoint": "importers",
    "benchmark": "contribute",
    "run_grid": "executors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
