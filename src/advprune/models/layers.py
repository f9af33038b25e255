"""Layers shared by every model: the input normalisation that is each model's first step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from advprune.errors import ConfigError

Stats = float | int | Sequence[float] | torch.Tensor


def as_float_tuple(value: Stats, name: str) -> tuple[float, ...]:
    """Turn a number, sequence or tensor of per-channel statistics into a tuple of floats."""
    if isinstance(value, (bool, str, bytes)):
        raise ConfigError(f"{name} must be a number or a sequence of numbers, got {value!r}")
    try:
        if isinstance(value, torch.Tensor):
            values = [float(v) for v in value.detach().flatten().tolist()]
        elif isinstance(value, (int, float)):
            values = [float(value)]
        else:
            values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a number or a sequence of numbers, got {value!r}"
        ) from None
    if not values:
        raise ConfigError(f"{name} must have at least one value, got an empty sequence")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be finite, got {values}")
    return tuple(values)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the first step of every model (inputs are in [0, 1]).

    ``mean`` and ``std`` are non-persistent buffers: they follow ``.to(device)`` but are not in
    the ``state_dict``, so checkpoints keep the reference repositories' key layout. A single
    value broadcasts over all channels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Stats = 0.0, std: Stats = 1.0) -> None:
        super().__init__()
        mean_t = as_float_tuple(mean, "mean")
        std_t = as_float_tuple(std, "std")
        if len(mean_t) != len(std_t) and 1 not in (len(mean_t), len(std_t)):
            raise ConfigError(
                f"mean has {len(mean_t)} values but std has {len(std_t)}; "
                "give one value per channel or a single value"
            )
        if any(s <= 0 for s in std_t):
            raise ConfigError(f"std must be > 0 for every channel, got {list(std_t)}")
        self.register_buffer("mean", torch.tensor(mean_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_t).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def identity(cls, channels: int = 1) -> Normalize:
        """A Normalize that leaves inputs unchanged (mean 0, std 1 for every channel)."""
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def is_identity(self) -> bool:
        """True when mean is 0 and std is 1 for every channel."""
        return bool((self.mean == 0).all() and (self.std == 1).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch ``(N, C, H, W)`` channel by channel."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"
