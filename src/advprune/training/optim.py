"""Optimizers and learning-rate schedules from one definition (:class:`TrainConfig`).

The trainer is handed its optimizer; :func:`build_optimizer` builds the one a
:class:`~advprune.training.TrainConfig` describes (``optimizer``, ``lr``, ``momentum``,
``weight_decay``, ``nesterov``, ``betas``) and :func:`lr_factor` its schedule (``schedule``,
``milestones``, ``gamma``, ``warmup_epochs``, ``cycle_peak``). Both are set from YAML
(``optimizer: adamw``, ``schedule: onecycle``) and the CLI (``--optimizer``, ``--schedule``)
from that one definition.

Optimizers: ``sgd`` (momentum, weight decay; ``nesterov: true`` for Nesterov momentum),
``sgd-nesterov`` (the same with Nesterov momentum), ``adam`` (L2 weight decay added to the
gradient) and ``adamw`` (decoupled weight decay), both with ``betas``. New optimizers
register with :func:`register_optimizer`.

Schedules, as a multiplier of ``lr`` at a fractional epoch (so a resumed run continues
exactly): ``cosine`` (to 0 at the end), ``step`` (times ``gamma`` at each milestone),
``constant``, and ``onecycle`` (Smith's one-cycle policy as ``torch.optim.lr_scheduler.
OneCycleLR`` with cosine annealing: from ``lr / 25`` up to ``lr`` at ``cycle_peak`` of the
stage, then down to ``lr / 25 / 10_000``). ``warmup_epochs`` ramps any of them linearly from
0 first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from advprune.errors import ConfigError
from advprune.registry import Registry

TrainConfig = Any  # advprune.training.TrainConfig (not imported: it imports this module)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "list_optimizers",
    "lr_factor",
    "register_optimizer",
]

SCHEDULES = ("cosine", "step", "constant", "onecycle")
ONECYCLE_DIV = 25.0  # OneCycleLR's div_factor: the cycle starts at lr / 25
ONECYCLE_FINAL_DIV = 1e4  # OneCycleLR's final_div_factor: it ends at lr / 25 / 1e4

OptimizerFactory = Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator registering ``factory(param_groups, config) -> torch.optim.Optimizer``."""
    return OPTIMIZERS.register(name)


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


@register_optimizer("sgd-nesterov")
def _sgd_nesterov(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not cfg.momentum > 0:
        raise ConfigError("optimizer sgd-nesterov needs momentum > 0")
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


@register_optimizer("adam")
def _adam(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)  # fmt: skip


@register_optimizer("adamw")
def _adamw(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay)  # fmt: skip


def list_optimizers() -> list[str]:
    """Registered optimizer names (``adam``, ``adamw``, ``sgd``, ``sgd-nesterov``, ...)."""
    return OPTIMIZERS.names()


def build_optimizer(
    param_groups: Sequence[dict[str, Any]], config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` over ``param_groups``; every group remembers its
    ``base_lr`` (the schedule multiplies it)."""
    name = getattr(config, "optimizer", "sgd")
    optimizer = OPTIMIZERS.get(name)([dict(g) for g in param_groups], config)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def lr_factor(config: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` epochs (fractional) into the stage."""
    if config.warmup_epochs > 0 and progress < config.warmup_epochs:
        return progress / config.warmup_epochs
    if config.schedule == "constant" or config.epochs == 0:
        return 1.0
    if config.schedule == "step":
        passed = sum(progress >= m * config.epochs for m in config.milestones)
        return config.gamma**passed
    span = max(config.epochs - config.warmup_epochs, 1e-12)
    t = min(max(progress - config.warmup_epochs, 0.0) / span, 1.0)
    if config.schedule == "onecycle":
        peak = getattr(config, "cycle_peak", 0.3)
        low = 1.0 / ONECYCLE_DIV
        if t < peak:
            return _cosine_between(low, 1.0, t / peak)
        return _cosine_between(1.0, low / ONECYCLE_FINAL_DIV, (t - peak) / max(1.0 - peak, 1e-12))
    return _cosine_between(1.0, 0.0, t)


def _cosine_between(start: float, end: float, t: float) -> float:
    """Cosine annealing from ``start`` (t = 0) to ``end`` (t = 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
