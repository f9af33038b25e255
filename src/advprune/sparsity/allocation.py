"""Layer allocation: how a target sparsity is split into per-layer densities.

Every strategy returns ``{layer: density}`` (density = kept fraction of the layer's units) such
that the layers keep ``round((1 - sparsity) * total)`` weights in all (exactly when
unstructured; as close as whole filters / channels allow otherwise), every layer keeps at
least one unit and no layer more than all of its units.

Strategies:

- ``uniform``: every layer at ``1 - sparsity`` (integer counts apportioned by largest
  remainder so the total is exact; each layer within one unit of ``(1 - sparsity) * n``).
- ``erk``: Erdős-Rényi-Kernel (Evci et al., *Rigging the Lottery*, ICML 2020): density
  proportional to ``sum(weight dims) / prod(weight dims)``.
- ``np``: the n^p rule of robust binary subnetworks (Liu et al., NeurIPS 2022): density
  proportional to ``n_l ** (p - 1)`` with ``n_l`` the layer's weight count (``p``, default
  0.1, the paper's best setting).
- ``lamp``: layer-adaptive magnitude-based pruning (Lee et al., ICLR 2021): each unit's score
  is its squared magnitude divided by the sum of the squared magnitudes of the units of its
  layer that are at least as large; one global threshold on the scores.
- ``global``: one global ranking of unit magnitudes (as LWM with ``scope="global"``).

For the proportional rules (uniform, ERK, n^p) densities above 1 are capped and the surplus is
redistributed over the remaining layers in proportion to their rule, repeated until no layer
exceeds 1 (water-filling; for n^p with p < 1 this caps the smallest layers first, as the
reference does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ConfigDict, field_validator
from torch import nn

from advprune._validation import check_sparsity, parse_number
from advprune.errors import ConfigError
from advprune.registry import Options, Registry, parse_options
from advprune.sparsity.masks import check_granularity, compact_shape, unit_size
from advprune.sparsity.pruning import allocate_densities, magnitude_importance

DEFAULT_NP_P = 0.1


class NPOptions(Options):
    """Options of the n^p rule: a layer's density is proportional to ``n_l^(p - 1)``."""

    model_config = ConfigDict(strict=False)
    p: float = DEFAULT_NP_P

    @field_validator("p", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> float:
        p = parse_number(value, "p")
        if not math.isfinite(p):
            raise ConfigError(f"allocation 'np' needs a finite p, got {value!r}")
        return p


@dataclass(frozen=True)
class AllocationProblem:
    """What a strategy allocates: the layers' names, (masked) weights and shapes, the weights
    one mask unit controls (``sizes``), unit counts, the kept-weight ``budget``."""

    names: list[str]
    weights: dict[str, torch.Tensor]
    shapes: list[tuple[int, ...]]
    sizes: list[int]
    counts: list[int]
    units: list[int]
    budget: int
    sparsity: float
    granularity: str

    def from_ratios(self, ratios: list[float]) -> dict[str, float]:
        """Densities proportional to ``ratios`` (capped at 1, at least one unit), meeting the
        budget with whole units (water filling, then apportioning)."""
        real = _water_fill(ratios, self.counts, self.sizes, self.budget)
        kept = _apportion(real, self.units, self.sizes, self.budget)
        return {n: k / u for n, k, u in zip(self.names, kept, self.units)}


Strategy = Callable[..., dict[str, float]]
ALLOCATIONS: Registry[Strategy] = Registry("allocation")


def register_allocation(
    name: str, options: type[Options] = Options
) -> Callable[[Strategy], Strategy]:
    """Decorator registering ``strategy(problem: AllocationProblem, options) -> densities``."""
    return ALLOCATIONS.register(name, options=options)


def list_allocations() -> list[str]:
    """Names of the allocation strategies."""
    return ALLOCATIONS.names()


def check_allocation(name: str) -> str:
    """Return ``name`` if it is an allocation strategy, else raise :class:`UnknownNameError`."""
    ALLOCATIONS.get(name)
    return name


def allocation_options(name: str) -> type[Options]:
    """The typed parameters of allocation ``name`` (``p`` for ``np``)."""
    return ALLOCATIONS.info(name).get("options", Options)


def check_allocation_params(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``params`` as a dict if ``strategy`` takes them all, else raise ConfigError."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"allocation parameters must be a mapping, got {params!r}")
    options = allocation_options(strategy)
    unknown = sorted(set(params) - set(options.model_fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for allocation {strategy!r}; "
            f"valid: {', '.join(options.model_fields) or 'none'}"
        )
    parsed = parse_options(options, params, f"allocation {strategy!r}")
    return {k: v for k, v in parsed.model_dump().items() if k in params}


def _erk_ratio(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


def _np_ratio(p: float) -> Callable[[tuple[int, ...]], float]:
    return lambda shape: float(math.prod(shape)) ** (p - 1.0)


def _water_fill(
    ratios: list[float], weights: list[int], sizes: list[int], budget: int
) -> list[float]:
    """Continuous kept units ``clip(c * ratio * n, 1, n)`` (``n`` units) summing to
    ``budget`` weights, with the scale ``c`` found by bisection (the sum is monotone in c)."""
    units = [w // s for w, s in zip(weights, sizes)]

    def kept(c: float) -> list[float]:
        return [min(float(n), max(1.0, c * r * n)) for r, n in zip(ratios, units)]

    def total(c: float) -> float:
        return sum(k * s for k, s in zip(kept(c), sizes))

    lo, hi = 0.0, 1.0
    while total(hi) < budget and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < budget:
            lo = mid
        else:
            hi = mid
    return kept(hi)


def _apportion(real: list[float], units: list[int], sizes: list[int], budget: int) -> list[int]:
    """Whole unit counts, each the floor or the ceiling of ``real`` (within [1, n]), whose
    weights come closest to ``budget``: from the floors, add one unit per layer, largest units
    first (largest remainder first among equal sizes) while that does not overshoot; then the
    one addition that overshoots less than what is still missing. Exact when unstructured."""
    counts = [min(n, max(1, math.floor(r + 1e-9))) for r, n in zip(real, units)]
    deficit = budget - sum(k * s for k, s in zip(counts, sizes))
    order = sorted(range(len(real)), key=lambda i: (-sizes[i], -(real[i] - counts[i]), i))
    open_ = [i for i in order if counts[i] < min(units[i], real[i] - 1e-9)]  # a ceiling above
    for i in list(open_):
        if 0 < sizes[i] <= deficit:
            counts[i] += 1
            deficit -= sizes[i]
            open_.remove(i)
    over = [i for i in open_ if sizes[i] - deficit < deficit]
    if deficit > 0 and over:
        i = min(over, key=lambda j: sizes[j])
        counts[i] += 1
        deficit -= sizes[i]
    for i in reversed(order):  # only when a floor rounded up: give units back
        if deficit >= 0:
            break
        if counts[i] > 1 and abs(deficit + sizes[i]) <= -deficit:
            counts[i] -= 1
            deficit += sizes[i]
    return counts


def _lamp_scores(importance: torch.Tensor) -> torch.Tensor:
    """LAMP score of every unit: ``v_u^2 / sum_{v >= v_u} v^2`` within the layer (ties ranked
    by index so every layer's largest unit scores exactly 1)."""
    sq = importance.detach().double().flatten() ** 2
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(importance)


def allocate(
    strategy: str,
    layers: Mapping[str, nn.Module],
    sparsity: float | str,
    *,
    granularity: str = "unstructured",
    **params: Any,
) -> dict[str, float]:
    """Per-layer densities (kept fractions of units) reaching ``sparsity`` over ``layers``.

    ``strategy``: see :func:`list_allocations`; ``params``: ``p`` for ``np``. The densities
    are exact unit fractions ``k / n``, so :func:`advprune.sparsity.kept_count` gives back
    ``k``. Raises :class:`ConfigError` when the target cannot be reached (fewer weights than
    one unit per layer) or a parameter is bad.
    """
    check_allocation(strategy)
    sparsity = check_sparsity(sparsity)
    check_granularity(granularity)
    if not layers:
        raise ConfigError("no prunable layers to allocate a sparsity over")
    check_allocation_params(strategy, params)
    names = list(layers)
    # magnitudes as the model computes with them: weights an earlier mask removed count as 0
    weights = {n: m.weight.detach() for n, m in layers.items()}
    shapes = [tuple(weights[n].shape) for n in names]
    sizes = [unit_size(s, granularity) for s in shapes]
    counts = [math.prod(s) for s in shapes]
    total = sum(counts)
    budget = round((1.0 - sparsity) * total)
    floor = sum(sizes)
    if budget < floor:
        unit = "weight" if granularity == "unstructured" else granularity[:-1]
        raise ConfigError(
            f"sparsity {sparsity} cannot be reached over {len(names)} layers: keeping one "
            f"{unit} per layer already keeps {floor} of {total} weights "
            f"(at most sparsity {1 - floor / total:.6f})"
        )
    problem = AllocationProblem(
        names=names,
        weights=weights,
        shapes=shapes,
        sizes=sizes,
        counts=counts,
        units=[math.prod(compact_shape(s, granularity)) for s in shapes],
        budget=budget,
        sparsity=sparsity,
        granularity=granularity,
    )
    options = parse_options(allocation_options(strategy), params, f"allocation {strategy!r}")
    return ALLOCATIONS.get(strategy)(problem, options)


def _ranked(problem: AllocationProblem, lamp: bool) -> dict[str, float]:
    importance = {
        n: magnitude_importance(problem.weights[n], problem.granularity) for n in problem.names
    }
    if lamp:
        importance = {n: _lamp_scores(v) for n, v in importance.items()}
    return allocate_densities(
        importance,
        problem.sparsity,
        scope="global",
        unit_sizes=dict(zip(problem.names, problem.sizes)),
    )


@register_allocation("uniform")
def _uniform(problem: AllocationProblem, options: Options) -> dict[str, float]:
    """Every layer at the target (up to whole units)."""
    return problem.from_ratios([1.0] * len(problem.names))


@register_allocation("erk")
def _erk(problem: AllocationProblem, options: Options) -> dict[str, float]:
    """Erdős–Rényi-kernel: density proportional to ``sum(shape) / prod(shape)``."""
    return problem.from_ratios([_erk_ratio(s) for s in problem.shapes])


@register_allocation("np", NPOptions)
def _np(problem: AllocationProblem, options: NPOptions) -> dict[str, float]:
    """The n^p rule: density proportional to ``n_l^(p - 1)``."""
    return problem.from_ratios([_np_ratio(options.p)(s) for s in problem.shapes])


@register_allocation("global")
def _global(problem: AllocationProblem, options: Options) -> dict[str, float]:
    """One ranking of every unit by magnitude."""
    return _ranked(problem, lamp=False)


@register_allocation("lamp")
def _lamp(problem: AllocationProblem, options: Options) -> dict[str, float]:
    """One ranking of every unit by its LAMP score."""
    return _ranked(problem, lamp=True)


__all__ = [
    "ALLOCATIONS",
    "AllocationProblem",
    "allocate",
    "allocation_options",
    "check_allocation",
    "check_allocation_params",
    "list_allocations",
    "register_allocation",
]
