"""Fast Minimum-Norm attack (FMN), assembled from parts: loss, optimizer, step-size scheduler.

FMN (Pintor et al., NeurIPS 2021) looks for the *smallest* perturbation that changes the
prediction, for the L0, L1, L2 and L∞ norms. The modular form (loss x optimizer x scheduler)
follows HO-FMN (Mura et al., "HO-FMN: Hyperparameter Optimization for Fast Minimum-Norm
Attacks", 2024), whose search over these parts lives in :mod:`advprune.evaluation.hofmn`.

The default configuration (logit-difference loss, SGD, cosine step size, gamma 0.05) is the
original FMN, as in foolbox's ``LInfFMNAttack`` / ``L2FMNAttack``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advprune._validation import check_unit_range, parse_number
from advprune.attacks.pgd import check_model_mode, check_step_size, check_steps, model_mode_scope
from advprune.errors import ConfigError, UnknownNameError

__all__ = [
    "FMN",
    "FMN_LOSSES",
    "FMN_NORMS",
    "FMN_OPTIMIZERS",
    "FMN_SCHEDULERS",
    "FMNResult",
    "check_fmn_norm",
    "lp_distance",
    "project_lp_ball",
]

FMN_NORMS: tuple[str, ...] = ("l0", "l1", "l2", "linf")
FMN_LOSSES: tuple[str, ...] = ("logit_diff", "ce", "dlr")
FMN_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamax")
FMN_SCHEDULERS: tuple[str, ...] = ("cosine", "plateau", "constant")

_P = {"l0": 0.0, "l1": 1.0, "l2": 2.0, "linf": math.inf}
_DUAL = {"l1": math.inf, "l2": 2.0, "linf": 1.0}
_TINY = 1e-12


def check_fmn_norm(norm: str) -> str:
    """Canonical FMN norm name (``l0``, ``l1``, ``l2``, ``linf``; ``inf``, ``2`` ... accepted)."""
    canon = str(norm).strip().lower().replace("∞", "inf").replace("_", "")
    canon = {"inf": "linf", "linfinity": "linf", "0": "l0", "1": "l1", "2": "l2"}.get(canon, canon)
    if canon not in FMN_NORMS:
        raise UnknownNameError("norm", str(norm), FMN_NORMS)
    return canon


def _choice(value: str, valid: tuple[str, ...], kind: str) -> str:
    canon = str(value).strip().lower().replace("-", "_")
    canon = {"ll": "logit_diff", "calr": "cosine", "rlrop": "plateau", "none": "constant"}.get(
        canon, canon
    )
    if canon not in valid:
        raise UnknownNameError(kind, str(value), valid)
    return canon


# ------------------------------------------------------------------------------ geometry


def lp_distance(delta: Tensor, norm: str) -> Tensor:
    """Per-sample Lp norm of ``delta`` (N, ...), in float64, shape (N,).

    L0 counts the non-zero elements (every channel of every pixel counts once).
    """
    flat = delta.detach().flatten(1).double()
    if norm == "l0":
        return (flat != 0).sum(1).double()
    return flat.norm(p=_P[norm], dim=1)


def _project_l1(flat: Tensor, eps: Tensor) -> Tensor:
    """Euclidean projection of each row onto the L1 ball of radius ``eps`` (Duchi et al. 2008)."""
    absolute = flat.abs()
    inside = absolute.sum(1) <= eps
    if bool(inside.all()):
        return flat
    eps_f = eps.clamp(max=torch.finfo(flat.dtype).max).to(flat.dtype).unsqueeze(1)
    mu = absolute.sort(dim=1, descending=True).values
    cumsum = mu.cumsum(1)
    ks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu * ks > cumsum - eps_f
    rho = ((cond.to(flat.dtype) * ks).amax(1) - 1).clamp(min=0).long()
    theta = (cumsum.gather(1, rho.unsqueeze(1)) - eps_f) / (rho.unsqueeze(1) + 1).to(flat.dtype)
    proj = flat.sign() * (absolute - theta).clamp(min=0)
    return torch.where(inside.unsqueeze(1), flat, proj)


def _project_l0(flat: Tensor, eps: Tensor) -> Tensor:
    """Keep the ``floor(eps)`` largest-magnitude elements of each row, zero the rest."""
    d = flat.shape[1]
    k = eps.clamp(min=0, max=d).floor().long()
    if bool((k >= d).all()):
        return flat
    ranks = flat.abs().argsort(dim=1, descending=True).argsort(dim=1)
    return torch.where(ranks < k.unsqueeze(1), flat, torch.zeros_like(flat))


def project_lp_ball(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Project each sample of ``delta`` (N, ...) onto the Lp ball of radius ``eps[i]``.

    ``eps`` has shape (N,) and may hold ``inf`` (no constraint). L∞: clamp; L2: rescale;
    L1: Euclidean projection (Duchi et al. 2008); L0: keep the ``floor(eps)`` largest entries.
    """
    flat = delta.flatten(1)
    eps = eps.to(flat.device)
    if norm == "linf":
        e = eps.to(flat.dtype).unsqueeze(1)
        out = torch.maximum(torch.minimum(flat, e), -e)
    elif norm == "l2":
        norms = flat.norm(p=2, dim=1).double().clamp(min=_TINY)
        factor = torch.clamp(eps.double() / norms, max=1.0).to(flat.dtype)
        out = flat * factor.unsqueeze(1)
    elif norm == "l1":
        out = _project_l1(flat, eps.double())
    else:
        out = _project_l0(flat, eps)
    return out.view_as(delta)


# ------------------------------------------------------------------------------ losses


def _logit_difference(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per sample: > 0 while correctly classified."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), -math.inf).amax(1)
    return true - other


def _dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020), to minimise:
    ``(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``."""
    if logits.shape[1] < 3:
        raise ConfigError("the DLR loss needs at least 3 classes; use loss='logit_diff'")
    ordered = logits.sort(dim=1).values
    return _logit_difference(logits, y) / (ordered[:, -1] - ordered[:, -3] + _TINY)


def _neg_ce(logits: Tensor, y: Tensor) -> Tensor:
    return -F.cross_entropy(logits, y, reduction="none")


_LOSS_FNS = {"logit_diff": _logit_difference, "ce": _neg_ce, "dlr": _dlr}


# ------------------------------------------------------------------------------ optimizers
# Vectorised over samples: every sample has its own step size (needed by the per-sample
# reduce-on-plateau schedule); with a common step size they equal torch.optim's SGD, Adam and
# Adamax (checked in the tests).


class _Optimizer:
    def __init__(self, weight_decay: float) -> None:
        self.weight_decay = weight_decay
        self.t = 0

    def step(self, delta: Tensor, grad: Tensor, lr: Tensor) -> Tensor:
        """Return ``delta`` after one descent step on ``grad`` with per-sample ``lr`` (N, 1...)."""
        self.t += 1
        if self.weight_decay:
            grad = grad + self.weight_decay * delta
        return delta - lr * self._direction(grad)

    def _direction(self, grad: Tensor) -> Tensor:
        raise NotImplementedError


class _SGD(_Optimizer):
    def __init__(self, weight_decay: float, momentum: float, dampening: float) -> None:
        super().__init__(weight_decay)
        self.momentum, self.dampening = momentum, dampening
        self.buf: Tensor | None = None

    def _direction(self, grad: Tensor) -> Tensor:
        if not self.momentum:
            return grad
        if self.buf is None:
            self.buf = grad.clone()
        else:
            self.buf = self.momentum * self.buf + (1 - self.dampening) * grad
        return self.buf


class _Adam(_Optimizer):
    def __init__(self, weight_decay: float, beta1: float, beta2: float, eps: float = 1e-8):
        super().__init__(weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def _moments(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        return self.m, self.v

    def _direction(self, grad: Tensor) -> Tensor:
        m, v = self._moments(grad)
        self.v = self.beta2 * v + (1 - self.beta2) * grad * grad
        v_hat = self.v / (1 - self.beta2**self.t)
        return (m / (1 - self.beta1**self.t)) / (v_hat.sqrt() + self.eps)


class _Adamax(_Adam):
    def _direction(self, grad: Tensor) -> Tensor:
        m, v = self._moments(grad)
        self.v = torch.maximum(self.beta2 * v, grad.abs() + self.eps)
        return m / (1 - self.beta1**self.t) / self.v


# ------------------------------------------------------------------------------ the attack


@dataclass
class FMNResult:
    """What :meth:`FMN.run` found.

    Attributes:
        x_adv: (N, ...) the smallest adversarial example found, ``x`` where none was found.
        distance: (N,) float64 Lp norm of ``x_adv - x``: 0 where ``x`` is already misclassified,
            ``inf`` where no adversarial example was found.
        best_history: (steps + 1, N) float32, the best distance after each step (``inf`` until
            the first adversarial example), for convergence checks.
    """

    x_adv: Tensor
    distance: Tensor
    best_history: Tensor

    @property
    def success(self) -> Tensor:
        """(N,) bool: an adversarial example was found."""
        return torch.isfinite(self.distance)


class FMN:
    """Fast Minimum-Norm attack (FMN), with a pluggable loss, optimizer and step-size schedule.

    Finds, for each input, an adversarial example of small Lp norm in the image box
    ``[0, 1]``. Every step the perturbation ``delta`` moves along the L2-normalised gradient of
    the loss through the optimizer, and is projected onto an Lp ball of radius ``epsilon``
    adapted per sample: shrunk by the factor ``1 - gamma`` while the current point is
    adversarial, grown by ``1 + gamma`` otherwise once an adversarial point was seen, and
    before that set from a linear estimate of the distance to the decision boundary (the
    logit-difference loss only; other losses leave the ball unbounded until the first success).
    ``gamma`` decays from ``gamma`` to ``gamma_final`` on a cosine. The smallest adversarial
    point seen is returned. Deterministic (no random start).

    Parameters
    ----------
    norm : str
        ``"l0"``, ``"l1"``, ``"l2"`` or ``"linf"`` (default). L0 counts changed elements.
    steps : int
        Number of steps, >= 1. Default 100 (HO-FMN tunes with 100, evaluates with 200).
    loss : str
        Loss minimised per sample: ``"logit_diff"`` (default; ``z_y - max_{j != y} z_j``),
        ``"ce"`` (negative cross-entropy) or ``"dlr"`` (difference of logits ratio, >= 3
        classes).
    optimizer : str
        ``"sgd"`` (default), ``"adam"`` or ``"adamax"``, each with a step size per sample.
    scheduler : str
        Step-size schedule: ``"cosine"`` (default; ``step_size`` to ``min_step_size``),
        ``"plateau"`` (per-sample reduce-on-plateau on the loss) or ``"constant"``.
    step_size : float or str
        Initial step size (the optimizer's learning rate). Default 1.0.
    min_step_size : float or str, optional
        Final step size of the cosine schedule and floor of the plateau schedule. Default
        ``step_size / 100``.
    gamma, gamma_final : float
        Initial and final rate of change of ``epsilon``. Defaults 0.05 and 0.001.
    momentum, dampening : float
        SGD only. Defaults 0.
    beta1, beta2 : float
        Adam and Adamax only. Defaults 0.9 and 0.999.
    weight_decay : float
        L2 penalty on ``delta`` added to the gradient (pulls towards smaller perturbations).
        Default 0.
    plateau_factor, plateau_patience, plateau_threshold : float, int, float
        Plateau schedule: multiply a sample's step size by ``plateau_factor`` once its loss has
        not improved by a relative ``plateau_threshold`` for more than ``plateau_patience``
        steps. Defaults 0.5, 5, 1e-4.
    model_mode : str
        ``"eval"`` (default), ``"train"`` or ``"keep"``; see :class:`advprune.attacks.PGD`.

    Call ``attack(model, x, y)`` with ``x`` (N, ...) in ``[0, 1]`` and ``y`` (N,) int64
    labels; it returns the adversarial examples (N, ...), ``x`` where none was found.
    :meth:`run` also returns the distances (``inf`` on failure, 0 where ``x`` is already
    misclassified).

    References
    ----------
    M. Pintor, F. Roli, W. Brendel, B. Biggio, "Fast Minimum-norm Adversarial Attacks through
    Adaptive Norm Constraints", NeurIPS 2021. R. Mura, G. Floris, L. Scionis, G. Piras,
    M. Pintor, A. Demontis, G. Giacinto, B. Biggio, F. Roli, "HO-FMN: Hyperparameter
    Optimization for Fast Minimum-Norm Attacks", Neurocomputing 2025.

    Examples
    --------
    >>> attack = FMN(norm="linf", steps=100)
    >>> result = attack.run(model, x, y)  # doctest: +SKIP
    >>> robust_at_eps = (result.distance > 8 / 255).float().mean()  # doctest: +SKIP
    """

    name = "fmn"

    def __init__(
        self,
        norm: str = "linf",
        steps: int = 100,
        *,
        loss: str = "logit_diff",
        optimizer: str = "sgd",
        scheduler: str = "cosine",
        step_size: float | str = 1.0,
        min_step_size: float | str | None = None,
        gamma: float = 0.05,
        gamma_final: float = 0.001,
        momentum: float = 0.0,
        dampening: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        plateau_threshold: float = 1e-4,
        model_mode: str = "eval",
    ) -> None:
        self.norm = check_fmn_norm(norm)
        self.steps = check_steps(steps)
        self.loss = _choice(loss, FMN_LOSSES, "loss")
        self.optimizer = _choice(optimizer, FMN_OPTIMIZERS, "optimizer")
        self.scheduler = _choice(scheduler, FMN_SCHEDULERS, "scheduler")
        self.step_size = check_step_size(step_size)
        self.min_step_size = (
            self.step_size / 100 if min_step_size is None else check_step_size(min_step_size)
        )
        self.gamma = _unit("gamma", gamma, open_low=True)
        self.gamma_final = _unit("gamma_final", gamma_final)
        self.momentum = _unit("momentum", momentum)
        self.dampening = _unit("dampening", dampening, closed_high=True)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.weight_decay = parse_number(weight_decay, "weight_decay")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.plateau_factor = _unit("plateau_factor", plateau_factor, open_low=True)
        self.plateau_patience = int(plateau_patience)
        if self.plateau_patience < 0:
            raise ConfigError(f"plateau_patience must be >= 0, got {plateau_patience!r}")
        self.plateau_threshold = parse_number(plateau_threshold, "plateau_threshold")
        self.model_mode = check_model_mode(model_mode)

    # -------------------------------------------------------------- public

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial examples (N, ...) for ``model`` at ``(x, y)``; ``x`` where none found."""
        return self.run(model, x, y).x_adv

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> FMNResult:
        """Run the attack; see the class docstring. ``x`` (N, ...) in [0, 1], ``y`` (N,)."""
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ConfigError(
                f"labels must have shape (N,) matching inputs (N, ...); "
                f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        check_unit_range(x)
        with (
            model_mode_scope(model, self.model_mode),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            return self._run(model, x.detach().clone(), y.detach().clone())

    def config(self) -> dict[str, Any]:
        """JSON-able settings (only those that apply to the chosen optimizer and schedule)."""
        cfg: dict[str, Any] = {
            "name": self.name,
            "norm": self.norm,
            "steps": self.steps,
            "loss": self.loss,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "step_size": self.step_size,
            "min_step_size": self.min_step_size,
            "gamma": self.gamma,
            "gamma_final": self.gamma_final,
            "weight_decay": self.weight_decay,
            "model_mode": self.model_mode,
        }
        if self.optimizer == "sgd":
            cfg.update(momentum=self.momentum, dampening=self.dampening)
        else:
            cfg.update(beta1=self.beta1, beta2=self.beta2)
        if self.scheduler == "plateau":
            cfg.update(
                plateau_factor=self.plateau_factor,
                plateau_patience=self.plateau_patience,
                plateau_threshold=self.plateau_threshold,
            )
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FMN:
        """Inverse of :meth:`config`."""
        kwargs = {k: v for k, v in config.items() if k != "name"}
        return cls(**kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"FMN({args})"

    # -------------------------------------------------------------- internals

    def _make_optimizer(self) -> _Optimizer:
        if self.optimizer == "sgd":
            return _SGD(self.weight_decay, self.momentum, self.dampening)
        if self.optimizer == "adam":
            return _Adam(self.weight_decay, self.beta1, self.beta2)
        return _Adamax(self.weight_decay, self.beta1, self.beta2)

    def _cosine(self, start: float, end: float, i: int) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * i / self.steps)) / 2

    def _run(self, model: nn.Module, x: Tensor, y: Tensor) -> FMNResult:
        n = x.shape[0]
        norm = self.norm
        view = (n,) + (1,) * (x.dim() - 1)
        loss_fn = _LOSS_FNS[self.loss]
        delta = torch.zeros_like(x)
        if norm == "l0":
            worst = torch.full((n,), float(x[0].numel()), dtype=torch.float64, device=x.device)
            epsilon = torch.ones(n, dtype=torch.float64, device=x.device)
        else:
            worst = lp_distance(torch.maximum(x, 1 - x), norm)
            epsilon = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        best_delta = torch.zeros_like(x)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        lr = torch.full(view, self.step_size, dtype=x.dtype, device=x.device)
        plateau_best = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        plateau_bad = torch.zeros(n, dtype=torch.long, device=x.device)
        optimizer = self._make_optimizer()
        history = torch.empty(self.steps + 1, n, dtype=torch.float32, device=x.device)

        def track(logits: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
            nonlocal best, best_delta, found
            is_adv = logits.argmax(1) != y
            dist = lp_distance(delta, norm)
            better = is_adv & (dist <= best)
            found = found | is_adv
            best = torch.where(better, dist, best)
            best_delta = torch.where(better.view(view), delta.detach(), best_delta)
            return is_adv, dist

        for i in range(self.steps):
            gamma = self._cosine(self.gamma, self.gamma_final, i)
            if self.scheduler == "cosine":
                lr.fill_(self._cosine(self.step_size, self.min_step_size, i))
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = loss_fn(logits.float(), y)
            (grad,) = torch.autograd.grad(loss.sum(), delta, allow_unused=True)
            delta = delta.detach()
            logits = logits.detach()
            if grad is None:
                grad = torch.zeros_like(delta)
            is_adv, dist = track(logits, delta)
            history[i] = best.float()

            if norm == "l0":
                grow = torch.maximum(epsilon + 1, (epsilon * (1 + gamma)).floor())
                shrink = torch.minimum(
                    torch.minimum(epsilon - 1, (epsilon * (1 - gamma)).floor()), best
                )
                epsilon = torch.where(is_adv, shrink, grow).clamp(min=1)
            else:
                if self.loss == "logit_diff":
                    dual = grad.detach().flatten(1).double().norm(p=_DUAL[norm], dim=1)
                    to_boundary = loss.detach().double().abs() / dual.clamp(min=_TINY)
                else:  # no linear estimate of the boundary: unbounded until the first success
                    to_boundary = torch.full_like(dist, math.inf)
                # before the first success the ball follows the boundary estimate but never
                # shrinks (clipping to [0, 1] can otherwise pin it just short of the boundary)
                estimate = dist + to_boundary
                estimate = torch.where(
                    torch.isfinite(epsilon),
                    torch.maximum(estimate, epsilon * (1 + gamma)),
                    estimate,
                )
                epsilon = torch.where(
                    is_adv,
                    torch.minimum(epsilon * (1 - gamma), best),
                    torch.where(found, epsilon * (1 + gamma), estimate),
                )
            epsilon = torch.minimum(epsilon, worst)

            g_norm = grad.flatten(1).norm(p=2, dim=1).clamp(min=_TINY).view(view)
            delta = optimizer.step(delta, grad / g_norm, lr)
            delta = project_lp_ball(delta, epsilon, norm)
            delta = (x + delta).clamp(0.0, 1.0) - x

            if self.scheduler == "plateau":
                lr = self._plateau(loss.detach().double(), lr, plateau_best, plateau_bad)

        with torch.no_grad():
            track(model(x + delta), delta)  # the last iterate counts too
        history[self.steps] = best.float()
        x_adv = (x + best_delta).clamp(0.0, 1.0)
        distance = torch.where(found, lp_distance(x_adv - x, norm), math.inf)
        return FMNResult(x_adv=x_adv.detach(), distance=distance, best_history=history)

    def _plateau(self, loss: Tensor, lr: Tensor, best: Tensor, bad: Tensor) -> Tensor:
        """Per-sample reduce-on-plateau (in place on ``best`` and ``bad``); returns new ``lr``."""
        improved = loss < best - self.plateau_threshold * best.abs().nan_to_num(posinf=0.0)
        best.copy_(torch.where(improved, loss, best))
        bad.copy_(torch.where(improved, torch.zeros_like(bad), bad + 1))
        expired = bad > self.plateau_patience
        bad.masked_fill_(expired, 0)
        flat = lr.flatten()
        reduced = torch.clamp(flat * self.plateau_factor, min=self.min_step_size)
        return torch.where(expired, reduced, flat).view_as(lr)


def _unit(name: str, value: float, *, open_low: bool = False, closed_high: bool = False) -> float:
    """Parse a number in [0, 1) ((0, 1) with ``open_low``; [0, 1] with ``closed_high``)."""
    v = parse_number(value, name)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v <= 1 if closed_high else v < 1
    if not (low_ok and high_ok):
        low = "(0" if open_low else "[0"
        high = "1]" if closed_high else "1)"
        raise ConfigError(f"{name} must be in {low}, {high}, got {value!r}")
    return v
