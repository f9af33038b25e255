"""A method's place in the Adversarial Pruning Benchmark's taxonomy (arXiv 2409.01249): the
schema of the legend's codes and the :class:`Taxonomy` each method declares.

The benchmark's own table of every method (``advprune.bench.taxonomy``, from its packaged
data) is checked against the same schema; it sits above the methods and reads their
declarations, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CODES", "PIPELINES", "PIPELINE_FIELDS", "Taxonomy", "check_classification"]

PIPELINES = ("after", "before", "during")  # APB: A (post-training), B (at init), D (in training)
PIPELINE_FIELDS: dict[str, tuple[str, ...]] = {
    "after": ("pretraining", "finetuning", "schedule"),
    "before": ("pruning_step", "training_step", "schedule"),
    "during": ("training_step",),
}
_TRAINING = {"AT", "NT", "KD", "CNI", "None", "n.s."}
CODES: dict[str, set[str]] = {
    "pretraining": _TRAINING,
    "finetuning": _TRAINING,
    "pruning_step": _TRAINING,
    "training_step": _TRAINING,
    "schedule": {"1S", "IT", "n.s."},
    "structures": {"S", "US"},
    "scopes": {"L", "G", "n.s."},
    "criterion": {"LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS"},
}


def check_classification(pipeline: str, fields: dict[str, Any]) -> None:
    """Check a classification against the schema: ``pipeline`` is after / before / during,
    the fields of that pipeline (:data:`PIPELINE_FIELDS`) are given and no other pipeline's,
    and every code is one of the legend's. Raises ``ValueError`` naming the field."""
    if pipeline not in PIPELINE_FIELDS:
        raise ValueError(f"pipeline {pipeline!r} is not one of {', '.join(PIPELINE_FIELDS)}")
    own = PIPELINE_FIELDS[pipeline]
    for name in {f for names in PIPELINE_FIELDS.values() for f in names}:
        value = fields.get(name)
        if name in own and value is None:
            raise ValueError(f"pipeline {pipeline!r} needs the field {name!r}")
        if name not in own and value is not None:
            raise ValueError(f"field {name!r} is not one of pipeline {pipeline!r}")
    for name, valid in CODES.items():
        value = fields.get(name)
        codes = [value] if isinstance(value, str) else list(value or ())
        if name in ("structures", "scopes", "schedule") and value is not None and not codes:
            raise ValueError(f"{name} needs at least one code")
        for code in codes:
            if code not in valid:
                raise ValueError(
                    f"{name} code {code!r} is not in the legend ({', '.join(sorted(valid))})"
                )


@dataclass(frozen=True)
class Taxonomy:
    """A method's classification in the Adversarial Pruning Benchmark (APB, arXiv 2409.01249),
    in the codes of the benchmark's legend, as in :mod:`advprune.bench.taxonomy`'s data.

    ``ap_key``: the AP key ``Name_CitationKey`` of the method's taxonomy entry;
    ``pipeline``: when pruning happens relative to training (after / before / during);
    ``schedule``: ``1S`` (one-shot) and / or ``IT`` (iterative); ``structures``: ``S`` / ``US``;
    ``scopes``: ``L`` (local) / ``G`` (global); ``criterion``: ``LWM``, ``SOLWM``, ``RELWM``,
    ``LIS``, ``HGM`` or ``BCS``; the pipeline's own fields: ``pretraining`` and ``finetuning``
    (after), ``pruning_step`` and ``training_step`` (before), ``training_step`` (during), each
    a tuple of training codes (``AT``, ``NT``, ``KD``, ``CNI``, ``None``, ``n.s.``).
    ``description`` and ``reference`` are free text.

    This is the paper's classification, not what advprune implements: the granularities and
    scopes a method accepts are :attr:`Method.structures` and :attr:`Method.scopes`.
    """

    ap_key: str
    pipeline: str
    schedule: tuple[str, ...] | None
    structures: tuple[str, ...]
    scopes: tuple[str, ...]
    criterion: str
    pretraining: tuple[str, ...] | None = None
    finetuning: tuple[str, ...] | None = None
    pruning_step: tuple[str, ...] | None = None
    training_step: tuple[str, ...] | None = None
    description: str = ""
    reference: str = ""

    def __post_init__(self) -> None:
        try:
            check_classification(self.pipeline, self.classification())
        except ValueError as exc:
            raise ValueError(f"taxonomy of {self.ap_key!r}: {exc}") from None

    def classification(self) -> dict[str, Any]:
        """The fields the benchmark's taxonomy data holds (no free text), as lists."""
        out: dict[str, Any] = {"ap_key": self.ap_key, "pipeline": self.pipeline}
        for name in (
            "pretraining",
            "finetuning",
            "pruning_step",
            "training_step",
            "schedule",
            "structures",
            "scopes",
        ):
            value = getattr(self, name)
            out[name] = None if value is None else list(value)
        out["criterion"] = self.criterion
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (tuples as lists)."""
        return {
            **self.classification(),
            "description": self.description,
            "reference": self.reference,
        }
