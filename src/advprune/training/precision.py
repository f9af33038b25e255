"""The numeric precision of a training stage, handed to the trainer from outside.

``fp32`` (default) or ``amp``: mixed precision with autocast (float16 and a gradient scaler on
CUDA, bfloat16 on CPU). The evaluation always runs in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from advprune.errors import UnknownNameError

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "amp")


@dataclass(frozen=True)
class Precision:
    """``name`` is one of :data:`PRECISIONS`."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise UnknownNameError("precision", self.name, PRECISIONS)

    @classmethod
    def from_amp(cls, amp: bool) -> Precision:
        return cls("amp" if amp else "fp32")

    @property
    def mixed(self) -> bool:
        return self.name == "amp"

    def dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device``."""
        return torch.float16 if device.type == "cuda" else torch.bfloat16

    def autocast(self, device: torch.device) -> Any:
        """The autocast context of a training step on ``device``."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype(device), enabled=True)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A gradient scaler (enabled for float16 on CUDA only)."""
        return torch.amp.GradScaler("cuda", enabled=self.mixed and device.type == "cuda")
