"""Training objectives: natural, PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019),
MART (Wang et al. 2020) and Fast-AT / FGSM-RS (Wong et al. 2020).

An objective maps a batch to the loss to minimise and the logits to report training accuracy
with::

    obj = create_objective("pgd", eps="8/255", step_size="2/255", steps=10)
    out = obj(model, x, y)   # ObjectiveOutput(loss=scalar with grad, logits=(N, C))
    out.loss.backward()

The loss is computed with the model in whatever mode the caller set (the trainer sets train
mode); only the inner attack switches the mode, to ``attack_mode``. The default
``attack_mode="eval"`` keeps the attack's forward passes from updating BatchNorm running
statistics with adversarial batches (as in the official TRADES and MART code); pass
``attack_mode="train"`` to attack with batch statistics, as in the original Madry and Fast-AT
code. eps is always in input units ``[0, 1]``.

The adversarial example of an objective is produced by its :meth:`AdversarialObjective.perturb`
method, which can be overridden (or replaced on an instance) to inject a fixed attack.

Under several processes the trainer hands objectives the ``DistributedDataParallel`` module:
the loss's forward passes go through it (its hooks average the gradients), the attack runs on
the local module (:func:`advprune.distributed.local_module`), so DDP sees one forward and one
backward per step and the attack's forward passes trigger none of its hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advprune._validation import check_eps, check_norm, parse_number
from advprune.attacks.pgd import (
    FGSM,
    PGD,
    LossFn,
    check_model_mode,
    check_step_size,
    check_steps,
    model_mode_scope,
    project,
    projected_gradient_ascent,
    resolve_loss,
)
from advprune.distributed import local_module
from advprune.errors import ConfigError
from advprune.registry import Options, Registry, signature_options

__all__ = [
    "MART",
    "TRADES",
    "AdversarialObjective",
    "FastAT",
    "Natural",
    "Objective",
    "ObjectiveOutput",
    "PGDTraining",
    "create_objective",
    "list_objectives",
    "register_objective",
]


class ObjectiveOutput(NamedTuple):
    """Result of an objective on one batch.

    Attributes:
        loss: scalar loss to minimise, attached to the model parameters' graph.
        logits: (N, C) logits to compute training accuracy from: the clean batch for
            ``natural``, the adversarial batch for every adversarial objective.
    """

    loss: Tensor
    logits: Tensor


class Objective(ABC):
    """Base class of training objectives; subclasses are registered with
    :func:`register_objective` and built by :func:`create_objective`."""

    name: ClassVar[str] = ""
    #: whether the objective trains under DDP: its loss comes from the model's forward (the
    #: module it is handed), which is what DDP's gradient hooks attach to
    distributed: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        """Loss and logits for inputs ``x`` (N, ...) in [0, 1] and labels ``y`` (N,) int64."""

    def config(self) -> dict[str, Any]:
        """JSON-able description of the objective, including its ``name``."""
        return {"name": self.name}

    def set_progress(self, progress: float) -> None:
        """Called by the trainer before every batch with the fraction of the stage done, in
        [0, 1]; objectives with schedules (eps ramp-up, kappa) override it. Default: nothing."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


_REGISTRY: Registry[type[Objective]] = Registry("objective")

_O = TypeVar("_O", bound=type[Objective])


def _objectives() -> Registry[type[Objective]]:
    # a view when a test swapped the module's registry for a plain dict copy
    return _REGISTRY if isinstance(_REGISTRY, Registry) else Registry("objective", _REGISTRY)


def objective_options(name: str) -> type[Options]:
    """The typed options of objective ``name``: its constructor's keyword arguments, as a
    pydantic model (their names are the YAML ``objective_options`` keys and the
    ``--objective-option`` keys; the objective validates the values itself)."""
    return signature_options(_objectives().get(str(name).strip().lower()), "objective")


def register_objective(name: str) -> Callable[[_O], _O]:
    """Class decorator registering an :class:`Objective` subclass under ``name``.

    The class's ``name`` attribute is set to ``name``. Registering a different class under a
    name already taken raises :class:`ConfigError`.
    """
    key = str(name).strip().lower()

    def decorator(cls: _O) -> _O:
        registry = _objectives()
        previous = registry.get(key) if key in registry else None
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ConfigError(f"objective {key!r} is already registered to {previous.__name__}")
        cls.name = key
        registry.add(key, cls, replace=True)
        return cls

    return decorator


def list_objectives() -> list[str]:
    """Sorted names of the registered objectives."""
    return _objectives().names()


def create_objective(name: str, **kwargs: Any) -> Objective:
    """Build the objective registered under ``name`` with keyword arguments ``kwargs``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ConfigError: a keyword is not an argument of that objective, or a value is invalid.
    """
    key = str(name).strip().lower()
    cls = _objectives().get(key)
    params = list(signature_options(cls, "objective").model_fields)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(params) if params else "none"
        raise ConfigError(
            f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"for objective {key!r}; valid arguments: {valid}"
        )
    return cls(**kwargs)


def _check_beta(beta: str | float) -> float:
    value = parse_number(beta, "beta")
    if not 0 <= value < float("inf"):
        raise ConfigError(f"beta must be >= 0, got {beta!r}")
    return value


@register_objective("natural")
class Natural(Objective):
    """Standard training: cross-entropy on the clean batch, ``CE(f(x), y)`` (batch mean).

    Takes no arguments; the returned logits are ``f(x)``.
    """

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = model(x)
        return ObjectiveOutput(F.cross_entropy(logits, y), logits)


class AdversarialObjective(Objective):
    """Shared arguments and :meth:`perturb` hook of the adversarial objectives.

    Args:
        eps: radius in input units ``[0, 1]``; ``"8/255"`` accepted. Default ``"8/255"``.
        step_size: attack step; default ``2.5 * eps / steps`` (2/255 for 8/255 and 10 steps).
        steps: attack steps, default 10.
        norm: ``"linf"`` (default) or ``"l2"``.
        attack_mode: model mode during the attack: ``"eval"`` (default), ``"train"``, ``"keep"``.
    """

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        steps: int = 10,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self.norm = check_norm(norm)
        self.eps = check_eps(eps, self.norm)
        self.steps = check_steps(steps)
        self.step_size = (
            2.5 * self.eps / self.steps if step_size is None else check_step_size(step_size)
        )
        self.attack_mode = check_model_mode(attack_mode, "attack_mode")

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return detached adversarial inputs for the batch (shape of ``x``)."""

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "norm": self.norm,
            "attack_mode": self.attack_mode,
        }


def _small_gaussian_start(x: Tensor) -> Tensor:
    """Start point of the official TRADES and MART code: ``x + 0.001 * N(0, 1)``."""
    return x + 0.001 * torch.randn_like(x)


class _CrossEntropyOnAttack(AdversarialObjective):
    """Cross-entropy on the examples of ``self.attack`` (a PGD / FGSM instance set by the
    subclass): the loss of PGD-AT and of FGSM-RS."""

    attack: Callable[[nn.Module, Tensor, Tensor], Tensor]

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.attack(model, x, y)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits_adv = model(self.perturb(local_module(model), x, y))
        return ObjectiveOutput(F.cross_entropy(logits_adv, y), logits_adv)


@register_objective("pgd")
class PGDTraining(_CrossEntropyOnAttack):
    """PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018): ``CE(f(x_adv), y)`` (batch mean) with ``x_adv`` from
    :class:`~advprune.attacks.PGD` (cross-entropy, uniform random start).

    Args:
        eps: default ``"8/255"``.
        step_size: default ``2.5 * eps / steps``.
        steps: default 10.
        norm: ``"linf"`` (default) or ``"l2"``.
        random_start: default True.
        attack_mode: default ``"eval"``; see the module docstring.

    Returns logits ``f(x_adv)``.
    """

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(eps, step_size, steps, norm, attack_mode)
        self.attack = PGD(
            eps=self.eps,
            step_size=step_size,
            steps=self.steps,
            norm=self.norm,
            random_start=random_start,
            model_mode=self.attack_mode,
        )
        self.random_start = self.attack.random_start

    def config(self) -> dict[str, Any]:
        return {**super().config(), "random_start": self.random_start}


class _BetaObjective(AdversarialObjective):
    """An adversarial objective with a robust-term weight ``beta`` (TRADES, MART)."""

    def __init__(
        self,
        beta: str | float = 6.0,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        steps: int = 10,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(eps, step_size, steps, norm, attack_mode)
        self.beta = _check_beta(beta)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta}

    def _ascend_from_gaussian_start(
        self, model: nn.Module, x: Tensor, y: Tensor, make_loss: Callable[[], LossFn]
    ) -> Tensor:
        """The official TRADES / MART inner maximisation: projected ascent on ``make_loss()``
        (built inside ``attack_mode``) from ``x + 0.001 * N(0, 1)`` projected to the ball."""
        if self.eps == 0:
            return x.detach().clone()
        x0 = x.detach()
        with model_mode_scope(model, self.attack_mode):
            return projected_gradient_ascent(
                model,
                x,
                y,
                make_loss(),
                eps=self.eps,
                step_size=self.step_size,
                steps=self.steps,
                norm=self.norm,
                x_init=project(_small_gaussian_start(x0), x0, self.eps, self.norm),
            )


@register_objective("trades")
class TRADES(_BetaObjective):
    """TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and
    Accuracy", ICML 2019).

    Inner maximisation, as in the official code: from ``x + 0.001 * N(0, 1)``, ``steps``
    projected steps (L∞ sign / L2 normalised gradient, projection onto the ball and [0, 1])
    maximising ``sum_i KL(softmax(f(x_i)) || softmax(f(x'_i)))`` with the clean probabilities
    computed once, in ``attack_mode``, as the fixed target. Outer loss, in the caller's mode::

        loss = CE(f(x), y) + beta * KL_batchmean(softmax(f(x)) || softmax(f(x_adv)))
             = F.cross_entropy(f(x), y)
               + beta * F.kl_div(F.log_softmax(f(x_adv)), F.softmax(f(x)), reduction="batchmean")

    The gradient flows through both the clean and the adversarial logits (as in the official
    code).

    Args:
        beta: weight of the robust KL term, default 6.0 (paper's CIFAR-10 setting, 1/lambda).
        eps, step_size, steps, norm, attack_mode: as :class:`PGDTraining`; default step size
            ``2.5 * eps / steps`` (2/255 for 8/255 and 10 steps; official 0.007).

    Returns logits ``f(x_adv)``.
    """

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        def kl_to_clean() -> LossFn:
            with torch.no_grad():
                p_clean = F.softmax(model(x).float(), dim=1)
            return lambda logits, _y: F.kl_div(
                F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum"
            )

        return self._ascend_from_gaussian_start(model, x, y, kl_to_clean)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.perturb(local_module(model), x, y)
        logits = model(x)
        logits_adv = model(x_adv)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean"
        )
        return ObjectiveOutput(loss_natural + self.beta * loss_robust, logits_adv)


@register_objective("mart")
class MART(_BetaObjective):
    """MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples", ICLR 2020), exactly as the official code.

    Adversarial examples: PGD on the cross-entropy from ``x + 0.001 * N(0, 1)`` (the official
    start), in ``attack_mode``. With ``p = softmax(f(x))``, ``q = softmax(f(x_adv))`` and
    ``k*`` the most probable class of ``q`` other than ``y`` (second of ``argsort(q)`` if the
    first is ``y``, else the first), the loss, in the caller's mode, is::

        BCE  = CE(f(x_adv), y) + mean_i( -log(1.0001 - q_i[k*_i] + 1e-12) )
             = F.cross_entropy(f(x_adv), y) + F.nll_loss(torch.log(1.0001 - q + 1e-12), k*)
        KL_i = sum_k p_i[k] * (log p_i[k] - log(q_i[k] + 1e-12))
        loss = BCE + beta * mean_i( KL_i * (1.0000001 - p_i[y_i]) )

    Args:
        beta: weight of the misclassification-aware KL term, default 6.0 (the official code's
            default and the paper's CIFAR-10 setting).
        eps, step_size, steps, norm, attack_mode: as :class:`PGDTraining`; default step size
            ``2.5 * eps / steps`` (official 0.007 for 8/255).

    Returns logits ``f(x_adv)``.
    """

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self._ascend_from_gaussian_start(model, x, y, lambda: resolve_loss("ce"))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x_adv = self.perturb(local_module(model), x, y)
        logits = model(x)
        logits_adv = model(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
        new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(
            torch.log(1.0001 - adv_probs + 1e-12), new_y
        )
        nat_probs = F.softmax(logits, dim=1)
        true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
        loss_robust = (kl * (1.0000001 - true_probs)).sum() / x.shape[0]
        return ObjectiveOutput(loss_adv + self.beta * loss_robust, logits_adv)


@register_objective("fast")
class FastAT(_CrossEntropyOnAttack):
    """Fast adversarial training with FGSM-RS (Wong et al., "Fast is better than free:
    Revisiting adversarial training", ICLR 2020): ``CE(f(x_adv), y)`` with ``x_adv`` one FGSM
    step of ``step_size`` from a uniform random start, projected onto the ball and [0, 1]
    (:class:`~advprune.attacks.FGSM`).

    Args:
        eps: default ``"8/255"``.
        step_size: default ``1.25 * eps`` (Wong et al.).
        norm: ``"linf"`` (default) or ``"l2"``.
        attack_mode: default ``"eval"``; the original code attacks in train mode
            (``attack_mode="train"``).

    Returns logits ``f(x_adv)``.
    """

    def __init__(
        self,
        eps: str | float = "8/255",
        step_size: str | float | None = None,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(eps, step_size, 1, norm, attack_mode)
        self.attack = FGSM(
            eps=self.eps, step_size=step_size, norm=self.norm, model_mode=self.attack_mode
        )
        self.step_size = self.attack.step_size

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        del cfg["steps"]
        return cfg
