"""Gradient attacks on classifiers with inputs in [0, 1]: PGD (Madry et al. 2018) and FGSM-RS
(Wong et al. 2020), for the L∞ and L2 norms. eps is always in input units."""

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
