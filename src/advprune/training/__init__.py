"""Training: batch objectives and the one Trainer every method uses."""

from advprune.training import certified  # noqa: F401  (registers smooth, ibp, crown-ibp, mixtrain)
from advprune.training.objectives import (
    MART,
    TRADES,
    FastAT,
    Natural,
    Objective,
    ObjectiveOutput,
    PGDTraining,
    create_objective,
    list_objectives,
    register_objective,
)
from advprune.training.optim import (
    OPTIMIZERS,
    build_optimizer,
    list_optimizers,
    register_optimizer,
)
from advprune.training.precision import PRECISIONS, Precision
from advprune.training.trainer import (
    PARAM_KINDS,
    SCHEDULES,
    EpochResult,
    FitResult,
    Regularizer,
    TrainConfig,
    Trainer,
    evaluate_accuracy,
    load_best,
    lr_factor,
    parameter_groups,
)

__all__ = [
    "MART",
    "OPTIMIZERS",
    "PARAM_KINDS",
    "PRECISIONS",
    "SCHEDULES",
    "TRADES",
    "EpochResult",
    "FastAT",
    "FitResult",
    "Natural",
    "Objective",
    "ObjectiveOutput",
    "PGDTraining",
    "Precision",
    "Regularizer",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "create_objective",
    "evaluate_accuracy",
    "list_objectives",
    "list_optimizers",
    "load_best",
    "lr_factor",
    "parameter_groups",
    "register_objective",
    "register_optimizer",
]
