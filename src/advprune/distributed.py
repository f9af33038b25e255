"""The distributed context handed to the training loop and the evaluation: which process this
is among how many, and how to sum a number over all of them.

advprune runs in one process by default (:data:`SINGLE`). A launcher (``torchrun``, a grid job)
builds a :class:`DistContext` with :meth:`DistContext.from_env` once ``torch.distributed`` is
initialised; the trainer writes checkpoints and logs on the main process only and reduces its
epoch counts with :meth:`DistContext.reduce_sum`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["SINGLE", "DistContext"]


@dataclass(frozen=True)
class DistContext:
    """``rank`` of ``world_size`` processes (``local_rank`` on this machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every process (itself in a single process)."""
        if not self.distributed:
            return value
        out = value.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a single process)."""
        if self.distributed:
            torch.distributed.barrier()

    @classmethod
    def from_env(cls) -> DistContext:
        """The context of an initialised ``torch.distributed`` process group (else
        :data:`SINGLE`); ``LOCAL_RANK`` as torchrun sets it."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return SINGLE
        return cls(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


SINGLE = DistContext()
