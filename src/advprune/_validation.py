"""Parsing and validation of numeric user input shared by every module.

eps values are always in input units [0, 1]; fractions such as ``"8/255"`` are parsed exactly.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from advprune.errors import ConfigError

NORMS = ("linf", "l2")


def parse_number(value: str | float | int, name: str = "value") -> float:
    """Parse ``8/255``, ``0.5``, ``1e-3`` or a number into a float; fractions are exact."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Fraction):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(Fraction(num.strip()), Fraction(den.strip())))
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{name} must be a number or a fraction such as 8/255, got {value!r}"
        ) from None


def check_norm(norm: str) -> str:
    """Return the canonical norm name (``linf`` or ``l2``) or raise."""
    canon = str(norm).lower().replace("∞", "inf").replace("_", "")
    canon = {"inf": "linf", "li": "linf", "linfinity": "linf", "2": "l2"}.get(canon, canon)
    if canon not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return canon


def check_eps(eps: str | float, norm: str = "linf", name: str = "eps") -> float:
    """Parse and validate an attack radius in input units [0, 1].

    An L∞ eps above 1 is almost always a pixel value meant as a fraction of 255 (``8`` for
    ``8/255``); the error says so.
    """
    value = parse_number(eps, name)
    norm = check_norm(norm)
    if value < 0 or value != value:
        raise ConfigError(f"{name} must be >= 0, got {eps!r}")
    if norm == "linf" and value > 1:
        hint = f"; did you mean {eps}/255?" if float(value).is_integer() else ""
        raise ConfigError(
            f"{name}={eps} is outside [0, 1] for the Linf norm (inputs are in [0, 1]){hint}"
        )
    return value


def check_sparsity(sparsity: str | float, name: str = "sparsity") -> float:
    """Validate a sparsity, the *removed* fraction, in [0, 1)."""
    value = parse_number(sparsity, name)
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{name}={sparsity} must be in [0, 1): it is the removed fraction (0.99 = 99% pruned)"
        )
    return value


def check_unit_range(x: torch.Tensor, name: str = "inputs") -> None:
    """Raise if a batch of inputs is outside [0, 1] (models normalise internally)."""
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ConfigError(
            f"{name} must be in [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
            "pass unnormalised images: normalisation is the model's first layer"
        )


def first_validation_error(exc: Any) -> str:
    """``"field.path: message"`` of a pydantic ``ValidationError``'s first error, one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
