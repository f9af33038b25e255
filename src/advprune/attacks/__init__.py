"""Gradient attacks on classifiers with inputs in [0, 1]: PGD (Madry et al. 2018) and FGSM-RS
(Wong et al. 2020), for the L∞ and L2 norms, and the minimum-norm FMN (Pintor et al. 2021) for
L0, L1, L2 and L∞. eps is always in input units."""

from advprune.attacks.fmn import FMN, FMNResult
from advprune.attacks.pgd import (
    FGSM,
    MODEL_MODES,
    PGD,
    LossFn,
    check_model_mode,
    check_step_size,
    check_steps,
    model_mode_scope,
    project,
    projected_gradient_ascent,
    resolve_loss,
    sample_random_start,
)

__all__ = [
    "FGSM",
    "FMN",
    "MODEL_MODES",
    "PGD",
    "FMNResult",
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
