"""The Adversarial Pruning Benchmark's taxonomy as typed data (``data/taxonomy.yaml``).

Every method of the benchmark's taxonomy tables is one :class:`TaxonomyEntry`: its pipeline
(A ``after`` / B ``before`` / D ``during`` training) with that pipeline's own fields
(A: pretraining, finetuning, schedule; B: pruning step, training step, schedule; D: training
step), and the pruning specifics: structures (``S`` / ``US``), scopes (``L`` / ``G``) and the
criterion, all as the legend's codes (:func:`legend` expands them). advprune's own methods that
the benchmark does not list carry ``source: advprune``. Each advprune method declares its entry
through ``Method.taxonomy.ap_key``; the tests check the declaration against this data.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from advprune._validation import first_validation_error
from advprune.errors import ConfigError, UnknownNameError
from advprune.methods.taxonomy import CODES, PIPELINE_FIELDS, check_classification

__all__ = [
    "PIPELINE_FIELDS",
    "TaxonomyEntry",
    "check_classification",
    "filter_taxonomy",
    "legend",
    "load_taxonomy",
    "method_ap_key",
    "taxonomy_entry",
]

FILTERS = {
    "pipeline": set(PIPELINE_FIELDS),
    "structure": CODES["structures"],
    "scope": CODES["scopes"] - {"n.s."},
    "schedule": CODES["schedule"] - {"n.s."},
    "criterion": CODES["criterion"],
}


class TaxonomyEntry(BaseModel):
    """One method of the taxonomy; the fields not of its pipeline are ``None``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    ap_key: str
    url: str
    source: Literal["APB", "advprune"]
    pipeline: Literal["after", "before", "during"]
    pretraining: tuple[str, ...] | None = None
    finetuning: tuple[str, ...] | None = None
    pruning_step: tuple[str, ...] | None = None
    training_step: tuple[str, ...] | None = None
    schedule: tuple[str, ...] | None = None
    structures: tuple[str, ...]
    scopes: tuple[str, ...]
    criterion: str

    @model_validator(mode="after")
    def _pipeline_fields(self) -> TaxonomyEntry:
        from advprune.bench.keys import ModelKey

        check_classification(self.pipeline, self.model_dump())
        ModelKey(self.ap_key, "R18", "CIFAR10", "US", "90")  # the AP key must fit model keys
        return self


@functools.cache
def _read(path: str | None) -> tuple[dict[str, str], tuple[TaxonomyEntry, ...]]:
    import yaml

    if path is None:
        text = (resources.files("advprune.bench") / "data" / "taxonomy.yaml").read_text("utf-8")
        where = "taxonomy.yaml"
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read taxonomy file {path} ({exc})") from None
        where = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
        raise ConfigError(f"{where}: needs a 'methods' list")
    entries = []
    for i, item in enumerate(data["methods"]):
        name = item.get("name", f"#{i}") if isinstance(item, dict) else f"#{i}"
        try:
            entries.append(TaxonomyEntry(**item))
        except ValidationError as exc:
            raise ConfigError(f"{where}: method {name!r}: {first_validation_error(exc)}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: method {name!r}: {exc}") from None
    keys = [e.ap_key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"{where}: duplicate ap_key(s) {', '.join(dup)}")
    meanings = data.get("legend")
    missing = sorted(set().union(*CODES.values()) - set(meanings or {}))
    if missing:
        raise ConfigError(f"{where}: the legend does not expand {', '.join(missing)}")
    return {str(k): str(v) for k, v in meanings.items()}, tuple(entries)


def load_taxonomy(path: str | Path | None = None) -> list[TaxonomyEntry]:
    """Every taxonomy entry (from ``path``, default the packaged data), in table order."""
    return list(_read(None if path is None else str(path))[1])


def legend() -> dict[str, str]:
    """The legend: code -> meaning (``"LIS"`` -> ``"Least Importance Score"``)."""
    return dict(_read(None)[0])


def taxonomy_entry(name: str) -> TaxonomyEntry:
    """The entry whose name (``HYDRA``) or AP key (``HYDRA_Sehwag2020Hydra``) is ``name``."""
    entries = load_taxonomy()
    for e in entries:
        if name in (e.name, e.ap_key):
            return e
    raise UnknownNameError("taxonomy method", name, [e.name for e in entries])


def method_ap_key(method: str) -> str:
    """The AP key an advprune method declares (``"hydra"`` -> ``"HYDRA_Sehwag2020Hydra"``)."""
    from advprune.methods import method_class

    return method_class(method).taxonomy.ap_key


def _check_filter(kind: str, values: Iterable[str] | None) -> set[str] | None:
    if values is None:
        return None
    values = {values} if isinstance(values, str) else set(values)
    bad = sorted(values - FILTERS[kind])
    if bad:
        raise ConfigError(
            f"unknown {kind} {', '.join(bad)}; valid: {', '.join(sorted(FILTERS[kind]))}"
        )
    return values


def filter_taxonomy(
    entries: Iterable[TaxonomyEntry] | None = None,
    *,
    pipeline: str | Iterable[str] | None = None,
    structure: str | Iterable[str] | None = None,
    criterion: str | Iterable[str] | None = None,
    scope: str | Iterable[str] | None = None,
    schedule: str | Iterable[str] | None = None,
) -> list[TaxonomyEntry]:
    """The entries matching every given filter; several values of one filter are alternatives."""
    want: dict[str, Any] = {
        "pipeline": _check_filter("pipeline", pipeline),
        "structure": _check_filter("structure", structure),
        "criterion": _check_filter("criterion", criterion),
        "scope": _check_filter("scope", scope),
        "schedule": _check_filter("schedule", schedule),
    }
    out = []
    for e in load_taxonomy() if entries is None else entries:
        have = {
            "pipeline": {e.pipeline},
            "structure": set(e.structures),
            "criterion": {e.criterion},
            "scope": set(e.scopes),
            "schedule": set(e.schedule or ()),
        }
        if all(v is None or v & have[k] for k, v in want.items()):
            out.append(e)
    return out
