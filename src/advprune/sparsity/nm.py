"""N:M semi-structured sparsity: keep N of every M consecutive weights along the input dimension.

2:4 is the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice the dense
speed (``torch.sparse.to_sparse_semi_structured``). Groups are M consecutive *input* weights of
one output unit: ``W[o, i:i+M]`` of a linear layer, ``W[o, i:i+M, y, x]`` of a convolution at one
kernel position (the layout the sparse kernels need for a convolution lowered to a matrix product
over input channels, as in NVIDIA's ASP). The input dimension must be a multiple of M.

The functions are pure functions on tensors. The structure ``N:M`` (``--structure 2:4``, see
:mod:`advprune.sparsity.structures`) uses two registered mask kinds, so checkpoints rebuild them
and check their pattern on load: :class:`NMMask` (kind ``nm``: a fixed N:M mask, LWM's) and
:class:`NMScoreMask` (kind ``nm-scores``: HYDRA's weight-shaped scores ranked within each group
of M, with a straight-through gradient). :func:`to_semi_structured` turns 2:4 linear layers into
``torch.sparse`` semi-structured tensors on a CUDA GPU of compute capability 8.0 or later.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from advprune.errors import CheckpointError, ConfigError
from advprune.sparsity.masks import (
    FixedMask,
    MaskBase,
    ScoreMask,
    masked_modules,
    register_mask_kind,
)
from advprune.sparsity.report import export_dense

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def check_nm(n: int, m: int) -> tuple[int, int]:
    """Return ``(n, m)`` if ``1 <= n < m`` (integers), else raise :class:`ConfigError`."""
    for value, name in ((n, "N"), (m, "M")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"N:M sparsity needs integers, got {name}={value!r}")
    if not 1 <= n < m:
        raise ConfigError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}")
    return n, m


def parse_nm(structure: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything else is a one-line :class:`ConfigError`."""
    match = _NM.match(structure) if isinstance(structure, str) else None
    if match is None:
        raise ConfigError(f"an N:M structure looks like '2:4', got {structure!r}")
    return check_nm(int(match.group(1)), int(match.group(2)))


def nm_compatible(shape: torch.Size | tuple[int, ...], m: int) -> bool:
    """Whether a weight of ``shape`` (out, in, ...) splits into groups of ``m`` inputs."""
    return len(shape) >= 2 and shape[1] % m == 0


def _groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``(out, in, *k)`` -> ``(out * prod(k) * in / m, m)``: rows are the groups."""
    return tensor.movedim(1, -1).reshape(-1, m)


def _ungroup(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1)


def nm_mask(importance: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 mask (dtype of ``importance``, same shape) keeping the ``n`` most important of every
    ``m`` consecutive weights along the input dimension (dim 1).

    ``importance`` is weight-shaped (``(out, in)`` or ``(out, in, kh, kw)``); ties are broken by
    ``topk``, so every group keeps exactly ``n`` whatever the values.
    """
    n, m = check_nm(n, m)
    shape = importance.shape
    if not nm_compatible(shape, m):
        raise ConfigError(
            f"{n}:{m} sparsity needs a weight whose input dimension (dim 1) is a multiple of "
            f"{m}; got shape {tuple(shape)}"
        )
    groups = _groups(importance.detach(), m)
    mask = torch.zeros_like(groups)
    mask.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, 1)
    return _ungroup(mask, shape)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``mask`` keeps exactly ``n`` non-zeros in every group of ``m`` input weights."""
    n, m = check_nm(n, m)
    if not nm_compatible(mask.shape, m):
        return False
    return bool((_groups(mask, m).ne(0).sum(1) == n).all())


class _NMStraightThrough(torch.autograd.Function):
    """Forward: the N:M 0/1 mask of the scores. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        return nm_mask(scores, n, m)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def _check_loaded(mask: torch.Tensor, n: int, m: int, prefix: str) -> None:
    if not is_nm(mask, n, m):
        raise CheckpointError(
            f"{prefix.rstrip('.') or 'mask'}: the stored mask is not {n}:{m} (some group of {m} "
            f"inputs keeps other than {n}); the checkpoint was altered"
        )


def _check_layer(
    weight_shape: torch.Size | tuple[int, ...], granularity: str, n: int, m: int
) -> tuple[int, int]:
    """``(n, m)`` once checked against a layer: weight-shaped masks, inputs a multiple of m."""
    n, m = check_nm(n, m)
    if granularity != "unstructured":
        raise ConfigError(f"an N:M mask is weight-shaped (unstructured), not {granularity}")
    if not nm_compatible(tuple(weight_shape), m):
        raise ConfigError(
            f"{n}:{m} sparsity needs a weight whose input dimension is a multiple of {m}; "
            f"got shape {tuple(weight_shape)}"
        )
    return n, m


@register_mask_kind
class NMMask(FixedMask):
    """A fixed N:M mask (kind ``nm``): a weight-shaped 0/1 buffer keeping exactly ``n`` of
    every ``m`` consecutive input weights; checked when built and when loaded."""

    kind: ClassVar[str] = "nm"

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        granularity: str = "unstructured",
        mask: torch.Tensor | None = None,
        *,
        n: int = 2,
        m: int = 4,
    ) -> None:
        self.n, self.m = _check_layer(weight_shape, granularity, n, m)
        if mask is None:
            mask = nm_mask(torch.ones(weight_shape), n, m)
        super().__init__(weight_shape, granularity, mask)
        if not is_nm(self.mask, n, m):
            raise ConfigError(f"the mask given is not {n}:{m}")

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "n": self.n, "m": self.m}

    @classmethod
    def from_spec(cls, weight: torch.Tensor, spec: dict[str, Any]) -> MaskBase:
        return cls(weight.shape, spec["granularity"], n=int(spec["n"]), m=int(spec["m"]))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        _check_loaded(self.mask, self.n, self.m, prefix)


@register_mask_kind
class NMScoreMask(ScoreMask):
    """HYDRA's learned scores under an N:M structure (kind ``nm-scores``): weight-shaped
    scores, the mask keeps the ``n`` largest ``|score|`` of every ``m`` consecutive inputs
    (:func:`nm_mask`) and passes the gradient straight through to the scores."""

    kind: ClassVar[str] = "nm-scores"
    WEIGHT_SHAPED: ClassVar[bool] = True

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        granularity: str = "unstructured",
        scores: torch.Tensor | None = None,
        *,
        n: int = 2,
        m: int = 4,
    ) -> None:
        self.n, self.m = _check_layer(weight_shape, granularity, n, m)
        super().__init__(weight_shape, granularity, n / m, scores, weight_shaped=True)

    def compact_mask(self) -> torch.Tensor:
        return _NMStraightThrough.apply(self.scores.abs(), self.n, self.m)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "n": self.n, "m": self.m}

    @classmethod
    def from_spec(cls, weight: torch.Tensor, spec: dict[str, Any]) -> MaskBase:
        return cls(weight.shape, spec["granularity"], n=int(spec["n"]), m=int(spec["m"]))


def nm_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (n, m)}`` of every layer carrying an N:M mask."""
    return {
        name: (mask.n, mask.m)
        for name, (_, mask) in masked_modules(model).items()
        if isinstance(mask, (NMMask, NMScoreMask))
    }


# ---------------------------------------------------------------------------- CUDA 2:4 kernels


def semi_structured_support(device: torch.device | str | None = None) -> str | None:
    """Why torch's 2:4 semi-structured kernels cannot run here (None: they can).

    They need a CUDA GPU of compute capability 8.0 or later (Ampere, Hopper, ...)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    device = torch.device(device or "cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device)
        return f"{name} (sm_{major}{minor}) predates Ampere; 2:4 kernels need sm_80 or later"
    return None


@dataclass
class SemiStructuredRecord:
    """Which linear layers :func:`to_semi_structured` converted, and why others stayed dense."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def to_semi_structured(
    model: nn.Module, *, device: str = "cuda", dtype: torch.dtype = torch.float16
) -> tuple[nn.Module, SemiStructuredRecord]:
    """A copy of ``model`` on ``device`` in ``dtype`` whose 2:4 linear weights are
    ``torch.sparse`` semi-structured tensors (CUDA, compute capability >= 8.0 only).

    Masks are folded in first. Only ``nn.Linear`` layers convert (torch has no semi-structured
    convolution); a layer whose folded weight is not 2:4, or whose shape the kernels refuse,
    stays dense and the record says why. On a machine without such a GPU: one-line
    :class:`ConfigError`.
    """
    why = semi_structured_support(device)
    if why is not None:
        raise ConfigError(f"2:4 semi-structured kernels unavailable: {why}")
    from torch.sparse import to_sparse_semi_structured

    out = export_dense(copy.deepcopy(model)).to(device=device, dtype=dtype).eval()
    record = SemiStructuredRecord()
    for name, module in out.named_modules():
        if isinstance(module, nn.Conv2d):
            record.skipped[name] = "convolution: torch has no semi-structured convolution kernel"
        if not isinstance(module, nn.Linear):
            continue
        if not is_nm(module.weight, 2, 4):
            record.skipped[name] = "its weight is not 2:4"
            continue
        try:
            module.weight = nn.Parameter(
                to_sparse_semi_structured(module.weight.detach()), requires_grad=False
            )
        except (RuntimeError, ValueError) as exc:
            record.skipped[name] = str(exc).strip().splitlines()[0]
            continue
        record.converted.append(name)
    return out, record


def semi_structured_latency(
    model: nn.Module,
    input_size: tuple[int, ...] | list[int],
    batch_sizes: tuple[int, ...] | list[int] = (1, 256),
    *,
    device: str = "cuda",
    warmup: int = 10,
    repeats: int = 50,
) -> dict[str, Any]:
    """Measured fp16 latency of 2:4 semi-structured linear layers against the same dense
    layers (CUDA, compute capability >= 8.0; else a one-line :class:`ConfigError`).

    Each converted linear layer is timed alone on a batch of its own input size, dense and
    semi-structured in turn (:func:`advprune.sparsity.measure_latency`: warm-up, median of
    ``repeats``); the whole model too. Returns ``{"layers": [...], "model": [...],
    "skipped": {layer: why}}`` with per row the batch size, both medians and the speed-up.
    """
    from advprune.sparsity.profiling import measure_latency

    sparse, record = to_semi_structured(model, device=device)
    dense = export_dense(copy.deepcopy(model)).to(device=device, dtype=torch.float16).eval()
    modules = dict(sparse.named_modules())
    dense_modules = dict(dense.named_modules())

    def timed(a: nn.Module, b: nn.Module, size: tuple[int, ...], batch: int) -> dict[str, Any]:
        lat = measure_latency(
            {"dense": a, "2:4": b}, size, batch, device=device, warmup=warmup,
            repeats=repeats, dtype=torch.float16, move=False,
        )  # fmt: skip
        d, s = lat["dense"].median_ms, lat["2:4"].median_ms
        return {"batch_size": batch, "dense_ms": d, "semi_structured_ms": s, "speedup": d / s}

    layers = []
    for name in record.converted:
        layer = modules[name]
        for batch in batch_sizes:
            row = timed(dense_modules[name], layer, (layer.in_features,), batch)
            layers.append({"layer": name, "out": layer.out_features, "in": layer.in_features,
                           **row})  # fmt: skip
    whole = [timed(dense, sparse, tuple(input_size), b) for b in batch_sizes]
    device_name = torch.cuda.get_device_name(torch.device(device))
    return {"device": device_name, "layers": layers, "model": whole, "skipped": record.skipped}
