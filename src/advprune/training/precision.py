"""The numeric precision of a training stage, handed to the trainer from outside.

- ``fp32`` (default): no autocast.
- ``bf16``: autocast to bfloat16 (CUDA and CPU); no gradient scaler is needed (bfloat16 has
  float32's range).
- ``fp16``: autocast to float16 with a gradient scaler; CUDA only.
- ``amp``: the earlier ``amp: true`` setting: ``fp16`` on CUDA, ``bf16`` on the CPU.

Master weights, optimizer state and the loss stay float32 in every mode. Evaluation and the
final robustness numbers always run in fp32; the card records the training precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from advprune.errors import ConfigError, UnknownNameError

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("fp32", "bf16", "fp16", "amp")


@dataclass(frozen=True)
class Precision:
    """``name`` is one of :data:`PRECISIONS`."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise UnknownNameError("precision", self.name, PRECISIONS)

    @classmethod
    def from_amp(cls, amp: bool) -> Precision:
        """The precision of the earlier ``amp`` switch."""
        return cls("amp" if amp else "fp32")

    @classmethod
    def from_config(cls, config: Any) -> Precision:
        """The precision a :class:`~advprune.training.TrainConfig` asks for (``precision``,
        or the earlier ``amp: true``)."""
        name = getattr(config, "precision", "fp32")
        if getattr(config, "amp", False):
            if name not in ("fp32", "amp"):
                raise ConfigError(
                    f"amp and precision {name} both set; set precision only (amp is its old name)"
                )
            name = "amp"
        return cls(name)

    @property
    def mixed(self) -> bool:
        """Whether autocast runs (anything but fp32)."""
        return self.name != "fp32"

    def resolved(self, device: torch.device) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what runs on ``device`` (``amp`` made concrete)."""
        if self.name != "amp":
            return self.name
        return "fp16" if device.type == "cuda" else "bf16"

    def check(self, device: torch.device) -> None:
        """A one-line :class:`ConfigError` if ``device`` cannot train in this precision."""
        if self.resolved(device) == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"precision fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
                f"on {device.type} use --precision bf16 or fp32"
            )

    def dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device``."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.resolved(device), torch.float32
        )

    def autocast(self, device: torch.device) -> Any:
        """The autocast context of a training step on ``device``."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype(device), enabled=True)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for float16 (on CUDA) only."""
        enabled = self.resolved(device) == "fp16" and device.type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=enabled)
