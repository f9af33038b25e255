"""Verified accuracy at an L∞ radius with IBP, CROWN-IBP or CROWN bounds.

A test point counts as verified when it is classified correctly and the lower bound of every
margin ``z_y - z_j`` (j ≠ y) over the eps-ball (intersected with [0, 1]) is > 0: no input of
the ball is misclassified. Verified accuracy is therefore a lower bound of the robust
accuracy under any attack, PGD included::

    result = verified_accuracy(model, loader, eps="1/16", method="crown")
    result.verified_accuracy, result.clean_accuracy
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advprune._validation import check_eps, check_unit_range
from advprune.certify.bounds import DEFAULT_MAX_CROWN_NEURONS, BoundedModel, check_bound_method
from advprune.errors import ConfigError
from advprune.progress import ProgressSetting
from advprune.progress import progress as progress_of

__all__ = ["VerifiedResult", "verified_accuracy", "verify_batch"]


@dataclass
class VerifiedResult:
    """Verified and clean accuracy of a model on ``n`` points at L∞ radius ``eps``."""

    method: str
    eps: float
    eps_text: str
    n: int
    clean_accuracy: float
    verified_accuracy: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    verified: list[bool] = field(default_factory=list, repr=False)

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """JSON-able dict; ``per_sample`` keeps the per-point verified flags."""
        out = asdict(self)
        if not per_sample:
            del out["verified"]
        return out


def verify_batch(
    bounded: BoundedModel, x: Tensor, y: Tensor, eps: float | str, method: str = "ibp"
) -> tuple[Tensor, Tensor]:
    """``(clean_correct, verified)`` boolean vectors (N,) for one batch, model as it is.

    ``verified[i]``: point ``i`` is classified correctly and the lower bound of each of its
    margins ``z_y - z_j`` (j ≠ y) is > 0.
    """
    with torch.no_grad():
        result = bounded.compute(x, eps, method=method, labels=y, upper=False)
        lower = result.lower.scatter(1, y.view(-1, 1), float("inf"))  # row y is z_y - z_y
        clean = result.clean.argmax(1) == y
    return clean, (lower > 0).all(1) & clean


def verified_accuracy(
    model: nn.Module | BoundedModel,
    loader: Iterable[tuple[Tensor, Tensor]],
    eps: float | str,
    method: str = "ibp",
    *,
    device: torch.device | str | None = None,
    input_shape: tuple[int, ...] | None = None,
    max_crown_neurons: int = DEFAULT_MAX_CROWN_NEURONS,
    progress: ProgressSetting = False,
) -> VerifiedResult:
    """Verified accuracy of ``model`` (in eval mode) on ``loader`` at L∞ radius ``eps``.

    The method, the model's operations and eps are checked before any batch is bounded
    (one-line ``ConfigError``: unsupported layer, full CROWN on a model too large, eps
    outside [0, 1]). ``input_shape`` (C, H, W) lets the shape checks run before the first
    batch is loaded.
    """
    method = check_bound_method(method)
    eps_v = check_eps(eps, "linf")
    bounded = (
        model
        if isinstance(model, BoundedModel)
        else BoundedModel(model, max_crown_neurons=max_crown_neurons)
    )
    net = bounded.model
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if input_shape is not None:
        bounded.check_method(method, input_shape)
    was_training = net.training
    net.eval()
    t0 = time.perf_counter()
    flags: list[bool] = []
    correct = total = 0
    try:
        for x, y in progress_of(loader, desc=f"verify ({method})", leave=True, mode=progress):
            x, y = x.to(device), y.to(device)
            check_unit_range(x)
            bounded.check_method(method, tuple(x.shape[1:]))
            clean, verified = verify_batch(bounded, x, y, eps_v, method)
            correct += int(clean.sum())
            total += len(y)
            flags += verified.tolist()
    finally:
        net.train(was_training)
    if total == 0:
        raise ConfigError("evaluation data is empty")
    return VerifiedResult(
        method=method,
        eps=eps_v,
        eps_text=str(eps),
        n=total,
        clean_accuracy=correct / total,
        verified_accuracy=sum(flags) / total,
        seconds=time.perf_counter() - t0,
        settings={
            "norm": "linf",
            "domain": "eps-ball intersected with [0, 1]",
            "relu_relaxation": "adaptive lower slope" if method != "ibp" else None,
            "intermediate_bounds": {"ibp": "ibp", "crown-ibp": "ibp", "crown": "crown"}[method],
            "max_crown_neurons": bounded.max_crown_neurons if method == "crown" else None,
        },
        verified=flags,
    )
