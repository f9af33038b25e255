"""``benchmark()``: the benchmark's contribution flow for a new method's checkpoint.

1. the model key is validated and its method looked up in the taxonomy;
2. compliance: the model must load into the key's base architecture with ``strict=True``
   (a masked advprune model is exported first), so that anyone can rebuild it; a compacted
   model under a structured (``S``) key (``advprune compact``: the base architecture with
   thinner layers) must load with ``strict=True`` into the base architecture resized to its
   layers' widths (:func:`advprune.sparsity.build_compacted`: same layers, same kinds, none
   wider than the base's), which is how anyone rebuilds it from its card;
3. normalisation is recorded (advprune models carry theirs; other models must state it);
4. the evaluation protocol runs (:func:`advprune.evaluation.evaluate`, exact eps, AutoAttack
   and HO-FMN by default, on the whole test split unless ``n`` is given);
5. the report is stored in the results store and ``OUT/submission.json`` is written: the
   entry a new method's authors submit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from advprune.errors import ConfigError
from advprune.progress import ProgressSetting

__all__ = ["BenchmarkResult", "benchmark", "check_compliance"]

SUBMISSION_FILE = "submission.json"


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured and wrote."""

    report: Any
    compliant: bool
    compliance: dict[str, Any]
    submission: dict[str, Any]
    submission_path: Path


# classes and input channels of the key's datasets, when no loaded dataset tells them
_DATASET_SHAPE = {"CIFAR10": (10, 3), "CIFAR100": (100, 3), "SVHN": (10, 3), "DIGITS": (10, 1)}


def _base_model(model: nn.Module, key: Any, data: Any = None) -> nn.Module:
    """The key's base architecture for the dataset's classes and channels; an advprune model
    of that architecture keeps its own construction keywords (width, variant)."""
    from advprune.models import create

    spec = getattr(model, "spec", None)
    if spec is not None and spec.name == key.architecture:
        return spec.build()
    info = getattr(data, "info", None)
    if info is not None:
        classes, channels = info.num_classes, info.input_shape[0]
    else:
        classes, channels = _DATASET_SHAPE.get(key.dataset, (10, 3))
    return create(key.architecture, num_classes=classes, in_channels=channels)


def _thinner_widths(plain: nn.Module, base: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The widths of ``plain``'s conv / linear / BatchNorm layers when it is ``base`` with
    some of them thinner (a compacted model), else None."""
    from advprune.sparsity.compaction import layer_widths

    mine, theirs = layer_widths(plain), layer_widths(base)
    if set(mine) != set(theirs):
        return None
    for name, w in mine.items():
        b = theirs[name]
        if w["type"] != b["type"] or any(w[k] > b[k] for k in ("in", "out", "features") if k in w):
            return None
    return mine if mine != theirs else None


def check_compliance(model: nn.Module, key: Any, data: Any = None) -> dict[str, Any]:
    """Whether ``model``'s state dict loads into the key's base architecture with strict=True
    (masks folded in first; ``data``, a DataSplits, gives the classes and channels).

    Under a structured key (``S``), a compacted model (the base architecture with thinner conv
    / linear / BatchNorm layers) is compliant when its state dict loads with strict=True into
    the base architecture resized to its widths (:func:`advprune.sparsity.build_compacted`);
    ``compacted`` then names the layers whose shape differs from the base's. Returns
    ``{"compliant", "architecture", "missing", "unexpected", "mismatched", "compacted"}``.
    """
    from advprune.sparsity import build_compacted, export_dense
    from advprune.sparsity.compaction import layer_widths

    plain = export_dense(copy.deepcopy(model))
    state = plain.state_dict()
    base = _base_model(model, key, data)
    # only structured pruning (key S) removes channels: a thinner model under a US key is not
    # a compacted one, it is another model (e.g. the architecture at another width)
    widths = _thinner_widths(plain, base) if key.structure == "S" else None
    compacted = None
    if widths is not None:  # rebuild it the way anyone would: the base, resized
        full = layer_widths(base)
        base = build_compacted(base, widths)
        compacted = {
            "layers_changed": sorted(n for n, w in widths.items() if w != full[n]),
            "rule": "loads with strict=True into the base architecture resized to its widths",
        }
    expected = base.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    ok = not (missing or unexpected or mismatched)
    if ok:
        base.load_state_dict(state, strict=True)
    return {
        "compliant": ok,
        "architecture": key.architecture,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "compacted": compacted,
    }


def _normalization(model: nn.Module, normalization: Any) -> dict[str, Any] | None:
    spec = getattr(model, "spec", None)
    if spec is not None:
        return {"mean": list(spec.mean), "std": list(spec.std)}
    if normalization is None:
        raise ConfigError(
            "state the model's input normalisation: normalization={'mean': [...], 'std': [...]} "
            "or normalization='none' (the model takes raw [0, 1] inputs)"
        )
    if normalization == "none":
        return None
    try:
        if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
            raise TypeError
        return {k: [float(v) for v in normalization[k]] for k in ("mean", "std")}
    except (TypeError, ValueError):
        raise ConfigError(
            "normalization must be 'none' or {'mean': [numbers], 'std': [numbers]}, "
            f"got {normalization!r}"
        ) from None


def benchmark(
    model: nn.Module,
    model_key: str,
    data: Any = None,
    *,
    out: str | Path,
    eps: str | None = None,
    norm: str = "linf",
    attacks: tuple[str, ...] | list[str] | None = None,
    store: Any = None,
    normalization: Any = None,
    n: int | None = None,
    progress: ProgressSetting = False,
    require_compliance: bool = True,
    checkpoint: str | Path | None = None,
    **eval_kwargs: Any,
) -> BenchmarkResult:
    """Evaluate ``model`` under the benchmark's protocol, store it, write the submission.

    Args:
        model: classifier on inputs in [0, 1] (advprune models normalise inside).
        model_key: ``{method}_{arch}_{dataset}_{US|S}_{sparsity}`` (see advprune.bench.keys).
        data: what :func:`advprune.evaluation.evaluate` takes; default the key's dataset.
        out: folder of the evaluation files and ``submission.json``.
        eps: exact eps text; default the dataset's (8/255 on CIFAR-10 / SVHN, 3/16 digits).
        store: a ResultsStore or its path; default ``OUT/results.sqlite``.
        normalization: for models without ``model.spec``: ``{"mean", "std"}`` or ``"none"``.
        require_compliance: raise when the model does not load into the base architecture
            with ``strict=True`` (else record it and go on).
        checkpoint: the checkpoint file evaluated, whose sha256 the submission records.
    """
    from advprune._version import __version__
    from advprune.bench.keys import parse_key
    from advprune.bench.store import ResultsStore
    from advprune.bench.taxonomy import taxonomy_entry
    from advprune.config import DEFAULT_EPS, FALLBACK_EPS
    from advprune.errors import UnknownNameError
    from advprune.evaluation import DEFAULT_ATTACKS, evaluate
    from advprune.io import sha256_file, write_json_atomic

    key = parse_key(model_key)
    info = getattr(data, "info", None)
    given = data if isinstance(data, str) else getattr(info, "name", None)
    if given is not None and given.lower() != key.dataset_name:
        raise ConfigError(f"the key {key} is for {key.dataset_name} but the data is {given}")
    norm_record = _normalization(model, normalization)
    compliance = check_compliance(model, key, data)
    if not compliance["compliant"] and require_compliance:
        parts = [
            f"{name} {', '.join(compliance[name][:5])}"
            + (f" (+{len(compliance[name]) - 5})" if len(compliance[name]) > 5 else "")
            for name in ("missing", "unexpected", "mismatched")
            if compliance[name]
        ]
        raise ConfigError(
            f"the model does not load into the base {key.architecture} with strict=True: "
            + "; ".join(parts)
        )
    try:
        taxonomy = taxonomy_entry(key.method).model_dump(mode="json")
    except UnknownNameError:
        taxonomy = None
    out = Path(out)
    eps = eps or DEFAULT_EPS.get(key.dataset_name, FALLBACK_EPS)
    report = evaluate(
        model,
        data if data is not None else key.dataset_name,
        eps=eps,
        norm=norm,
        attacks=attacks if attacks is not None else DEFAULT_ATTACKS,
        n=n,
        out=out,
        progress=progress,
        model_info={
            "key": str(key),
            "name": key.architecture,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "normalization": norm_record,
        },
        **eval_kwargs,
    )
    store = (
        store if isinstance(store, ResultsStore) else ResultsStore(store or out / "results.sqlite")
    )
    rows = store.add_report(out / "report.json", str(key))
    by_attack = {r.attack: r for r in rows}

    def acc(name: str) -> float | None:
        row = by_attack.get(name)
        return None if row is None else row.robust_accuracy

    submission = {
        "model_key": str(key),
        "taxonomy": taxonomy,
        "taxonomy_note": None
        if taxonomy
        else f"{key.method} is not in the taxonomy: submit its taxonomy entry with the results",
        "clean_accuracy": report.clean_accuracy,
        "autoattack_robust_accuracy": acc("autoattack"),
        "hofmn_robust_accuracy": acc("hofmn"),
        "worst_case_robust_accuracy": report.robust_accuracy,
        "robust_accuracy_by_attack": {e.name: e.robust_accuracy for e in report.entries},
        "eps": report.eps,
        "eps_value": report.eps_value,
        "norm": report.norm,
        "n": report.n,
        "dataset": key.dataset,
        "reliable": report.reliable,
        "flags": [str(f) for f in report.all_flags()],
        "compliance": compliance,
        "normalization": norm_record,
        # relative to the folder of submission.json (= of report.json)
        "distances": {
            "path": report.files.get("per_sample"),
            "sha256": rows[0].per_sample_sha256,
        },
        "checkpoint_sha256": None if checkpoint is None else sha256_file(checkpoint),
        "advprune_version": __version__,
    }
    path = out / SUBMISSION_FILE
    write_json_atomic(path, submission)
    return BenchmarkResult(report, compliance["compliant"], compliance, submission, path)
