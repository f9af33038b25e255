"""Certified-robustness training objectives: ``smooth``, ``ibp``, ``crown-ibp``, ``mixtrain``.

The four robust objectives HYDRA prunes with besides adversarial training (Sehwag et al.,
NeurIPS 2020), usable in every stage of every method through the same
:class:`~advprune.training.Trainer` (masked models included: bounds use the effective
``module.weight``, so gradients reach mask scores too):

* ``smooth`` -- Gaussian data augmentation for randomized smoothing (Cohen et al. 2019), or
  its variants: ``stability`` (HYDRA's code: ``CE(f(x)) + beta * KL(f(x) || f(x + δ))``),
  ``consistency`` (Jeong & Shin, NeurIPS 2020) and ``adversarial`` (SmoothAdv, Salman et al.,
  NeurIPS 2019).
* ``ibp`` -- interval bound propagation training (Gowal et al. 2018):
  ``kappa * CE(f(x), y) + (1 - kappa) * CE(-lower(margins), y)``.
* ``crown-ibp`` -- CROWN-IBP (Zhang et al., ICLR 2020): the margin lower bound is
  ``beta * CROWN-IBP + (1 - beta) * IBP``, beta going from 1 to 0 during the eps ramp-up.
* ``mixtrain`` -- MixTrain (Wang et al. 2018): adversarial loss plus, with probability
  ``ver_prob``, ``interval_weight`` times the verifiable loss of ``ver_subset`` random points
  of the batch (stochastic robust approximation), the weight growing after the ramp-up (as in
  HYDRA's ``trainer/mixtrain.py``).

Schedules: the trainer calls :meth:`Objective.set_progress` with the fraction of the stage
done before every batch. eps ramps linearly from 0 to its value between ``ramp_start`` and
``ramp_start + ramp_length`` (fractions of the stage); kappa (and CROWN-IBP's beta) follow the
same ramp. An objective used outside a trainer is at the end of its schedule (full eps).
Bounds are L∞ only; see :mod:`advprune.certify.bounds` for the supported layers.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advprune._validation import check_eps, check_norm, parse_number
from advprune.attacks.pgd import (
    PGD,
    check_model_mode,
    check_step_size,
    check_steps,
    model_mode_scope,
    projected_gradient_ascent,
)
from advprune.certify.bounds import DEFAULT_MAX_CROWN_NEURONS, BoundedModel, check_bound_method
from advprune.certify.smoothing import check_sigma
from advprune.distributed import local_module
from advprune.errors import ConfigError, UnknownNameError
from advprune.training.objectives import (
    Objective,
    ObjectiveOutput,
    create_objective,
    register_objective,
)

__all__ = [
    "CERTIFIED_OBJECTIVES",
    "SMOOTH_VARIANTS",
    "CROWNIBPTraining",
    "IBPTraining",
    "MixTrain",
    "SmoothTraining",
    "objective_from_config",
    "ramp_fraction",
    "robust_cross_entropy",
]

SMOOTH_VARIANTS = ("gaussian", "stability", "consistency", "adversarial")


def ramp_fraction(progress: float, start: float, length: float) -> float:
    """Linear ramp in [0, 1]: 0 before ``start``, 1 after ``start + length``."""
    if length <= 0:
        return 1.0 if progress >= start else 0.0
    return min(max((progress - start) / length, 0.0), 1.0)


def _fraction(value: Any, name: str) -> float:
    v = parse_number(value, name)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_ramp(ramp_start: Any, ramp_length: Any) -> tuple[float, float]:
    start, length = _fraction(ramp_start, "ramp_start"), _fraction(ramp_length, "ramp_length")
    if start + length > 1.0 + 1e-9:
        raise ConfigError(
            f"ramp_start + ramp_length = {start + length:g} > 1: the eps ramp-up must end "
            "within the stage"
        )
    return start, length


def _linf_only(norm: str, name: str) -> None:
    if check_norm(norm) != "linf":
        raise ConfigError(f"objective {name!r} bounds L∞ balls only; use --norm linf")


def robust_cross_entropy(lower: Tensor, y: Tensor) -> Tensor:
    """``CE(-lower, y)``: cross-entropy of the worst-case logits given the lower bounds of the
    margins ``z_y - z_j`` (row ``y`` is 0), the verifiable loss of IBP / CROWN-IBP."""
    return F.cross_entropy(-lower, y)


class _BoundObjective(Objective):
    """Shared eps schedule, bound cache and model check of the verifiable objectives."""

    method_default = "ibp"

    def __init__(
        self,
        eps: str | float,
        ramp_start: float,
        ramp_length: float,
        norm: str,
        max_crown_neurons: int,
    ) -> None:
        _linf_only(norm, self.name)
        self.eps = check_eps(eps, "linf")
        self.eps_text = str(eps)
        self.ramp_start, self.ramp_length = _check_ramp(ramp_start, ramp_length)
        self.max_crown_neurons = _count(max_crown_neurons, "max_crown_neurons")
        self.progress = 1.0
        self._bounded: weakref.WeakKeyDictionary[nn.Module, BoundedModel] = (
            weakref.WeakKeyDictionary()
        )

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    @property
    def ramp(self) -> float:
        """Where the schedule is: 0 before the ramp-up, 1 after it."""
        return ramp_fraction(self.progress, self.ramp_start, self.ramp_length)

    @property
    def current_eps(self) -> float:
        """The eps of the current batch."""
        return self.eps * self.ramp

    def bound_methods(self) -> tuple[str, ...]:
        """The bound methods this objective runs (checked against the model)."""
        return (self.method_default,)

    def bounded(self, model: nn.Module) -> BoundedModel:
        """The traced model (traced once per model object)."""
        found = self._bounded.get(model)
        if found is None:
            found = BoundedModel(model, max_crown_neurons=self.max_crown_neurons)
            self._bounded[model] = found
        return found

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        """Raise a one-line ConfigError now if the bounds cannot handle ``model`` (called by
        the workflow before training starts)."""
        bm = self.bounded(model)
        for method in self.bound_methods():
            bm.check_method(method, input_shape)

    def schedule_config(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "eps_text": self.eps_text,
            "norm": "linf",
            "ramp_start": self.ramp_start,
            "ramp_length": self.ramp_length,
        }


class _KappaObjective(_BoundObjective):
    """``kappa * CE(clean) + (1 - kappa) * CE(worst case)`` with kappa following the ramp."""

    kappa_defaults = (1.0, 0.5)
    distributed: ClassVar[bool] = False  # the bounds run on the traced local module

    def __init__(
        self,
        eps: str | float = "8/255",
        kappa_start: float | None = None,
        kappa_end: float | None = None,
        ramp_start: float = 0.0,
        ramp_length: float = 0.5,
        norm: str = "linf",
        max_crown_neurons: int = DEFAULT_MAX_CROWN_NEURONS,
    ) -> None:
        super().__init__(eps, ramp_start, ramp_length, norm, max_crown_neurons)
        k0, k1 = self.kappa_defaults
        self.kappa_start = _fraction(k0 if kappa_start is None else kappa_start, "kappa_start")
        self.kappa_end = _fraction(k1 if kappa_end is None else kappa_end, "kappa_end")

    @property
    def current_kappa(self) -> float:
        """Weight of the natural loss for the current batch."""
        return self.kappa_start + (self.kappa_end - self.kappa_start) * self.ramp

    def lower_bounds(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(clean logits, margin lower bounds) at the current eps."""
        r = self.bounded(model).compute(
            x, self.current_eps, method=self.method_default, labels=y, upper=False
        )
        return r.clean, r.lower

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        clean, lower = self.lower_bounds(model, x, y)
        kappa = self.current_kappa
        loss = (1 - kappa) * robust_cross_entropy(lower, y)
        if kappa > 0:
            loss = loss + kappa * F.cross_entropy(clean, y)
        return ObjectiveOutput(loss, -lower.detach())

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.schedule_config(),
            "kappa_start": self.kappa_start,
            "kappa_end": self.kappa_end,
            "max_crown_neurons": self.max_crown_neurons,
        }


@register_objective("ibp")
class IBPTraining(_KappaObjective):
    """IBP training (Gowal et al., "On the Effectiveness of Interval Bound Propagation for
    Training Verifiably Robust Models", 2018)::

        loss = kappa * CE(f(x), y) + (1 - kappa) * CE(-lower_IBP(z_y - z_j), y)

    eps ramps from 0 to ``eps`` between ``ramp_start`` and ``ramp_start + ramp_length``
    (fractions of the stage) while kappa goes from ``kappa_start`` (1) to ``kappa_end``
    (0.5, Gowal et al.). Returns the worst-case logits ``-lower`` (their accuracy is the
    verified training accuracy).

    Args:
        eps: L∞ radius in [0, 1], default ``"8/255"``.
        kappa_start, kappa_end: natural-loss weight before / after the ramp (1, 0.5).
        ramp_start, ramp_length: the eps ramp-up as fractions of the stage (0, 0.5).
        norm: ``"linf"`` only.
        max_crown_neurons: unused by IBP (kept for a uniform interface).
    """


@register_objective("crown-ibp")
class CROWNIBPTraining(_KappaObjective):
    """CROWN-IBP training (Zhang et al., "Towards Stable and Efficient Training of Verifiably
    Robust Neural Networks", ICLR 2020)::

        lower = beta * lower_CROWN-IBP + (1 - beta) * lower_IBP
        loss  = kappa * CE(f(x), y) + (1 - kappa) * CE(-lower, y)

    beta goes from ``beta_start`` (1) to ``beta_end`` (0) and kappa from ``kappa_start`` (1)
    to ``kappa_end`` (0) during the eps ramp-up (as the paper and HYDRA's
    ``trainer/crown-ibp.py``, where beta = 1 - eps_t / eps); once beta is 0 only IBP runs.

    Args:
        eps, ramp_start, ramp_length, norm: as :class:`IBPTraining`.
        kappa_start, kappa_end: default 1 and 0.
        beta_start, beta_end: default 1 and 0.
        max_crown_neurons: unused (CROWN-IBP's intermediate bounds are IBP's).
    """

    kappa_defaults = (1.0, 0.0)
    method_default = "crown-ibp"

    def __init__(
        self,
        eps: str | float = "8/255",
        kappa_start: float | None = None,
        kappa_end: float | None = None,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        ramp_start: float = 0.0,
        ramp_length: float = 0.5,
        norm: str = "linf",
        max_crown_neurons: int = DEFAULT_MAX_CROWN_NEURONS,
    ) -> None:
        super().__init__(
            eps, kappa_start, kappa_end, ramp_start, ramp_length, norm, max_crown_neurons
        )
        self.beta_start = _fraction(beta_start, "beta_start")
        self.beta_end = _fraction(beta_end, "beta_end")

    @property
    def current_beta(self) -> float:
        """Weight of the CROWN-IBP bound for the current batch."""
        return self.beta_start + (self.beta_end - self.beta_start) * self.ramp

    def lower_bounds(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.current_beta
        method = "crown-ibp" if beta >= 1e-5 else "ibp"
        r = self.bounded(model).compute(
            x, self.current_eps, method=method, labels=y, upper=False, intersect=False
        )
        if method == "ibp":
            return r.clean, r.ibp_lower
        return r.clean, beta * r.lower + (1 - beta) * r.ibp_lower

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta_start": self.beta_start, "beta_end": self.beta_end}


@register_objective("mixtrain")
class MixTrain(_BoundObjective):
    """MixTrain (Wang et al., "MixTrain: Scalable Training of Verifiably Robust Neural
    Networks", 2018), as HYDRA uses it::

        loss = CE(f(x_adv), y) + [u < ver_prob] * w(t) * CE(-lower(margins of x[S]), y[S])

    ``x_adv``: PGD (``steps`` steps of ``step_size``) on ``adv_subset`` random points of the
    batch (all by default), or the clean batch with ``adversarial=False`` (HYDRA's released
    code, which uses natural cross-entropy there). ``S``: ``ver_subset`` random points of the
    batch (stochastic robust approximation); ``u ~ U(0, 1)`` per batch (HYDRA: 0.8).
    ``lower``: the ``bound`` method's margin bounds (HYDRA: symbolic intervals; here
    ``crown-ibp`` by default, or ``ibp`` / ``crown``) at the ramped eps. The weight
    ``w(t) = min(interval_weight * weight_growth ** floor((t - ramp_end) / growth_every),
    weight_max)`` after the ramp-up (HYDRA: 0.1, x2.5 every 5 epochs, at most 50).

    Args:
        eps: L∞ radius (both losses), default ``"8/255"``.
        step_size, steps, attack_mode: the PGD attack (default step ``2.5 * eps / steps``).
        adversarial: use PGD examples (True) or the clean batch (False) in the first term.
        adv_subset: points of the batch attacked (None: all).
        ver_subset: points bounded per batch (HYDRA: 5 for its small CNN, 1 for the large).
        ver_prob: probability that a batch gets the verifiable term.
        interval_weight, weight_growth, growth_every, weight_max: the weight schedule;
            ``growth_every`` is a fraction of the stage.
        bound: ``"crown-ibp"`` (default), ``"ibp"`` or ``"crown"``.
        ramp_start, ramp_length: the eps ramp (fractions of the stage; HYDRA 10 of 60 epochs).
        norm: ``"linf"`` only.
        max_crown_neurons: limit for ``bound="crown"``.
    """

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        steps: int = 10,
        attack_mode: str = "eval",
        adversarial: bool = True,
        adv_subset: int | None = None,
        ver_subset: int = 5,
        ver_prob: float = 0.8,
        interval_weight: float = 0.1,
        weight_growth: float = 2.5,
        growth_every: float = 5 / 60,
        weight_max: float = 50.0,
        bound: str = "crown-ibp",
        ramp_start: float = 0.0,
        ramp_length: float = 10 / 60,
        norm: str = "linf",
        max_crown_neurons: int = DEFAULT_MAX_CROWN_NEURONS,
    ) -> None:
        super().__init__(eps, ramp_start, ramp_length, norm, max_crown_neurons)
        self.steps = check_steps(steps)
        self.step_size = (
            2.5 * self.eps / self.steps if step_size is None else check_step_size(step_size)
        )
        self.attack_mode = check_model_mode(attack_mode, "attack_mode")
        if not isinstance(adversarial, bool):
            raise ConfigError(f"adversarial must be true or false, got {adversarial!r}")
        self.adversarial = adversarial
        self.adv_subset = None if adv_subset is None else _count(adv_subset, "adv_subset")
        self.ver_subset = _count(ver_subset, "ver_subset")
        self.ver_prob = _fraction(ver_prob, "ver_prob")
        self.interval_weight = parse_number(interval_weight, "interval_weight")
        self.weight_growth = parse_number(weight_growth, "weight_growth")
        self.growth_every = parse_number(growth_every, "growth_every")
        self.weight_max = parse_number(weight_max, "weight_max")
        if self.interval_weight < 0 or self.weight_growth < 1 or self.weight_max < 0:
            raise ConfigError("interval_weight and weight_max must be >= 0, weight_growth >= 1")
        if self.growth_every <= 0:
            raise ConfigError(
                f"growth_every must be > 0 (a fraction of the stage), got {growth_every!r}"
            )
        self.bound = check_bound_method(bound)
        self.attack = PGD(
            eps=self.eps, step_size=self.step_size, steps=self.steps, model_mode=self.attack_mode
        )

    def bound_methods(self) -> tuple[str, ...]:
        return (self.bound,)

    @property
    def current_weight(self) -> float:
        """Weight of the verifiable term for the current batch."""
        after = max(self.progress - (self.ramp_start + self.ramp_length), 0.0)
        steps = math.floor(after / self.growth_every + 1e-9)
        return min(self.interval_weight * self.weight_growth**steps, self.weight_max)

    def _subset(self, n: int, k: int | None, device: torch.device) -> Tensor | None:
        if k is None or k >= n:
            return None
        return torch.randperm(n, device=device)[:k]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        idx = self._subset(x.shape[0], self.adv_subset, x.device)
        xa, ya = (x, y) if idx is None else (x[idx], y[idx])
        local = local_module(model)  # attack and bounds: not through DDP's hooks
        if self.adversarial and self.eps > 0:
            xa = self.attack(local, xa, ya)
        logits = model(xa)
        loss = F.cross_entropy(logits, ya)
        if self.ver_prob > 0 and float(torch.rand(())) < self.ver_prob:
            sub = self._subset(x.shape[0], self.ver_subset, x.device)
            rows = torch.arange(x.shape[0], device=x.device) if sub is None else sub
            r = self.bounded(local).compute(
                x, self.current_eps, method=self.bound, labels=y[rows], upper=False, subset=rows
            )
            loss = loss + self.current_weight * robust_cross_entropy(r.lower, y[rows])
        if idx is not None:  # logits for every point of the batch (training accuracy)
            with torch.no_grad(), model_mode_scope(local, "eval"):
                logits = local(x)
        return ObjectiveOutput(loss, logits)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.schedule_config(),
            "step_size": self.step_size,
            "steps": self.steps,
            "attack_mode": self.attack_mode,
            "adversarial": self.adversarial,
            "adv_subset": self.adv_subset,
            "ver_subset": self.ver_subset,
            "ver_prob": self.ver_prob,
            "interval_weight": self.interval_weight,
            "weight_growth": self.weight_growth,
            "growth_every": self.growth_every,
            "weight_max": self.weight_max,
            "bound": self.bound,
            "max_crown_neurons": self.max_crown_neurons,
        }


class _NoisyAverage(nn.Module):
    """``log mean_i softmax(f(x + δ_i))`` for fixed noise ``δ`` (N, m, ...): the soft
    smoothed classifier SmoothAdv attacks."""

    def __init__(self, model: nn.Module, noise: Tensor) -> None:
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, x: Tensor) -> Tensor:
        n, m = self.noise.shape[:2]
        noisy = (x.unsqueeze(1) + self.noise).reshape(n * m, *x.shape[1:])
        probs = F.softmax(self.model(noisy).float(), dim=1).view(n, m, -1).mean(1)
        return probs.clamp_min(1e-12).log()


@register_objective("smooth")
class SmoothTraining(Objective):
    """Training for randomized smoothing with Gaussian noise of std ``sigma``.

    Variants (``variant``), with ``m = noise_samples`` noisy copies ``x + δ_i``,
    ``δ_i ~ N(0, sigma² I)`` (inputs in [0, 1], noise not clipped):

    * ``"gaussian"`` (Cohen et al. 2019): ``mean_i CE(f(x + δ_i), y)``.
    * ``"stability"`` (HYDRA's ``trainer/smooth.py``): ``CE(f(x), y) + beta *
      KL(softmax f(x) || softmax f(x + δ))`` (batch mean; beta default 6).
    * ``"consistency"`` (Jeong & Shin, "Consistency Regularization for Certified Robustness of
      Smoothed Classifiers", NeurIPS 2020), m >= 2: ``mean_i CE(f(x + δ_i), y) + beta *
      mean_i KL(p̂ || p_i) + eta * H(p̂)`` with ``p̂ = mean_i p_i`` (beta default 10, eta 0.5).
    * ``"adversarial"`` (SmoothAdv, Salman et al. 2019): ``x'`` maximises
      ``-log mean_i softmax(f(x' + δ_i))_y`` over the L2 ball of radius ``eps`` (``steps``
      projected steps, the same ``δ_i`` throughout), then ``mean_i CE(f(x' + δ_i), y)``.

    Returns the mean logits over the noisy copies (the clean logits for ``stability``).

    Args:
        sigma: noise std, > 0 (default 0.25, HYDRA's CIFAR-10 setting).
        variant: one of ``gaussian``, ``stability``, ``consistency``, ``adversarial``.
        noise_samples: m (default 1; 2 for ``consistency``).
        beta: weight of the stability / consistency term (default 6 / 10).
        eta: entropy weight of ``consistency`` (0.5).
        eps, step_size, steps, attack_mode: SmoothAdv's L2 attack (eps default 0.25, step
            ``2 * eps / steps``, 1 step).
    """

    def __init__(
        self,
        sigma: str | float = 0.25,
        variant: str = "gaussian",
        noise_samples: int | None = None,
        beta: float | None = None,
        eta: float = 0.5,
        eps: str | float = 0.25,
        step_size: str | float | None = None,
        steps: int = 1,
        attack_mode: str = "eval",
    ) -> None:
        self.sigma = check_sigma(sigma)
        if variant not in SMOOTH_VARIANTS:
            raise UnknownNameError("smoothing variant", str(variant), SMOOTH_VARIANTS)
        self.variant = variant
        default_m = 2 if variant == "consistency" else 1
        self.noise_samples = _count(default_m if noise_samples is None else noise_samples,
                                    "noise_samples")  # fmt: skip
        if variant == "consistency" and self.noise_samples < 2:
            raise ConfigError("the consistency variant needs noise_samples >= 2")
        if variant == "stability" and self.noise_samples != 1:
            raise ConfigError("the stability variant uses one noisy copy; set noise_samples 1")
        default_beta = {"stability": 6.0, "consistency": 10.0}.get(variant, 0.0)
        self.beta = default_beta if beta is None else parse_number(beta, "beta")
        self.eta = parse_number(eta, "eta")
        if self.beta < 0 or self.eta < 0:
            raise ConfigError("beta and eta must be >= 0")
        self.eps = check_eps(eps, "l2")
        self.steps = check_steps(steps)
        self.step_size = (
            2.0 * self.eps / self.steps if step_size is None else check_step_size(step_size)
        )
        self.attack_mode = check_model_mode(attack_mode, "attack_mode")

    def _noise(self, x: Tensor) -> Tensor:
        return self.sigma * torch.randn((x.shape[0], self.noise_samples, *x.shape[1:]),
                                        device=x.device, dtype=x.dtype)  # fmt: skip

    def _noisy_logits(self, model: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
        n, m = noise.shape[:2]
        noisy = (x.unsqueeze(1) + noise).reshape(n * m, *x.shape[1:])
        return model(noisy).view(n, m, -1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        noise = self._noise(x)
        if self.variant == "stability":
            logits = model(x)
            noisy = model(x + noise[:, 0])
            kl = F.kl_div(
                F.log_softmax(noisy, dim=1), F.softmax(logits, dim=1), reduction="batchmean"
            )
            return ObjectiveOutput(F.cross_entropy(logits, y) + self.beta * kl, logits)
        if self.variant == "adversarial" and self.eps > 0:
            with model_mode_scope(model, self.attack_mode):
                x = projected_gradient_ascent(
                    _NoisyAverage(local_module(model), noise),
                    x,
                    y,
                    lambda logp, t: F.nll_loss(logp, t, reduction="sum"),
                    eps=self.eps,
                    step_size=self.step_size,
                    steps=self.steps,
                    norm="l2",
                )
        logits = self._noisy_logits(model, x, noise)  # (N, m, K)
        n, m, k = logits.shape
        ce = F.cross_entropy(logits.reshape(n * m, k), y.repeat_interleave(m))
        loss = ce
        if self.variant == "consistency":
            log_p = F.log_softmax(logits, dim=2)
            p_mean = log_p.exp().mean(1)
            log_mean = p_mean.clamp_min(1e-12).log()
            kl = (p_mean.unsqueeze(1) * (log_mean.unsqueeze(1) - log_p)).sum(2).mean()
            entropy = -(p_mean * log_mean).sum(1).mean()
            loss = ce + self.beta * kl + self.eta * entropy
        return ObjectiveOutput(loss, logits.mean(1))

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "name": self.name,
            "sigma": self.sigma,
            "variant": self.variant,
            "noise_samples": self.noise_samples,
        }
        if self.variant in ("stability", "consistency"):
            cfg["beta"] = self.beta
        if self.variant == "consistency":
            cfg["eta"] = self.eta
        if self.variant == "adversarial":
            cfg.update(
                eps=self.eps, norm="l2", step_size=self.step_size, steps=self.steps,
                attack_mode=self.attack_mode,
            )  # fmt: skip
        return cfg


CERTIFIED_OBJECTIVES = ("smooth", "ibp", "crown-ibp", "mixtrain")


def objective_from_config(cfg: Any) -> Objective:
    """The certified objective named by ``cfg.objective`` built from a
    :class:`~advprune.config.RunConfig` (settings left unset keep the objective's defaults;
    ``cfg.objective_options`` are passed on as keyword arguments)."""
    name = cfg.objective
    given = cfg.model_fields_set
    kw: dict[str, Any] = {}
    if name not in CERTIFIED_OBJECTIVES:
        raise UnknownNameError("certified objective", name, CERTIFIED_OBJECTIVES)
    if name == "smooth":
        kw["variant"] = cfg.smooth_variant
        if cfg.sigma is not None:
            kw["sigma"] = cfg.sigma
        if cfg.noise_samples is not None:
            kw["noise_samples"] = cfg.noise_samples
        if "beta" in given:
            kw["beta"] = cfg.beta
        if cfg.smooth_variant == "adversarial":
            if cfg.norm != "l2":
                raise ConfigError(
                    "the adversarial smoothing variant attacks in L2: pass --norm l2 and an L2 "
                    "--eps (e.g. 0.25)"
                )
            kw.update(eps=cfg.eps_text(), attack_mode=cfg.attack_mode)
            if "attack_steps" in given:
                kw["steps"] = cfg.attack_steps
            if cfg.step_size is not None:
                kw["step_size"] = cfg.step_size
    else:
        kw.update(eps=cfg.eps_text(), norm=cfg.norm, ramp_start=cfg.ramp_start)
        if cfg.ramp_length is not None:
            kw["ramp_length"] = cfg.ramp_length
        if name == "mixtrain":
            kw.update(
                steps=cfg.attack_steps,
                step_size=cfg.step_size_value(cfg.attack_steps),
                attack_mode=cfg.attack_mode,
                bound=cfg.bound,
            )
            if cfg.ver_subset is not None:
                kw["ver_subset"] = cfg.ver_subset
        else:
            for key in ("kappa_start", "kappa_end"):
                if getattr(cfg, key) is not None:
                    kw[key] = getattr(cfg, key)
    kw.update(cfg.objective_options)
    return create_objective(name, **kw)
