"""Certified results as entries of the evaluation report (``advprune eval --certify``).

Each certifier becomes one :class:`~advprune.evaluation.Entry` of ``kind="certified"`` (a
lower bound on the robust accuracy, where attacks give upper bounds), with its method and
settings in ``config``:

* ``ibp``, ``crown-ibp``, ``crown``: verified accuracy at the report's L∞ eps
  (``robust_accuracy``); per-sample ``verified_<method>`` flags.
* ``smoothing``: certified accuracy of the smoothed classifier at L2 radii
  (``robust_accuracy_at``; ``robust_accuracy`` is the one at eps when the report's norm is
  L2), abstention rate and the largest radius ``n`` samples can certify in ``details``;
  per-sample ``smoothing_prediction`` / ``smoothing_radius``.

Everything is validated before any point is bounded or sampled.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm as normal
from torch import nn

from advprune._validation import check_eps, check_norm, parse_number
from advprune.certify.bounds import BOUND_METHODS, BoundedModel
from advprune.certify.smoothing import (
    DEFAULT_RADII,
    certify_dataset,
    check_alpha,
    check_sample_counts,
    check_sigma,
    plot_certified_accuracy,
)
from advprune.certify.verify import verified_accuracy
from advprune.errors import ConfigError, UnknownNameError
from advprune.evaluation.attacks import ATTACKS, EvalAttack, list_attacks, register_attack
from advprune.progress import ProgressSetting

__all__ = [
    "CERTIFIERS",
    "add_certified",
    "certified_entries",
    "certifier_settings",
    "certify_report",
    "check_certifiers",
    "parse_certifiers",
    "parse_radii",
]


class _BoundCertifier(EvalAttack):
    """Verified robustness at eps (L∞) by sound bounds: ``success`` where a point is NOT
    verified (an adversarial example may exist), ``distance`` 0 there and inf where it is."""

    kind = "certified"

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
        from advprune.certify.verify import verify_batch

        _, verified = verify_batch(BoundedModel(model), x, y, self.eps, self.name)
        open_ = (~verified).cpu().numpy()
        return {"success": open_, "distance": np.where(open_, 0.0, np.inf)}


class _SmoothingCertifier(EvalAttack):
    """Randomized smoothing's certified accuracy at L2 radii (run over the whole set by
    :func:`certified_entries`: its samples and abstentions are per point, not per batch)."""

    kind = "certified"

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
        raise ConfigError("smoothing certifies a whole set: use certified_entries")


for _name in BOUND_METHODS:
    ATTACKS.add(_name, type(f"Certifier_{_name.replace('-', '_')}", (_BoundCertifier,),
                            {"name": _name, "__module__": __name__}))  # fmt: skip
register_attack("smoothing")(_SmoothingCertifier)

#: the shipped certifiers; ``list_attacks(kind="certified")`` is the current list
CERTIFIERS: tuple[str, ...] = (*BOUND_METHODS, "smoothing")


def parse_certifiers(text: str | Sequence[str]) -> list[str]:
    """``"ibp,crown"`` -> ``["ibp", "crown"]``; unknown names raise UnknownNameError."""
    valid = [*BOUND_METHODS, "smoothing"]
    valid += [n for n in list_attacks(kind="certified") if n not in valid]
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [t for t in names if t]
    if not names:
        raise ConfigError(f"--certify needs at least one of {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise UnknownNameError("certifier", name, valid)
    if len(set(names)) != len(names):
        raise ConfigError(f"a certifier is repeated in {','.join(names)}")
    return names


def parse_radii(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """Radii ``"0,0.25,0.5"`` (or a sequence) as sorted floats >= 0."""
    if text is None:
        return DEFAULT_RADII
    items = text.split(",") if isinstance(text, str) else list(text)
    radii = sorted({parse_number(r, "radius") for r in items if str(r).strip()})
    if not radii or radii[0] < 0:
        raise ConfigError(f"radii must be numbers >= 0, got {text!r}")
    return tuple(radii)


def check_certifiers(
    model: nn.Module,
    input_shape: Sequence[int],
    methods: str | Sequence[str],
    *,
    eps: str | float,
    norm: str = "linf",
    sigma: str | float = 0.25,
) -> list[str]:
    """Validate certifiers against the model and settings (one-line errors, no work done)."""
    names = parse_certifiers(methods)
    norm = check_norm(norm)
    check_eps(eps, norm)
    bounds = [m for m in names if m != "smoothing"]
    if bounds and norm != "linf":
        raise ConfigError(f"{', '.join(bounds)} bound L∞ balls; evaluate with --norm linf")
    if bounds:
        bounded = BoundedModel(model)
        for method in bounds:
            bounded.check_method(method, tuple(int(s) for s in input_shape))
    if "smoothing" in names:
        check_sigma(sigma)
    return names


def _stack(dataset: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(dataset) if n is None else min(n, len(dataset))
    if count == 0:
        raise ConfigError("the evaluation set is empty")
    items = [dataset[i] for i in range(count)]
    return torch.stack([x for x, _ in items]).float(), torch.tensor([int(y) for _, y in items])


def certified_entries(
    model: nn.Module,
    dataset: Any,
    methods: str | Sequence[str],
    *,
    eps: str | float,
    norm: str = "linf",
    n: int | None = None,
    num_classes: int | None = None,
    sigma: str | float = 0.25,
    n0: int = 100,
    samples: int = 10_000,
    alpha: float = 0.001,
    radii: Sequence[float] = DEFAULT_RADII,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: ProgressSetting = False,
    plot: str | Path | None = None,
) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Run the certifiers ``methods`` on the first ``n`` points of ``dataset``.

    Returns the report entries and per-sample arrays. ``plot`` writes the smoothing curve
    (``.png`` and ``.svg``).
    """
    from advprune.evaluation.report import Entry

    names = parse_certifiers(methods)
    norm = check_norm(norm)
    bounds = [m for m in names if m != "smoothing"]
    eps_value = check_eps(eps, norm)
    if bounds and norm != "linf":
        raise ConfigError(f"{', '.join(bounds)} bound L∞ balls; evaluate with --norm linf")
    if "smoothing" in names:
        sigma = check_sigma(sigma)
        alpha = check_alpha(alpha)
        check_sample_counts(samples, alpha, n0)
    radii = parse_radii(radii)
    device = torch.device(device) if device is not None else _device(model)
    model = model.to(device)
    x, y = _stack(dataset, n)
    shape = tuple(x.shape[1:])
    bounded = BoundedModel(model, shape) if bounds else None
    for method in bounds:  # unsupported layers / model too large: refused before any work
        assert bounded is not None
        bounded.check_method(method, shape)
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model.eval()(x[:1].to(device)).shape[1])
    loader = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    entries: list[Entry] = []
    arrays: dict[str, np.ndarray] = {}
    for method in names:
        if method == "smoothing":
            res = certify_dataset(
                model, loader, num_classes, sigma, n0=n0, n=samples, alpha=alpha,
                batch_size=max(batch_size, 1000), seed=seed, progress=progress,
            )  # fmt: skip
            top = float(sigma * normal.ppf(alpha ** (1 / samples)))
            entries.append(
                Entry(
                    name="smoothing",
                    kind="certified",
                    config={
                        "method": "randomized smoothing (Cohen et al. 2019)",
                        "norm": "l2",
                        "sigma": sigma,
                        "n0": n0,
                        "n": samples,
                        "alpha": alpha,
                        "confidence": "Clopper-Pearson",
                        "seed": seed,
                    },
                    seconds=res.seconds,
                    robust_accuracy=res.certified_accuracy(eps_value) if norm == "l2" else None,
                    robust_accuracy_at={f"{r:g}": res.certified_accuracy(r) for r in radii},
                    details={
                        "smoothed_accuracy": res.certified_accuracy(0.0),
                        "abstention_rate": res.abstention_rate,
                        "max_certifiable_radius": top,
                    },
                )
            )
            arrays["smoothing_prediction"] = np.asarray(res.predictions)
            arrays["smoothing_radius"] = np.asarray(res.radii)
            if plot is not None:
                plot_certified_accuracy({f"sigma = {sigma:g}": res}, plot, radii=None)
            continue
        assert bounded is not None
        res_v = verified_accuracy(bounded, loader, eps_value, method, progress=progress)
        entries.append(
            Entry(
                name=method,
                kind="certified",
                config={
                    "method": method,
                    "eps": str(eps),
                    "eps_value": eps_value,
                    **res_v.settings,
                },
                seconds=res_v.seconds,
                robust_accuracy=res_v.verified_accuracy,
                details={"clean_accuracy": res_v.clean_accuracy},
            )
        )
        arrays[f"verified_{method}"] = np.asarray(res_v.verified)
    return entries, arrays


def certify_report(
    model: nn.Module,
    dataset: Any,
    *,
    dataset_name: str | None = None,
    model_info: dict[str, Any] | None = None,
    out: str | Path | None = None,
    **kwargs: Any,
) -> Any:
    """A :class:`~advprune.evaluation.Report` holding only certified entries (no attack ran:
    ``robust_accuracy`` is None); written to ``out/report.json`` with the per-sample arrays
    (``certified_per_sample.npz``) and the smoothing curve when ``out`` is given. ``kwargs``
    are those of :func:`certified_entries` (``methods`` and ``eps`` required)."""
    from advprune._version import __version__
    from advprune.evaluation.report import Report

    out_path = Path(out) if out is not None else None
    plot = out_path / "certified_accuracy" if out_path is not None else None
    entries, arrays = certified_entries(model, dataset, plot=plot, **kwargs)
    eps, norm, n = kwargs["eps"], kwargs.get("norm", "linf"), kwargs.get("n")
    x, y = _stack(dataset, n)
    with torch.no_grad():
        was = model.training
        model.eval()
        device = _device(model)
        pred = torch.cat(
            [model(x[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, len(y), 256)]
        )
        model.train(was)
    report = Report(
        n=len(y),
        clean_accuracy=int((pred == y).sum()) / len(y),
        robust_accuracy=None,
        eps=str(eps),
        eps_value=check_eps(eps, norm),
        norm=check_norm(norm),
        entries=entries,
        dataset=dataset_name,
        model=dict(model_info or {}),
        settings={
            "certify": [e.name for e in entries],
            "n": n,
            **{k: v for k, v in kwargs.items() if k in ("sigma", "n0", "samples", "alpha", "seed")},
        },
        versions={
            "advprune": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        samples={"label": y.numpy(), "clean_pred": pred.numpy(), **arrays},
    )
    if out_path is not None:
        save_certified(report, arrays, out_path)
    return report


def certifier_settings(
    methods: str | Sequence[str],
    *,
    radii: str | Sequence[float] | None = None,
    n0: int | None = None,
    smoothing_n: int | None = None,
    alpha: float | None = None,
) -> dict[str, Any]:
    """The certifiers ``methods`` and smoothing's settings (defaults: n0 100, 10,000 samples,
    alpha 0.001, :data:`DEFAULT_RADII`), validated before any data is read; the keys are
    :func:`certified_entries`'s (``methods``, ``radii``, ``n0``, ``samples``, ``alpha``)."""
    names = parse_certifiers(methods)
    settings: dict[str, Any] = {"methods": names, "radii": parse_radii(radii)}
    settings["n0"] = 100 if n0 is None else n0
    settings["samples"] = 10_000 if smoothing_n is None else smoothing_n
    settings["alpha"] = check_alpha(0.001 if alpha is None else alpha)
    if "smoothing" in names:
        check_sample_counts(settings["samples"], settings["alpha"], settings["n0"])
    return settings


def add_certified(
    report: Any,
    model: nn.Module,
    dataset: Any,
    *,
    out: str | Path | None = None,
    **settings: Any,
) -> None:
    """Append the certified entries of :func:`certified_entries` (``settings``: its keyword
    arguments) to a report of attacks, and rewrite the report in ``out`` when given."""
    plot = Path(out) / "certified_accuracy" if out is not None else None
    entries, arrays = certified_entries(model, dataset, plot=plot, **settings)
    for entry in entries:
        report.add_entry(entry)
    if out is not None:
        save_certified(report, arrays, out)


def save_certified(report: Any, arrays: dict[str, np.ndarray], out: str | Path) -> None:
    """Write ``report.json`` and ``certified_per_sample.npz`` into ``out``."""
    from advprune.io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "certified_per_sample.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    report.files = {**report.files, "certified_per_sample": "certified_per_sample.npz"}
    if "smoothing_radius" in arrays:
        report.files["certified_curve"] = "certified_accuracy.png"
    report.save(out / "report.json")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
