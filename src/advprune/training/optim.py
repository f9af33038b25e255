"""Optimizers and learning-rate schedules from one definition (:class:`TrainConfig`).

The trainer is handed its optimizer; :func:`build_optimizer` builds the one a
:class:`~advprune.training.TrainConfig` describes (``optimizer``, ``lr``, ``momentum``,
``weight_decay``, ``nesterov``) and :func:`lr_factor` its schedule (``schedule``,
``milestones``, ``gamma``, ``warmup_epochs``). New optimizers register with
:func:`register_optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from advprune.registry import Registry

TrainConfig = Any  # advprune.training.TrainConfig (not imported: it imports this module)

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "lr_factor", "register_optimizer"]

SCHEDULES = ("cosine", "step", "constant")

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
    return 0.5 * (1.0 + math.cos(math.pi * t))
