"""Choosing prunable layers, ranking their units and turning a target sparsity into masks.

Throughout advprune, **sparsity is the removed fraction** (0.99 = 99 % of weights pruned) and
**density is the kept fraction** (1 - sparsity). Per-layer densities come either from a local
allocation (every layer at the target) or from one global ranking of all units.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from advprune._validation import check_sparsity
from advprune.errors import ConfigError, UnknownNameError
from advprune.sparsity.masks import (
    PRUNABLE_TYPES,
    FixedMask,
    ScoreMask,
    attach_mask,
    check_granularity,
    compact_shape,
    dense_weight,
    topk_mask,
    unit_size,
)

SCOPES = ("local", "global")


def prunable_layers(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    keep_first: bool = False,
    keep_last: bool = False,
) -> dict[str, nn.Module]:
    """Conv2d and Linear layers to prune, in module order.

    ``include`` / ``exclude`` are fnmatch patterns on module names (``"layer4.*"``);
    ``keep_first`` / ``keep_last`` leave the first and last conv-or-linear layer dense.
    Raises ``ConfigError`` if nothing is left to prune.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    first, last = layers[0][0], layers[-1][0]
    inc, exc = list(include or []), list(exclude or [])
    chosen = {}
    for name, module in layers:
        if (keep_first and name == first) or (keep_last and name == last):
            continue
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        chosen[name] = module
    if not chosen:
        raise ConfigError(
            "no prunable layer left after include/exclude/keep_first/keep_last; "
            f"layers are: {', '.join(n for n, _ in layers)}"
        )
    return chosen


def magnitude_importance(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Importance in compact shape: ``|w|`` per weight, or mean ``|w|`` per filter / channel.

    Structured units use the *mean* absolute weight (the L1 norm divided by the unit size), so
    units of layers with different fan-in compare fairly in a global ranking; within one layer
    this orders units exactly as the L1 norm does.
    """
    w = weight.detach().abs()
    check_granularity(granularity)
    if granularity == "unstructured":
        return w.clone()
    if granularity == "filters":
        return w.flatten(1).mean(1)
    return w.transpose(0, 1).flatten(1).mean(1)


def allocate_densities(
    importance: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: str = "local",
    unit_sizes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Per-layer densities (kept fractions) reaching ``sparsity`` over the given layers.

    - ``local``: every layer at density ``1 - sparsity``.
    - ``global``: every layer keeps its most important unit (no layer collapses), then one
      ranking of all other units keeps the top ones until the kept *weight* count reaches
      ``round((1 - sparsity) * total)``. ``unit_sizes`` gives
      the number of weights per unit of each layer (1 when unstructured).
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise UnknownNameError("scope", scope, SCOPES)
    density = 1.0 - sparsity
    if scope == "local":
        return {name: density for name in importance}
    sizes = dict(unit_sizes or {})
    names = list(importance)
    flat = [importance[n].detach().flatten().float().cpu() for n in names]
    unit_weights = torch.cat(
        [
            torch.full((f.numel(),), float(sizes.get(n, 1)), dtype=torch.float64)
            for n, f in zip(names, flat)
        ]
    )
    budget = round(density * float(unit_weights.sum()))
    # every layer keeps its most important unit (no layer is cut off), the rest compete globally
    kept = torch.zeros(len(unit_weights), dtype=torch.bool)
    start = 0
    for f in flat:
        kept[start + int(torch.argmax(f))] = True
        start += f.numel()
    remaining = budget - float(unit_weights[kept].sum())
    scores = torch.cat(flat)
    scores[kept] = float("-inf")
    order = torch.argsort(scores, descending=True, stable=True)[: int((~kept).sum())]
    cum = torch.cumsum(unit_weights[order], 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor([remaining], dtype=torch.float64)).item())
    # take the unit that crosses the budget if that lands closer to it
    if n_keep < len(order) and cum[n_keep] - remaining < remaining - (
        cum[n_keep - 1] if n_keep else 0
    ):
        n_keep += 1
    kept[order[:n_keep]] = True
    out, start = {}, 0
    for n, f in zip(names, flat):
        out[n] = float(kept[start : start + f.numel()].sum()) / f.numel()
        start += f.numel()
    return out


def layer_masks(
    importance: Mapping[str, torch.Tensor], densities: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Compact 0/1 masks keeping the top ``density`` fraction of each layer's importance."""
    return {name: topk_mask(importance[name], densities[name]) for name in importance}


def prune_magnitude(
    model: nn.Module,
    sparsity: float,
    *,
    granularity: str = "unstructured",
    scope: str = "local",
    layers: Mapping[str, nn.Module] | None = None,
) -> dict[str, float]:
    """One-shot magnitude pruning (LWM): attach fixed masks; return per-layer densities.

    ``layers`` defaults to :func:`prunable_layers` of ``model``. Weights already hidden by an
    earlier mask are ranked by their dense value (they are restored if re-selected).
    """
    layers = dict(layers) if layers is not None else prunable_layers(model)
    check_granularity(granularity)
    importance = {n: magnitude_importance(dense_weight(m), granularity) for n, m in layers.items()}
    sizes = {n: unit_size(m.weight.shape, granularity) for n, m in layers.items()}
    densities = allocate_densities(importance, sparsity, scope=scope, unit_sizes=sizes)
    masks = layer_masks(importance, densities)
    for name, module in layers.items():
        attach_mask(module, FixedMask(module.weight.shape, granularity, masks[name]))
    return densities


def attach_scores(
    model: nn.Module,
    densities: Mapping[str, float],
    *,
    granularity: str = "unstructured",
    init: str = "magnitude",
    layers: Mapping[str, nn.Module] | None = None,
) -> dict[str, ScoreMask]:
    """Attach learnable-score masks (top-k with straight-through gradient) to ``layers``.

    ``init``: ``"magnitude"`` (scores = importance, so the first mask equals magnitude
    pruning), ``"uniform"`` (U(-1, 1)) or ``"kaiming"`` (kaiming-uniform).
    """
    layers = dict(layers) if layers is not None else prunable_layers(model)
    check_granularity(granularity)
    out = {}
    for name, module in layers.items():
        weight = dense_weight(module)
        shape = compact_shape(weight.shape, granularity)
        if init == "magnitude":
            scores = magnitude_importance(weight, granularity)
        elif init == "uniform":
            scores = torch.empty(shape).uniform_(-1, 1)
        elif init == "kaiming":
            scores = torch.empty(shape if len(shape) > 1 else (*shape, 1))
            nn.init.kaiming_uniform_(scores, a=5**0.5)
            scores = scores.view(shape)
        else:
            raise UnknownNameError("score init", init, ["kaiming", "magnitude", "uniform"])
        mask = ScoreMask(weight.shape, granularity, densities[name], scores.to(weight.device))
        out[name] = attach_mask(module, mask)
    return out
