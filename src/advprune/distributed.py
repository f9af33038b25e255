"""The distributed context handed to the training loop and the evaluation: which process this
is among how many, its device, and the few collectives advprune needs.

advprune runs in one process by default (:data:`SINGLE`). Under ``torchrun`` (or any launcher
that sets its environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` / ``MASTER_PORT``), :func:`init_distributed` initialises
``torch.distributed`` once (``nccl`` on CUDA, ``gloo`` on CPU) and returns the
:class:`DistContext` of this process; :meth:`DistContext.from_env` gives it again anywhere
later. The trainer writes checkpoints and logs on the main process only (:attr:`is_main`) and
reduces its counts with :meth:`DistContext.reduce_sum`; gradients are averaged by PyTorch's
own ``DistributedDataParallel`` (:func:`local_module` unwraps it where a computation must not
go through its hooks, e.g. an attack's forward passes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advprune.errors import ConfigError

__all__ = [
    "SINGLE",
    "DistContext",
    "init_distributed",
    "launched",
    "local_module",
    "shutdown",
]


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
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def backend(self) -> str | None:
        """The process group's backend (``nccl``, ``gloo``), None in a single process."""
        if not self.distributed or not _initialized():
            return None
        return str(torch.distributed.get_backend())

    @property
    def device(self) -> torch.device:
        """This process's default device: ``cuda:LOCAL_RANK`` where CUDA is available (and the
        group, if any, is not a CPU-only ``gloo`` one), else the CPU."""
        if torch.cuda.is_available() and self.backend in (None, "nccl"):
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``value`` reduced over every process (``sum``, ``max``, ``min``); a new tensor,
        ``value`` itself in a single process."""
        if not self.distributed:
            return value
        ops = {
            "sum": torch.distributed.ReduceOp.SUM,
            "max": torch.distributed.ReduceOp.MAX,
            "min": torch.distributed.ReduceOp.MIN,
        }
        if op not in ops:
            raise ConfigError(f"unknown reduction {op!r}; valid: {', '.join(ops)}")
        out = value.clone()
        torch.distributed.all_reduce(out, op=ops[op])
        return out

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every process (itself in a single process)."""
        return self.all_reduce(value, "sum")

    def broadcast(self, value: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``value`` of process ``src`` on every process (in place; returned)."""
        if self.distributed:
            torch.distributed.broadcast(value, src=src)
        return value

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A picklable object of process ``src`` on every process (sent over the process
        group, never read from a file)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module, src: int = 0, *, parameters: bool = True) -> None:
        """Copy the buffers (e.g. BatchNorm statistics) and, with ``parameters``, the
        parameters of ``module`` on process ``src`` to every process."""
        if not self.distributed:
            return
        tensors = [*module.parameters(), *module.buffers()] if parameters else module.buffers()
        for tensor in tensors:
            torch.distributed.broadcast(tensor.data, src=src)

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a single process)."""
        if self.distributed:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index or 0])
            else:
                torch.distributed.barrier()

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    @classmethod
    def from_env(cls) -> DistContext:
        """The context of an initialised ``torch.distributed`` process group (else
        :data:`SINGLE`); ``LOCAL_RANK`` as torchrun sets it."""
        if not _initialized():
            return SINGLE
        return cls(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


SINGLE = DistContext()


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several
    (``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment and return this process's
    context; :data:`SINGLE` when not launched as one of several processes.

    ``device``: ``auto`` / None (CUDA when available), ``cpu``, ``cuda``. CUDA runs use
    ``nccl`` with one GPU per process (``cuda:LOCAL_RANK``, made the current device); the CPU
    uses ``gloo``. Calling it again returns the existing context.
    """
    if _initialized():
        return DistContext.from_env()
    if not launched():
        return SINGLE
    if not torch.distributed.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run one process")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE is set but {name} is not; start several processes with "
                "`torchrun --nproc-per-node N -m advprune.cli ...`"
            )
    kind = str(device or "auto")
    cuda = torch.cuda.is_available() if kind == "auto" else kind.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {kind!r} requested but CUDA is not available")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                "GPUs; use --nproc-per-node of at most the GPU count"
            )
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext.from_env()


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group (nothing to do in a single process). ``wait``: first wait for
    every process to arrive (after a successful run), so that none tears down its connections
    while another still uses them (gloo then aborts the other with ``terminate called``);
    never after an error, where a dead process would never arrive."""
    if _initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def local_module(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper holds (``model`` itself otherwise).

    Forward passes that must not trigger DDP's gradient hooks and buffer broadcasts (an
    attack's inner steps, bounds, evaluation) run on it; it shares every parameter with the
    wrapper.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model
