"""The evaluation report: one entry per attack (or certifier), flags, curve, JSON round trip.

A :class:`Report` holds the numbers a user reads and a reviewer checks: clean accuracy, one
:class:`Entry` per attack with its configuration, time, robust accuracy and flags, the security
curve, the evaluation settings and library versions. Entries have a ``kind``: ``"empirical"``
(an attack: an upper bound on the true robust accuracy) or ``"certified"`` (a verifier or
randomized smoothing: a lower bound, possibly per radius in ``robust_accuracy_at``), so
certified results join the same report without a new format.

Any flag, on the report or on an entry, marks the whole report unreliable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advprune.errors import ConfigError
from advprune.io import atomic_path, from_jsonable, jsonable, write_json_atomic

REPORT_FILE = "report.json"
SAMPLES_FILE = "per_sample.npz"


def save_samples(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write per-sample arrays to ``path`` (``.npz``, atomically)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """Read per-sample arrays written by :func:`save_samples` (never unpickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


__all__ = ["ENTRY_KINDS", "REPORT_FORMAT", "Entry", "Flag", "Report", "load_report"]

REPORT_FORMAT = "advprune-eval-report"
REPORT_VERSION = 1
ENTRY_KINDS = ("empirical", "certified")


@dataclass(frozen=True)
class Flag:
    """A named sign that the evaluation may overestimate robustness (attack failure)."""

    name: str
    message: str
    attack: str | None = None  # the entry it concerns; None: the model or the whole run

    def __str__(self) -> str:
        where = f" [{self.attack}]" if self.attack else ""
        return f"{self.name}{where}: {self.message}"


@dataclass
class Entry:
    """The result of one attack (``kind="empirical"``) or certifier (``kind="certified"``).

    ``robust_accuracy`` is at the report's eps (``None`` if not measured there);
    ``robust_accuracy_at`` maps other radii (as text, e.g. ``"0.25"``) to accuracies, e.g. the
    certified accuracy of randomized smoothing per radius. ``details`` holds attack-specific
    figures (AutoAttack's robust accuracy after each of its attacks, median distances, ...).
    """

    name: str
    kind: str
    config: dict[str, Any]
    seconds: float
    robust_accuracy: float | None
    robust_accuracy_at: dict[str, float] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ENTRY_KINDS:
            raise ConfigError(
                f"entry kind must be one of {', '.join(ENTRY_KINDS)}, got {self.kind!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        """Inverse of :meth:`to_dict`."""
        d = _from_jsonable(dict(d))
        d["flags"] = [Flag(**f) for f in d.get("flags", [])]
        return cls(**d)


@dataclass
class Report:
    """Everything an evaluation measured; see the module docstring.

    ``robust_accuracy`` is the per-sample worst case over every empirical entry (a sample is
    robust only if no attack broke it at eps). ``curve`` holds the security curve
    (``{"attack", "eps", "robust_accuracy"}``, eps ascending and including the nominal eps).
    ``samples`` (per-sample arrays, see :func:`advprune.evaluation.evaluate`) is not part of
    the JSON; ``files`` names the per-sample file and plots written with it.
    """

    n: int
    clean_accuracy: float
    robust_accuracy: float | None
    eps: str
    eps_value: float
    norm: str
    entries: list[Entry] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    curve: dict[str, Any] | None = None
    dataset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    samples: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ queries

    def all_flags(self) -> list[Flag]:
        """The report's own flags followed by every entry's."""
        return [*self.flags, *(f for e in self.entries for f in e.flags)]

    @property
    def reliable(self) -> bool:
        """False when any check raised a flag."""
        return not self.all_flags()

    def entry(self, name: str) -> Entry:
        """The entry called ``name``."""
        for e in self.entries:
            if e.name == name:
                return e
        known = ", ".join(e.name for e in self.entries) or "none"
        raise KeyError(f"no entry {name!r} in the report (entries: {known})")

    def add_entry(self, entry: Entry) -> None:
        """Append ``entry`` (a later helper adds certified results this way)."""
        if any(e.name == entry.name for e in self.entries):
            raise ConfigError(f"the report already has an entry {entry.name!r}")
        self.entries.append(entry)

    def curve_at(self, eps: float | None = None) -> float | None:
        """Robust accuracy read off the security curve at ``eps`` (default: the report's eps)."""
        if not self.curve:
            return None
        eps = self.eps_value if eps is None else eps
        grid, acc = self.curve["eps"], self.curve["robust_accuracy"]
        for e, a in zip(grid, acc):
            if e == eps:
                return float(a)
        raise ConfigError(f"eps {eps} is not on the curve's grid; use security_curve()")

    # ------------------------------------------------------------------ text and JSON

    def format(self) -> str:
        """A short table; unreliable reports say so in their first line and list the flags."""
        head = "UNRELIABLE evaluation" if not self.reliable else "evaluation"
        lines = [
            f"{head}: {self.dataset or 'data'} n={self.n}, {self.norm} eps {self.eps}"
            f" ({self.eps_value:.6g})",
        ]
        if self.model.get("name"):
            model = f"  model {self.model['name']}"
            if self.model.get("measured_sparsity") is not None:
                model += f"  sparsity {self.model['measured_sparsity']:.4f}"
            if self.model.get("checkpoint"):
                model += f"  {self.model['checkpoint']}"
            lines.append(model)
        if self.model.get("profile"):  # `advprune eval --profile`: what the pruning bought
            from advprune.sparsity.profiling import format_summary

            lines.append(f"  cost: {format_summary(self.model['profile'])}")
        lines.append(f"  clean accuracy                {100 * self.clean_accuracy:6.2f} %")
        for e in self.entries:
            acc = "   n/a" if e.robust_accuracy is None else f"{100 * e.robust_accuracy:6.2f}"
            mark = "  (flagged)" if e.flags else ""
            lines.append(f"  {e.name:<14} {e.kind:<10}    {acc} %   {e.seconds:8.1f} s{mark}")
        if self.robust_accuracy is not None:
            lines.append(f"  worst case over attacks       {100 * self.robust_accuracy:6.2f} %")
        for flag in self.all_flags():
            lines.append(f"  FLAG {flag}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``reliable`` is derived and ignored by :meth:`from_dict`."""
        d = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "reliable": self.reliable}
        for key, value in asdict(self).items():
            if key in ("samples", "entries", "flags"):
                continue
            d[key] = value
        d["entries"] = [e.to_dict() for e in self.entries]
        d["flags"] = [asdict(f) for f in self.flags]
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != REPORT_FORMAT:
            raise ConfigError("not an advprune evaluation report (format field missing)")
        d = _from_jsonable(d)
        d = {k: v for k, v in d.items() if k not in ("format", "format_version", "reliable")}
        d["entries"] = [Entry.from_dict(e) for e in d.get("entries", [])]
        d["flags"] = [Flag(**f) for f in d.get("flags", [])]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the JSON report atomically; return the path."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


def load_report(path: str | Path) -> Report:
    """Read a report written by :meth:`Report.save`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read report {path} ({exc})") from None
    return Report.from_dict(data)


# JSON helpers live in the io layer (kept under their old names for callers)
_jsonable = jsonable
_from_jsonable = from_jsonable
