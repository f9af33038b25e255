"""The Adversarial Pruning Benchmark's own leaderboard as data (``reference_leaderboard.yaml``).

These figures are REPORTED by the benchmark (clean / robust accuracy in percent on CIFAR-10
and SVHN, ResNet-18 and VGG-16, unstructured and structured pruning); advprune did not measure
them. Leaderboards show them beside local results, always marked as reported, with
:data:`REFERENCE_SOURCE`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from advprune.errors import ConfigError

__all__ = ["REFERENCE_NOTE", "REFERENCE_SOURCE", "ReferenceResult", "reference_results"]


@dataclass(frozen=True)
class ReferenceResult:
    """One reported cell of the benchmark's leaderboard."""

    name: str
    ap_key: str
    url: str
    dataset: str
    structure: str
    arch: str
    sparsity: str
    clean: float
    robust: float
    bold: bool = False

    @property
    def key(self) -> str:
        """The model key of this cell (``HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90``)."""
        from advprune.bench.keys import make_key

        return make_key(self.ap_key, self.arch, self.dataset, self.structure, self.sparsity)


@functools.cache
def _load() -> tuple[str, str, tuple[ReferenceResult, ...]]:
    import yaml

    from advprune.bench.taxonomy import taxonomy_entry

    text = (resources.files("advprune.bench") / "data" / "reference_leaderboard.yaml").read_text(
        "utf-8"
    )
    data = yaml.safe_load(text)
    rows = []
    for table in data["tables"]:
        for method in table["methods"]:
            entry = taxonomy_entry(method["name"])  # every row is a taxonomy method
            for column, cell in (method.get("cells") or {}).items():
                if column not in table["columns"]:
                    raise ConfigError(f"reference leaderboard: unknown column {column!r}")
                arch, sparsity = column.split()
                rows.append(
                    ReferenceResult(
                        name=method["name"],
                        ap_key=entry.ap_key,
                        url=method["url"],
                        dataset=table["dataset"],
                        structure=table["structure"],
                        arch=arch,
                        sparsity=sparsity,
                        clean=float(cell["clean"]),
                        robust=float(cell["robust"]),
                        bold=bool(cell.get("bold", False)),
                    )
                )
    return data["source"], data["note"], tuple(rows)


REFERENCE_SOURCE, REFERENCE_NOTE, _ROWS = _load()


def reference_results(
    dataset: str | None = None, structure: str | None = None
) -> list[ReferenceResult]:
    """The reported cells, optionally of one dataset (``CIFAR10``) and structure (``US``)."""
    return [
        r
        for r in _ROWS
        if (dataset is None or r.dataset == dataset)
        and (structure is None or r.structure == structure)
    ]
