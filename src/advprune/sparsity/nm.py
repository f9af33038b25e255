"""N:M semi-structured sparsity: keep N of every M consecutive weights along the input dimension.

2:4 is the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice the dense
speed (``torch.sparse.to_sparse_semi_structured``). Groups are M consecutive *input* weights of
one output unit: ``W[o, i:i+M]`` of a linear layer, ``W[o, i:i+M, y, x]`` of a convolution at one
kernel position (the layout the sparse kernels need for a convolution lowered to a matrix product
over input channels, as in NVIDIA's ASP). The input dimension must be a multiple of M.

These are pure functions on tensors; a mask they produce is a ``FixedMask`` of granularity
``unstructured`` like any other.
"""

from __future__ import annotations

import re

import torch

from advprune.errors import ConfigError

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
