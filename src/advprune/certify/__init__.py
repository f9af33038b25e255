"""Certified robustness: sound bounds (IBP, CROWN, CROWN-IBP), verified accuracy and
randomized smoothing (Cohen et al. 2019)."""

from advprune.certify.bounds import (
    BOUND_METHODS,
    DEFAULT_MAX_CROWN_NEURONS,
    BoundedModel,
    BoundResult,
    check_bound_method,
    margin_spec,
)
from advprune.certify.smoothing import (
    ABSTAIN,
    DEFAULT_RADII,
    Smooth,
    SmoothingResult,
    certify_dataset,
    check_sample_counts,
    check_sigma,
    plot_certified_accuracy,
)
from advprune.certify.verify import VerifiedResult, verified_accuracy, verify_batch

__all__ = [
    "ABSTAIN",
    "BOUND_METHODS",
    "DEFAULT_MAX_CROWN_NEURONS",
    "DEFAULT_RADII",
    "BoundResult",
    "BoundedModel",
    "Smooth",
    "SmoothingResult",
    "VerifiedResult",
    "certify_dataset",
    "check_bound_method",
    "check_sample_counts",
    "check_sigma",
    "margin_spec",
    "plot_certified_accuracy",
    "verified_accuracy",
    "verify_batch",
]
