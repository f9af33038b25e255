"""Masks attached to ordinary ``nn.Conv2d`` / ``nn.Linear`` layers.

A mask is a ``torch.nn.utils.parametrize`` parametrisation of the layer's ``weight``: the module
keeps its class and its ``weight`` attribute, the dense tensor lives on as
``parametrizations.weight.original``, and :func:`advprune.sparsity.export_dense` folds the mask
in and removes the parametrisation again.

Masks are stored *compactly*: one entry per weight (``unstructured``), per output channel
(``filters``) or per input channel (``channels``), and broadcast onto the weight.

Every mask kind lives here, each registered under a ``kind`` so that checkpoints can rebuild
them without importing the method that made them:

- :class:`FixedMask` (``"fixed"``): a 0/1 buffer.
- :class:`ScoreMask` (``"scores"``): learnable scores; the mask keeps the units with the
  largest ``|score|`` and passes the gradient straight through to the scores (the HYDRA
  estimator). Its presets :class:`HydraMask` (``"hydra"``: weight-shaped scores) and
  :class:`RateMask` (``"harp"``: a learnable layer rate instead of a fixed density) are the
  same class with options set.

A new kind: subclass :class:`MaskBase` and decorate it with :func:`register_mask_kind`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from advprune.errors import ConfigError, UnknownNameError
from advprune.registry import Registry

GRANULARITIES = ("unstructured", "filters", "channels")
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

_MASK_KINDS: Registry[type[MaskBase]] = Registry("mask kind")


def check_granularity(granularity: str) -> str:
    """Return ``granularity`` if valid, else raise :class:`UnknownNameError`."""
    if granularity not in GRANULARITIES:
        raise UnknownNameError("granularity", granularity, GRANULARITIES)
    return granularity


def compact_shape(weight_shape: torch.Size | tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Shape of the compact mask for a weight of ``weight_shape``."""
    check_granularity(granularity)
    if granularity == "unstructured":
        return tuple(weight_shape)
    if granularity == "filters":
        return (weight_shape[0],)
    return (weight_shape[1],)


def expand_mask(mask: torch.Tensor, weight_shape: torch.Size, granularity: str) -> torch.Tensor:
    """Broadcast a compact mask to ``weight_shape`` (a view where possible)."""
    if granularity == "unstructured":
        return mask
    ones = [1] * (len(weight_shape) - 1)
    if granularity == "filters":
        return mask.view(-1, *ones)
    return mask.view(1, -1, *ones[1:])


def unit_size(weight_shape: torch.Size | tuple[int, ...], granularity: str) -> int:
    """Number of weights one compact mask entry controls."""
    n = math.prod(weight_shape)
    return n // math.prod(compact_shape(weight_shape, granularity))


def kept_count(n: int, density: float) -> int:
    """Units kept at ``density``: ``round(density * n)``, at least one (no layer is cut off)."""
    return min(n, max(1, round(density * n)))


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask (dtype of ``scores``) keeping the ``kept_count`` largest entries exactly.

    Uses ``topk`` on indices rather than a threshold, so ties never change the count (which
    of several tied entries is kept is unspecified, as with ``torch.topk``).
    """
    flat = scores.detach().flatten()
    k = kept_count(flat.numel(), density)
    mask = _banded_topk_mask(flat, k)
    if mask is None:
        mask = torch.zeros_like(flat)
        mask[torch.topk(flat, k, sorted=False).indices] = 1
    return mask.view_as(scores)


_BAND_MIN_SIZE = 1 << 16  # smaller tensors: torch.topk directly
_BAND_SAMPLE = 1 << 14


def _banded_topk_mask(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """The top-``k`` mask of a large CPU tensor, or None (the caller runs ``torch.topk``).

    ``torch.topk`` on the CPU costs ~40 ns per entry (a score-masked ResNet-18 spends more on
    its masks than on a batch of 4 images' PGD step); here the k-th largest value is first
    bracketed by quantiles of a strided sample (4 standard deviations either side), every entry
    above the bracket is kept, and ``topk`` runs on the entries inside it only. Exact: when
    the bracket misses the k-th value (fewer than ``k`` entries at or above its bottom, or more
    than ``k`` above its top), None sends the caller to the full ``topk``. On CUDA ``topk`` is
    fast already (and the checks here would synchronise), so None too.
    """
    n = flat.numel()
    if flat.device.type != "cpu" or n < _BAND_MIN_SIZE or not 0 < k < n:
        return None
    sample = flat[:: n // _BAND_SAMPLE].sort().values
    m = sample.numel()
    q = 1.0 - k / n  # the fraction of entries below the k-th largest
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_i, hi_i = max(0, math.floor(q * m - margin)), min(m - 1, math.ceil(q * m + margin))
    lo, hi = sample[lo_i], sample[hi_i]
    above = flat > hi
    n_above = int(torch.count_nonzero(above))
    band = ((flat >= lo) & ~above).nonzero().squeeze(1)
    need = k - n_above
    if need < 0 or need > band.numel():
        return None
    mask = above.to(flat.dtype)
    if need:
        mask[band[torch.topk(flat[band], need, sorted=False).indices]] = 1
    return mask


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: top-k 0/1 mask of the scores. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, density: float) -> torch.Tensor:
        return topk_mask(scores, density)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through_topk(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k mask of ``scores`` whose gradient passes straight through to ``scores``."""
    return _TopKStraightThrough.apply(scores, density)


class MaskBase(nn.Module):
    """A parametrisation ``weight -> weight * mask``; subclasses say where the mask comes from.

    Subclasses set ``kind``, implement :meth:`compact_mask`, and can rebuild themselves from
    :meth:`spec` through :meth:`from_spec` (their tensors then come from the state dict).
    """

    kind: ClassVar[str] = ""

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], granularity: str) -> None:
        super().__init__()
        self.weight_shape = torch.Size(weight_shape)
        self.granularity = check_granularity(granularity)

    def compact_mask(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The 0/1 mask in compact shape (gradient-carrying where the source learns)."""
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.compact_mask().to(weight.dtype)
        return weight * expand_mask(mask, weight.shape, self.granularity)

    def full_mask(self) -> torch.Tensor:
        """The detached 0/1 mask broadcast to the weight's shape."""
        with torch.no_grad():
            mask = self.compact_mask().detach()
            return expand_mask(mask, self.weight_shape, self.granularity).expand(self.weight_shape)

    def density(self) -> float:
        """Measured kept fraction of the layer's weights."""
        return float(self.compact_mask().detach().float().mean())

    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_spec` rebuilds an empty instance."""
        return {"kind": self.kind, "granularity": self.granularity}

    @classmethod
    def from_spec(cls, weight: torch.Tensor, spec: dict[str, Any]) -> MaskBase:
        """Rebuild from :meth:`spec`; tensors are filled afterwards by ``load_state_dict``."""
        return cls(weight.shape, spec["granularity"])


def register_mask_kind(cls: type[MaskBase]) -> type[MaskBase]:
    """Class decorator registering a mask kind so checkpoints can rebuild it."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} must set a non-empty `kind`")
    return _MASK_KINDS.add(cls.kind, cls)


def mask_kind(kind: str) -> type[MaskBase]:
    """Look up a registered mask kind."""
    return _MASK_KINDS.get(kind)


def list_mask_kinds(pattern: str = "*") -> list[str]:
    """Registered mask kinds (``fixed``, ``harp``, ``hydra``, ``scores``, ...)."""
    return _MASK_KINDS.names(pattern)


def create_mask(kind: str, weight_shape: torch.Size | tuple[int, ...], **kwargs: Any) -> MaskBase:
    """An empty mask of ``kind`` for a weight of ``weight_shape`` (``kwargs``: the kind's own
    arguments, e.g. ``granularity``, ``density``)."""
    return mask_kind(kind)(weight_shape, **kwargs)


@register_mask_kind
class FixedMask(MaskBase):
    """A fixed 0/1 mask held in the buffer ``mask`` (compact shape)."""

    kind: ClassVar[str] = "fixed"

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        granularity: str = "unstructured",
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(weight_shape, granularity)
        shape = compact_shape(self.weight_shape, granularity)
        if mask is None:
            mask = torch.ones(shape)
        if tuple(mask.shape) != shape:
            raise ConfigError(
                f"mask of shape {tuple(mask.shape)} does not fit a {granularity} mask of a "
                f"weight {tuple(self.weight_shape)} (expected {shape})"
            )
        self.register_buffer("mask", (mask != 0).float())

    def compact_mask(self) -> torch.Tensor:
        return self.mask


class _RateTopK(torch.autograd.Function):
    """Forward: the top ``ceil(a * n)`` mask of the scores. Backward: straight through to the
    scores, and the sum of the mask gradients to the density ``a``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        n = scores.numel()
        return topk_mask(scores, kept_units(float(density), n) / n)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.sum().to(torch.float64)


_CEIL_TOL = 1e-6  # a * n within this of an integer counts as that integer


def kept_units(density: float, units: int) -> int:
    """``ceil(density * units)``, at least one and at most ``units`` (a rate mask's count)."""
    return min(units, max(1, math.ceil(density * units - _CEIL_TOL)))


def rate_density(rate: torch.Tensor, a_min: torch.Tensor | float) -> torch.Tensor:
    """The density map ``a = (1 - a_min) * sigmoid(rate) + a_min`` (differentiable)."""
    return (1.0 - a_min) * torch.sigmoid(rate) + a_min


@register_mask_kind
class ScoreMask(MaskBase):
    """Top-k of learnable scores with a straight-through gradient (HYDRA's estimator).

    One concept with two options, each a registered kind so that checkpoints rebuild it:

    - where the scores live: ``weight_shaped=False`` (default, kind ``scores``): one score per
      mask unit (compact shape); ``weight_shaped=True`` (kind ``hydra``, :class:`HydraMask`):
      scores of the weight's shape, a structured unit ranked by the L1 norm of its scores;
    - where the density comes from: a fixed ``density`` (the buffer ``target_density``; the
      mask keeps ``round(density * n)`` units) or, with ``rate`` given (kind ``harp``,
      :class:`RateMask`), a learnable float64 scalar ``rate`` with
      ``a = (1 - a_min) * sigmoid(rate) + a_min`` and ``ceil(a * n)`` units kept; the gradient
      reaches the rate as the sum of the mask's gradients.
    """

    kind: ClassVar[str] = "scores"
    WEIGHT_SHAPED: ClassVar[bool] = False  # the default of ``weight_shaped`` (presets set it)

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        granularity: str = "unstructured",
        density: float = 1.0,
        scores: torch.Tensor | None = None,
        *,
        weight_shaped: bool | None = None,
        rate: float | None = None,
        a_min: float = 0.0,
    ) -> None:
        super().__init__(weight_shape, granularity)
        self.weight_shaped = self.WEIGHT_SHAPED if weight_shaped is None else bool(weight_shaped)
        if self.weight_shaped:
            shape = tuple(self.weight_shape)
            if scores is None:
                scores = torch.zeros(shape)  # filled by load_state_dict
        else:
            shape = compact_shape(self.weight_shape, granularity)
            if scores is None:
                scores = torch.empty(shape).uniform_(-1.0, 1.0)
        if tuple(scores.shape) != shape:
            whose = "the weight's " if self.weight_shaped else ""
            raise ConfigError(f"scores of shape {tuple(scores.shape)}; expected {whose}{shape}")
        self.scores = nn.Parameter(scores.detach().clone().float())
        self.rate: nn.Parameter | None = None
        if rate is None:
            self.register_buffer("target_density", torch.tensor(float(density)))
        else:
            # float64: the kept count ceil(a * n) jumps at integers, so the density must not
            # drift by float32 rounding
            self.rate = nn.Parameter(torch.tensor(float(rate), dtype=torch.float64))
            self.register_buffer("a_min", torch.tensor(float(a_min), dtype=torch.float64))

    @property
    def units(self) -> int:
        """Number of maskable units (weights, or filters / channels)."""
        return math.prod(compact_shape(self.weight_shape, self.granularity))

    def unit_scores(self) -> torch.Tensor:
        """Importance of each mask unit (compact shape), differentiable in the scores."""
        a = self.scores.abs()
        if not self.weight_shaped or self.granularity == "unstructured":
            return a
        if self.granularity == "filters":
            return a.flatten(1).sum(1)
        return a.transpose(0, 1).flatten(1).sum(1)

    def layer_density(self) -> torch.Tensor:
        """The density the mask keeps: the rate's ``a`` (differentiable float64) or the
        fixed ``target_density``."""
        if self.rate is None:
            return self.target_density
        return rate_density(self.rate, self.a_min)

    def kept(self) -> int:
        """Units the mask keeps now."""
        if self.rate is None:
            return kept_count(self.units, float(self.target_density))
        return kept_units(float(self.layer_density().detach()), self.units)

    def compact_mask(self) -> torch.Tensor:
        if self.rate is not None:
            return _RateTopK.apply(self.unit_scores(), self.layer_density())
        return straight_through_topk(self.unit_scores(), float(self.target_density))


@register_mask_kind
class HydraMask(ScoreMask):
    """HYDRA's preset of :class:`ScoreMask`: weight-shaped scores, fixed density (kind
    ``hydra``); structured units are ranked by the L1 norm of their scores."""

    kind: ClassVar[str] = "hydra"
    WEIGHT_SHAPED: ClassVar[bool] = True


@register_mask_kind
class RateMask(ScoreMask):
    """HARP's preset of :class:`ScoreMask`: compact scores and a learnable float64 ``rate``
    giving the density ``a = (1 - a_min) * sigmoid(rate) + a_min`` (kind ``harp``)."""

    kind: ClassVar[str] = "harp"

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        granularity: str = "unstructured",
        a_min: float = 0.0,
        rate: float = 0.0,
        scores: torch.Tensor | None = None,
    ) -> None:
        super().__init__(weight_shape, granularity, 1.0, scores, rate=rate, a_min=a_min)


def is_masked(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries an advprune mask."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, MaskBase) for p in module.parametrizations["weight"]
    )


def get_mask(module: nn.Module) -> MaskBase | None:
    """The module's advprune mask parametrisation, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, MaskBase):
            return p
    return None


def attach_mask(module: nn.Module, mask: MaskBase) -> MaskBase:
    """Attach ``mask`` to ``module.weight``, replacing an existing advprune mask.

    The dense weight is kept (as ``parametrizations.weight.original``), so replacing a mask
    never loses the weights the previous mask hid.
    """
    if not isinstance(module, PRUNABLE_TYPES):
        raise ConfigError(f"cannot mask a {type(module).__name__}; only Conv2d and Linear")
    if tuple(mask.weight_shape) != tuple(module.weight.shape):
        raise ConfigError(
            f"mask for a weight {tuple(mask.weight_shape)} does not fit "
            f"{tuple(module.weight.shape)}"
        )
    if is_masked(module):
        remove_mask(module, fold=False)
    mask = mask.to(module.weight.device)
    parametrize.register_parametrization(module, "weight", mask)
    return mask


@torch.no_grad()
def remove_mask(module: nn.Module, *, fold: bool) -> None:
    """Remove the mask from ``module.weight``; ``fold=True`` keeps the masked values.

    The weight stays the same ``nn.Parameter`` object (optimizers that hold it keep working).
    Unlike ``parametrize.remove_parametrizations``, this never edits the parametrised class,
    which ``copy.deepcopy`` shares between a model and its copies: removing the mask from a
    copy leaves the original intact.
    """
    plist = module.parametrizations["weight"]
    original = plist.original
    if fold:
        original.copy_(module.weight)
    if len(module.parametrizations) > 1:  # other tensors parametrised too: torch's own path
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    module.register_parameter("weight", original)


def masked_modules(model: nn.Module) -> dict[str, tuple[nn.Module, MaskBase]]:
    """``{name: (module, mask)}`` for every masked layer, in module order."""
    out = {}
    for name, module in model.named_modules():
        mask = get_mask(module)
        if mask is not None:
            out[name] = (module, mask)
    return out


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's dense (unmasked) weight tensor."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


@contextmanager
def cached_masks(model: nn.Module) -> Iterator[None]:
    """Within the block, every masked (parametrised) weight of ``model`` is computed once and
    reused by every forward pass, instead of recomputing the mask (a top-k for score masks)
    at each of them: the ``1 + steps`` forward passes of an adversarial-training step then
    share one mask. Parameters must not change inside the block (leave it before the
    optimizer steps).

    The weights are computed on entry, in the caller's grad mode (``torch.nn.utils.
    parametrize.cached`` alone would cache whichever forward comes first, e.g. one under
    ``no_grad``, and the loss would then carry no gradient to the weights and scores). The
    result is the same tensor an uncached forward computes, so losses and gradients are the
    same as without the cache (``tests/test_cached_masks.py``).
    """
    modules = [m for m in model.modules() if parametrize.is_parametrized(m)]
    if not modules:
        yield
        return
    with parametrize.cached():
        for module in modules:
            for name in module.parametrizations:
                getattr(module, name)  # computed now, cached for the block
        yield
