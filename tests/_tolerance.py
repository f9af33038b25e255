"""Tolerances for tests that compare two computations of one verdict ("is this point
adversarial?") made by different forward passes: another batch size, another library, another
processor. Such passes may round differently, so a point that lies on the decision boundary
(within rounding) may be classified differently by each. Disagreement is allowed only there."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# relative logit margin below which a point counts as "on the decision boundary": float32
# rounding moves logits by ~1e-7 relative; an attack that is really wrong is off by >= 1e-2
BOUNDARY_TOL = 1e-4


@torch.no_grad()
def boundary_margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """|z_y - max_{j != y} z_j| / max(1, max_j |z_j|) per point: 0 on the decision boundary."""
    logits = model(x).double()
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
    scale = logits.abs().amax(1).clamp(min=1.0)
    return (true - other).abs() / scale


def unexplained_disagreements(
    a: Tensor, b: Tensor, model: nn.Module, points: Tensor, y: Tensor, tol: float = BOUNDARY_TOL
) -> list[int]:
    """Indices where the boolean verdicts ``a`` and ``b`` differ although ``points[i]`` is not on
    the decision boundary (relative logit margin above ``tol``); empty when they agree."""
    differ = (a != b).nonzero().flatten()
    if differ.numel() == 0:
        return []
    margin = boundary_margin(model, points[differ], y[differ])
    return differ[margin > tol].tolist()
