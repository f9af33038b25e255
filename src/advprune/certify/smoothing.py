"""Randomized smoothing (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + δ) = c)``, ``δ ~ N(0, σ² I)``, is robust in
L2 around ``x`` with radius ``σ · Φ⁻¹(p_A)`` when the top class has probability ``p_A > 1/2``.
:class:`Smooth` estimates it by Monte Carlo exactly as the paper's ``CERTIFY`` / ``PREDICT``:

* ``certify(x, n0, n, alpha)``: guess the top class from ``n0`` samples, count it in ``n``
  fresh samples, lower-bound ``p_A`` by the one-sided Clopper-Pearson bound at level
  ``1 - alpha`` (``Beta(alpha; n_A, n - n_A + 1)``); abstain (class ``-1``, radius 0) when
  the bound is ≤ 1/2, else return the class and radius ``σ · Φ⁻¹(p_A_lower)``.
* ``predict(x, n, alpha)``: the two most frequent classes of ``n`` samples, abstain unless a
  two-sided binomial test of ``n_A`` vs ``n_B`` rejects equality at ``alpha``.

Noise is added to inputs in [0, 1] (before the model's normalisation), not clipped; batches of
``batch_size`` noisy copies; every input gets its own generator seeded from ``(seed, index)``,
so results do not depend on the batch size or on which other inputs are certified.
:func:`certify_dataset` reports certified accuracy on a grid of radii and the abstention rate;
:func:`plot_certified_accuracy` draws the certified-accuracy-vs-radius curve (PNG and SVG).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import Tensor, nn

from advprune._validation import check_unit_range, parse_number
from advprune.attacks.pgd import model_mode_scope
from advprune.errors import ConfigError
from advprune.progress import ProgressSetting
from advprune.progress import progress as progress_of

__all__ = [
    "ABSTAIN",
    "DEFAULT_RADII",
    "Smooth",
    "SmoothingResult",
    "certify_dataset",
    "check_alpha",
    "check_sample_counts",
    "check_sigma",
    "lower_confidence_bound",
    "min_certify_samples",
    "plot_certified_accuracy",
]

ABSTAIN = -1
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def check_sigma(sigma: str | float) -> float:
    """The noise level as a float > 0 (fractions such as ``"1/4"`` accepted)."""
    value = parse_number(sigma, "sigma")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"sigma must be > 0 (the std of the Gaussian noise), got {sigma!r}")
    return value


def check_alpha(alpha: str | float) -> float:
    """The failure probability as a float in (0, 1)."""
    value = parse_number(alpha, "alpha")
    if not 0 < value < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    return value


def min_certify_samples(alpha: float) -> int:
    """Smallest ``n`` for which ``certify`` can succeed at ``alpha``: with all ``n`` samples
    in the top class the Clopper-Pearson lower bound is ``alpha ** (1 / n)``, which must
    exceed 1/2, i.e. ``n > log2(1 / alpha)``."""
    return math.floor(math.log2(1.0 / alpha)) + 1


def check_sample_counts(
    n: int, alpha: float, n0: int | None = None, *, predict: bool = False
) -> None:
    """Raise a one-line ConfigError if ``n`` (or ``n0``) samples cannot certify / predict at
    ``alpha`` even when every sample lands in the top class."""
    alpha = check_alpha(alpha)
    for name, value in (("n", n), ("n0", n0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if predict:
        need = math.ceil(math.log2(2.0 / alpha))  # two-sided binomial p-value 2 * 0.5**n
        if n < need:
            raise ConfigError(
                f"n={n} samples can never pass the binomial test at alpha={alpha} "
                f"(p-value >= {2 * 0.5**n:.3g} even with all samples in one class); use n >= {need}"
            )
        return
    need = min_certify_samples(alpha)
    if n < need:
        raise ConfigError(
            f"n={n} samples cannot certify at alpha={alpha}: even with all of them in the top "
            f"class the Clopper-Pearson lower bound is {alpha ** (1 / n):.3g} <= 0.5; "
            f"use n >= {need}"
        )


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion
    (``proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]`` of statsmodels)."""
    if n_a <= 0:
        return 0.0
    return float(beta_dist.ppf(alpha, n_a, n - n_a + 1))


def _sample_seed(seed: int, index: int, stream: int) -> int:
    return ((int(seed) * 1_000_003 + int(index)) * 4 + stream) % (2**63 - 1)


class Smooth:
    """The smoothed classifier of ``model`` with Gaussian noise of std ``sigma``.

    Args:
        model: base classifier, inputs in [0, 1] (put in eval mode while sampling).
        num_classes: number of classes.
        sigma: noise std in input units, > 0.
        batch_size: noisy copies per forward pass.
        seed: base seed; input ``index`` uses its own generator derived from ``(seed, index)``.
        progress: a bar or lines over inputs (a mode of :mod:`advprune.progress`).
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: str | float,
        *,
        batch_size: int = 1000,
        seed: int = 0,
        progress: ProgressSetting = False,
    ) -> None:
        self.model = model
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.num_classes = num_classes
        self.sigma = check_sigma(sigma)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.progress = progress

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def sample_counts(self, x: Tensor, num: int, generator: torch.Generator) -> Tensor:
        """Counts (num_classes,) of the base classifier's predictions on ``num`` noisy copies
        of one input ``x`` (C, H, W)."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        remaining = num
        while remaining > 0:
            b = min(self.batch_size, remaining)
            noise = torch.randn((b, *x.shape), generator=generator, device=x.device)
            pred = self.model(x.unsqueeze(0) + self.sigma * noise).argmax(1)
            counts += torch.bincount(pred, minlength=self.num_classes)
            remaining -= b
        return counts

    def _generator(self, device: torch.device, index: int, stream: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(_sample_seed(self.seed, index, stream))
        return g

    def _inputs(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ConfigError(f"inputs must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
        check_unit_range(x)
        return x.to(self._device())

    def certify(
        self, x: Tensor, n0: int, n: int, alpha: float, *, start_index: int = 0
    ) -> tuple[Tensor, Tensor]:
        """``(prediction, radius)`` for every input of the batch ``x`` (N, C, H, W).

        ``prediction`` is ``-1`` (ABSTAIN) with radius 0 where ``p_A_lower <= 1/2``.
        ``start_index`` is the dataset index of ``x[0]`` (seeds the noise per input).
        """
        check_sample_counts(n, alpha, n0)
        x = self._inputs(x)
        preds = torch.full((x.shape[0],), ABSTAIN, dtype=torch.long)
        radii = torch.zeros(x.shape[0], dtype=torch.float64)
        with model_mode_scope(self.model, "eval"):
            for i in progress_of(range(x.shape[0]), desc="certify", mode=self.progress):
                g = self._generator(x.device, start_index + i, 0)
                c_hat = int(self.sample_counts(x[i], n0, g).argmax())
                n_a = int(self.sample_counts(x[i], n, g)[c_hat])
                p_lower = lower_confidence_bound(n_a, n, alpha)
                if p_lower > 0.5:
                    preds[i] = c_hat
                    radii[i] = self.sigma * float(norm.ppf(p_lower))
        return preds, radii

    def predict(self, x: Tensor, n: int, alpha: float, *, start_index: int = 0) -> Tensor:
        """Predictions (N,) of the smoothed classifier, ``-1`` where it abstains."""
        check_sample_counts(n, alpha, predict=True)
        x = self._inputs(x)
        preds = torch.full((x.shape[0],), ABSTAIN, dtype=torch.long)
        with model_mode_scope(self.model, "eval"):
            for i in progress_of(range(x.shape[0]), desc="predict", mode=self.progress):
                counts = self.sample_counts(x[i], n, self._generator(x.device, start_index + i, 1))
                top2 = counts.topk(2)
                n_a, n_b = int(top2.values[0]), int(top2.values[1])
                if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                    preds[i] = int(top2.indices[0])
        return preds


@dataclass
class SmoothingResult:
    """Per-point results of :func:`certify_dataset` and the numbers read off them."""

    sigma: float
    n0: int
    n: int
    alpha: float
    labels: list[int]
    predictions: list[int]
    radii: list[float]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        """Number of certified points."""
        return len(self.labels)

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of points predicted correctly with certified radius >= ``radius``
        (abstentions never count; at radius 0 this is the smoothed classifier's accuracy)."""
        ok = [p == y and r >= radius for p, y, r in zip(self.predictions, self.labels, self.radii)]
        return sum(ok) / max(len(ok), 1)

    @property
    def abstention_rate(self) -> float:
        """Fraction of points where ``certify`` abstained."""
        return sum(p == ABSTAIN for p in self.predictions) / max(len(self.predictions), 1)

    def curve(self, radii: Sequence[float] | None = None) -> dict[str, list[float]]:
        """``{"radius": [...], "certified_accuracy": [...]}`` on ``radii`` (default: 0 to the
        largest certified radius, 101 points)."""
        if radii is None:
            top = max([r for r in self.radii if r > 0] or [1.0])
            radii = np.linspace(0.0, 1.05 * top, 101).tolist()
        grid = [float(r) for r in radii]
        return {"radius": grid, "certified_accuracy": [self.certified_accuracy(r) for r in grid]}

    def to_dict(self, radii: Sequence[float] = DEFAULT_RADII, per_sample: bool = False) -> dict:
        """JSON-able summary: certified accuracy at ``radii``, abstention rate, settings."""
        out = {
            "sigma": self.sigma,
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "num_points": self.num_points,
            "certified_accuracy": {f"{r:g}": self.certified_accuracy(r) for r in radii},
            "abstention_rate": self.abstention_rate,
            "seconds": self.seconds,
            "settings": self.settings,
        }
        if per_sample:
            out.update(
                {k: v for k, v in asdict(self).items() if k in ("labels", "predictions", "radii")}
            )
        return out


def certify_dataset(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    sigma: str | float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    max_points: int | None = None,
    progress: ProgressSetting = False,
) -> SmoothingResult:
    """Run ``certify`` on every point of ``loader`` (the first ``max_points``).

    Defaults are Cohen et al.'s (n0 = 100, n = 100,000, alpha = 0.001). Bad sigma, alpha or
    sample counts raise before any sampling.
    """
    smooth = Smooth(model, num_classes, sigma, batch_size=batch_size, seed=seed)
    check_sample_counts(n, alpha, n0)
    labels: list[int] = []
    preds: list[int] = []
    radii: list[float] = []
    t0 = time.perf_counter()
    bar = progress_of(desc=f"smoothing (sigma={smooth.sigma:g})", unit="pt", leave=True,
                      mode=progress)  # fmt: skip
    try:
        for x, y in loader:
            if max_points is not None and len(labels) >= max_points:
                break
            if max_points is not None:
                x, y = x[: max_points - len(labels)], y[: max_points - len(labels)]
            p, r = smooth.certify(x, n0, n, alpha, start_index=len(labels))
            labels += [int(v) for v in y]
            preds += p.tolist()
            radii += r.tolist()
            bar.update(len(y))
    finally:
        bar.close()
    if not labels:
        raise ConfigError("evaluation data is empty")
    return SmoothingResult(
        sigma=smooth.sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        labels=labels,
        predictions=preds,
        radii=radii,
        seconds=time.perf_counter() - t0,
        settings={"norm": "l2", "confidence": "Clopper-Pearson", "seed": seed, "batch": batch_size},
    )


def plot_certified_accuracy(
    results: Mapping[str, SmoothingResult] | Sequence[SmoothingResult],
    path: str | Path | None = None,
    *,
    radii: Sequence[float] | None = None,
    title: str | None = None,
) -> Any:
    """Certified accuracy versus L2 radius, one line per result (like a security curve).

    ``results``: a mapping label -> result, or a sequence (labelled by sigma). With ``path``
    the figure is written as ``path`` with suffixes ``.png`` and ``.svg``. Returns the
    matplotlib Figure (a bare Figure: no pyplot, the global backend is left alone).
    """
    from matplotlib.figure import Figure

    items = (
        list(results.items())
        if isinstance(results, Mapping)
        else [(f"sigma = {r.sigma:g}", r) for r in results]
    )
    if not items:
        raise ConfigError("nothing to plot: pass at least one smoothing result")
    if radii is None:
        top = max([r for _, res in items for r in res.radii if r > 0] or [1.0])
        radii = np.linspace(0.0, 1.05 * top, 201).tolist()
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    for label, res in items:
        curve = res.curve(radii)
        ax.step(curve["radius"], [100 * a for a in curve["certified_accuracy"]], where="post",
                label=label)  # fmt: skip
    from advprune.plotting import finish_accuracy_plot

    return finish_accuracy_plot(fig, ax, "L2 radius", "certified accuracy (%)", title, path)
