"""Projected gradient attacks: PGD (Madry et al. 2018) and FGSM-RS (Wong et al. 2020).

All radii are in input units: inputs are images in ``[0, 1]`` (normalisation is the model's
first layer) and ``eps`` is measured on that scale, e.g. ``eps="8/255"`` for L∞.

The loop is written once, in :func:`projected_gradient_ascent`, with a pluggable loss; the
:class:`PGD` and :class:`FGSM` attacks and the TRADES/MART training objectives all use it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advprune._validation import check_eps, check_norm, parse_number
from advprune.errors import ConfigError

__all__ = [
    "FGSM",
    "MODEL_MODES",
    "PGD",
    "LossFn",
    "check_model_mode",
    "check_step_size",
    "check_steps",
    "model_mode_scope",
    "project",
    "projected_gradient_ascent",
    "resolve_loss",
    "sample_random_start",
]

#: Modes the model can be put in while an attack runs (see :class:`PGD`).
MODEL_MODES: tuple[str, ...] = ("eval", "train", "keep")

#: A loss to maximise: ``loss(logits, y) -> scalar`` (a per-sample vector is summed).
LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- validation


def check_model_mode(mode: str, name: str = "model_mode") -> str:
    """Return ``mode`` if it is one of :data:`MODEL_MODES`, else raise :class:`ConfigError`."""
    if mode not in MODEL_MODES:
        raise ConfigError(f"unknown {name} {mode!r}; valid {name}s: {', '.join(MODEL_MODES)}")
    return mode


def check_steps(steps: int | str, name: str = "steps") -> int:
    """Return ``steps`` as an int >= 1 (an int-valued string such as ``"10"`` is accepted)."""
    value: int | None = None
    if not isinstance(steps, bool):
        try:
            value = operator.index(steps)  # type: ignore[arg-type]
        except TypeError:
            if isinstance(steps, str) and steps.strip().lstrip("+").isdigit():
                value = int(steps)
    if value is None:
        raise ConfigError(f"{name} must be an integer >= 1, got {steps!r}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {steps!r}")
    return value


def check_step_size(step_size: str | float, name: str = "step_size") -> float:
    """Parse a step size (``"2/255"`` accepted) and check that it is finite and > 0."""
    value = parse_number(step_size, name)
    if not (value > 0 and value != float("inf")):
        raise ConfigError(f"{name} must be > 0, got {step_size!r}")
    return value


def _cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    # Summed, not averaged: the per-sample gradients are then independent of the batch size,
    # which matters under autocast where a 1/N factor can underflow small gradients to zero.
    return F.cross_entropy(logits.float(), y, reduction="sum")


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Return the loss callable for ``"ce"`` or a user callable; raise on anything else."""
    if callable(loss):
        return loss
    if loss == "ce":
        return _cross_entropy_sum
    raise ConfigError(f"unknown loss {loss!r}; valid losses: 'ce' or a callable loss(logits, y)")


# --------------------------------------------------------------------------- model mode


@contextmanager
def model_mode_scope(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` (``"eval"``, ``"train"`` or ``"keep"``) for the ``with`` block.

    The ``training`` flag of every submodule is recorded first and restored exactly on exit,
    also when the block raises, so a model with, say, frozen BatchNorm layers in eval mode
    inside a model in train mode comes back as it was.
    """
    check_model_mode(mode)
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for module, flag in saved:
            module.training = flag


# --------------------------------------------------------------------------- geometry


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample of ``t`` (N, ...), shaped (N, 1, ..., 1) for broadcasting."""
    norms = t.detach().float().flatten(1).norm(p=2, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the ``eps``-ball around ``x`` and then onto ``[0, 1]``.

    L∞: the perturbation is clamped to ``[-eps, eps]`` element-wise. L2: each sample's
    perturbation is rescaled to norm ``eps`` if it is longer. Clamping to ``[0, 1]`` afterwards
    only moves coordinates towards ``x`` (which is in ``[0, 1]``), so the result lies in both sets.

    Args:
        x_adv: candidate points, shape (N, ...).
        x: centres of the balls, same shape, in ``[0, 1]``.
        eps: radius in input units.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        The projected points, shape (N, ...), dtype of ``x_adv``.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = _per_sample_norm(delta)
        factor = torch.where(norms > eps, eps / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
        delta = delta * factor.to(delta.dtype)
    return (x + delta).clamp(0.0, 1.0)


def sample_random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """Draw a uniformly random point of the ``eps``-ball around each sample, clamped to [0, 1].

    L∞: ``x + U(-eps, eps)`` element-wise. L2: uniform in the ball, i.e. a Gaussian direction
    normalised to unit length times a radius ``eps * U(0, 1) ** (1 / d)`` with ``d`` the number of
    elements of one sample. Uses the global torch RNG (deterministic under ``torch.manual_seed``).

    Args:
        x: clean inputs, shape (N, ...), in ``[0, 1]``.
        eps: radius in input units.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        Starting points, shape and dtype of ``x``.
    """
    if norm == "linf":
        delta = (torch.rand_like(x) * 2.0 - 1.0) * eps
    else:
        direction = torch.randn_like(x, dtype=torch.float32)
        norms = _per_sample_norm(direction).clamp_min(torch.finfo(torch.float32).tiny)
        d = x[0].numel() if x.shape[0] else 1
        radius = eps * torch.rand_like(norms) ** (1.0 / d)
        delta = (direction / norms * radius).to(x.dtype)
    return (x + delta).clamp(0.0, 1.0)


def _ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: sign (L∞) or per-sample normalised gradient (L2)."""
    if norm == "linf":
        return grad.sign()
    norms = _per_sample_norm(grad)
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return (grad.float() * scale).to(grad.dtype)


# --------------------------------------------------------------------------- the loop


def projected_gradient_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    x_init: Tensor | None = None,
) -> Tensor:
    """Maximise ``loss_fn(model(x'), y)`` over the ``eps``-ball around ``x`` within [0, 1].

    The shared loop of every gradient attack in advprune. Each step is::

        x' <- project(x' + step_size * direction(grad_x' loss), x, eps, norm)

    with ``direction`` the gradient sign (L∞) or the per-sample L2-normalised gradient (L2) and
    ``project`` the projection onto the ball and then onto ``[0, 1]`` (:func:`project`). The
    gradient is taken with :func:`torch.autograd.grad` with respect to the input only, so nothing
    is accumulated in the parameters' ``.grad``. The model is run in whatever mode it is in
    (callers use :func:`model_mode_scope`). The last iterate is returned.

    Args:
        model: classifier mapping (N, ...) inputs in [0, 1] to (N, C) logits.
        x: clean inputs, shape (N, ...), in ``[0, 1]``.
        y: second argument of ``loss_fn`` (labels (N,) int64 for cross-entropy, or a target).
        loss_fn: ``loss(logits, y) -> scalar`` to maximise (a per-sample vector is summed).
        eps: radius in input units, already validated.
        step_size: step length in the chosen norm, > 0.
        steps: number of steps, >= 1.
        norm: ``"linf"`` or ``"l2"``.
        x_init: starting point, shape of ``x`` (projected first); ``None`` starts at ``x``.

    Returns:
        Adversarial inputs, detached, same shape, device and dtype as ``x``.
    """
    # inference_mode(False) + enable_grad: works when called under no_grad or inference_mode;
    # the clone turns an inference tensor into an ordinary one.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        if isinstance(y, Tensor) and y.is_inference():
            y = y.clone()
        if eps == 0:
            return x
        x_adv = x.clone() if x_init is None else project(x_init.detach().clone(), x, eps, norm)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            if loss.dim() > 0:
                loss = loss.sum()
            if not loss.requires_grad:
                raise RuntimeError(
                    "the attack loss does not depend on the input; the model must not detach "
                    "its input"
                )
            (grad,) = torch.autograd.grad(loss, x_adv, allow_unused=True)
            x_adv = x_adv.detach()
            if grad is None:  # loss constant in the input: nothing to climb
                continue
            x_adv = project(x_adv + step_size * _ascent_direction(grad, norm), x, eps, norm)
        return x_adv.detach()


# --------------------------------------------------------------------------- attacks


class PGD:
    """Projected gradient descent attack (Madry et al., "Towards Deep Learning Models Resistant
    to Adversarial Attacks", ICLR 2018), for the L∞ and L2 norms.

    Maximises the loss (cross-entropy by default) over the ``eps``-ball around each input,
    intersected with the image box ``[0, 1]``. L∞ steps follow the gradient sign, L2 steps the
    per-sample normalised gradient; after every step the iterate is projected onto the ball
    (L∞: clamp; L2: per-sample rescale) and then onto ``[0, 1]``. The random start is uniform
    in the ball (L∞: uniform per element; L2: uniform in the ball) and clamped to ``[0, 1]``.
    The last iterate is returned.

    The model mode during the attack is ``model_mode``:

    * ``"eval"`` (default): ``model.eval()``; BatchNorm uses its running statistics, dropout is
      off, and the attack's forward passes do not change BatchNorm running statistics. This is
      the mode in which the model is evaluated, so the attack targets the deployed function.
    * ``"train"``: ``model.train()`` (BatchNorm uses batch statistics and *updates* its running
      statistics at every step).
    * ``"keep"``: leave the model as it is.

    The ``training`` flag of every submodule is restored exactly afterwards, also on exceptions.

    Args:
        eps: radius in input units ``[0, 1]``; a fraction string such as ``"8/255"`` is parsed
            exactly. L∞ eps must be <= 1. Default ``"8/255"``.
        step_size: step length (fraction strings accepted); default ``2.5 * eps / steps``
            (Madry et al.), which lets the iterate cross the ball from side to side.
        steps: number of gradient steps, >= 1. Default 10.
        norm: ``"linf"`` (default) or ``"l2"``.
        random_start: start from a uniform random point of the ball (default True) instead of
            ``x``.
        model_mode: ``"eval"`` (default), ``"train"`` or ``"keep"``, see above.
        loss: ``"ce"`` (cross-entropy summed over the batch, default) or a callable
            ``loss(logits, y) -> scalar`` to maximise.

    Call ``attack(model, x, y)`` with ``x`` of shape (N, ...) in ``[0, 1]`` and ``y`` (N,)
    int64 labels; returns detached adversarial inputs of the same shape, device and dtype.
    Works under ``torch.no_grad``, ``torch.inference_mode`` and ``torch.autocast``. For
    ``eps == 0`` returns a clone of ``x``.

    Example:
        >>> attack = PGD(eps="8/255", steps=10)
        >>> x_adv = attack(model, x, y)  # doctest: +SKIP
    """

    name = "pgd"

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        model_mode: str = "eval",
        loss: str | LossFn = "ce",
    ) -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps, self.norm)
        self.steps = check_steps(steps)
        self.step_size = (
            self._default_step_size() if step_size is None else check_step_size(step_size)
        )
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be true or false, got {random_start!r}")
        self.random_start = random_start
        self.model_mode = check_model_mode(model_mode)
        self.loss = loss
        self._loss_fn = resolve_loss(loss)

    def _default_step_size(self) -> float:
        return 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial examples for ``model`` at ``(x, y)``; see the class docstring."""
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ConfigError(
                f"labels must have shape (N,) matching inputs (N, ...); "
                f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        if self.eps == 0:
            return x.detach().clone()
        with model_mode_scope(model, self.model_mode):
            x_init = None
            if self.random_start:
                with torch.inference_mode(False):
                    x_init = sample_random_start(x.detach().clone(), self.eps, self.norm)
            return projected_gradient_ascent(
                model,
                x,
                y,
                self._loss_fn,
                eps=self.eps,
                step_size=self.step_size,
                steps=self.steps,
                norm=self.norm,
                x_init=x_init,
            )

    def config(self) -> dict[str, Any]:
        """JSON-able description: name, eps, step_size (resolved), steps, norm, random_start,
        model_mode and loss (``"ce"`` or the callable's name)."""
        loss = self.loss if isinstance(self.loss, str) else _callable_name(self.loss)
        return {
            "name": self.name,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "norm": self.norm,
            "random_start": self.random_start,
            "model_mode": self.model_mode,
            "loss": loss,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class FGSM(PGD):
    """Fast gradient sign method with random start, FGSM-RS (Wong et al., "Fast is better than
    free: Revisiting adversarial training", ICLR 2020).

    One gradient step of length ``step_size`` from a uniform random point of the ``eps``-ball
    (or from ``x`` if ``random_start=False``), projected back onto the ball and ``[0, 1]``:
    :class:`PGD` with ``steps=1``. L2 is supported the same way as in :class:`PGD`.

    Args:
        eps: radius in input units ``[0, 1]`` (``"8/255"`` accepted). Default ``"8/255"``.
        step_size: default ``1.25 * eps`` (Wong et al.); without random start any step >= eps
            gives the classic FGSM point ``x + eps * sign(grad)`` after projection.
        random_start: default True.
        norm: ``"linf"`` (default) or ``"l2"``.
        model_mode: ``"eval"`` (default), ``"train"`` or ``"keep"``; see :class:`PGD`.
        loss: ``"ce"`` (default) or a callable ``loss(logits, y) -> scalar``.
    """

    name = "fgsm"

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        random_start: bool = True,
        norm: str = "linf",
        model_mode: str = "eval",
        loss: str | LossFn = "ce",
    ) -> None:
        super().__init__(
            eps=eps,
            step_size=step_size,
            steps=1,
            norm=norm,
            random_start=random_start,
            model_mode=model_mode,
            loss=loss,
        )

    def _default_step_size(self) -> float:
        return 1.25 * self.eps


def _callable_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)
