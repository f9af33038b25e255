"""Evaluation at scale: the processes of a sharded evaluation and the automatic batch size.

A sharded evaluation splits the evaluation set by *batch*: batch ``b`` (seeded from
``(seed, attack, b)`` as in one process) is run by process ``b % N``, so the per-sample results
do not depend on ``N``; each finished batch is its own atomic file in ``OUT/batches/``, so a
killed run, restarted with any ``N``, runs only the batches that are missing. Rank 0 gathers
the batches and writes the one report.

Two ways to start the processes: ``torchrun --nproc-per-node N -m advprune.cli eval ...``
(the process group comes from torchrun's environment), or ``evaluate(..., devices=N)`` from
Python, which starts them itself with :func:`torch.multiprocessing.spawn` (one per GPU, or on a
CPU-only machine N processes sharing the cores) and returns rank 0's report.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.distributed import DistContext
from advprune.errors import AdvpruneError, ConfigError

__all__ = [
    "AUTO_BATCH_CPU",
    "AUTO_BATCH_MAX",
    "auto_batch_size",
    "eval_devices",
    "shard_of",
    "spawn_evaluate",
]

#: the automatic batch size on a CPU: larger batches bring no speed on a CPU (the cores are
#: busy from a few dozen digits or CIFAR images on), and a batch is the unit of resumption
AUTO_BATCH_CPU = 128
#: the largest automatic batch size on a GPU
AUTO_BATCH_MAX = 4096
#: an attack holds several input-sized tensors and one forward/backward at a time; a batch
#: "fits" when this many times its forward/backward peak fits in the free memory
AUTO_BATCH_HEADROOM = 3.0
_ERROR_FILE = "error-{rank}.txt"


def eval_devices(devices: int | str | Sequence[str | torch.device]) -> list[torch.device]:
    """``devices`` as a list, one per process: N (N GPUs where CUDA is available, else N CPU
    processes), or a list such as ``["cuda:0", "cuda:1"]`` / ``["cpu", "cpu"]``."""
    if isinstance(devices, bool):
        raise ConfigError(f"devices must be a number of processes or a list, got {devices!r}")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        if devices < 1:
            raise ConfigError(f"devices must be >= 1, got {devices}")
        if torch.cuda.is_available():
            if devices > torch.cuda.device_count():
                raise ConfigError(
                    f"devices={devices} but this machine has {torch.cuda.device_count()} GPUs"
                )
            return [torch.device("cuda", k) for k in range(devices)]
        return [torch.device("cpu")] * devices
    items = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    if not items:
        raise ConfigError("devices is empty")
    out = []
    for item in items:
        try:
            dev = torch.device(item)
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {item!r}; use cpu or cuda:K") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {item!r} requested but CUDA is not available")
        out.append(dev)
    kinds = {d.type for d in out}
    if len(kinds) > 1:
        raise ConfigError("devices mixes CPU and GPU processes; use one kind")
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    evaluate: Callable[..., Any],
    devices: list[torch.device],
    port: int,
    threads: int,
    model: nn.Module | Path,
    data: Any,
    kwargs: dict[str, Any],
    errors: str,
) -> None:
    from advprune.distributed import init_distributed, shutdown

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(devices)),
        LOCAL_WORLD_SIZE=str(len(devices)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    device = devices[rank]
    if device.type == "cpu":
        torch.set_num_threads(threads)
    finished = False
    try:
        if isinstance(model, Path):  # a pruned advprune model, sent as its checkpoint
            from advprune.checkpoint import load_checkpoint

            model, _ = load_checkpoint(model)
        init_distributed("cuda" if device.type == "cuda" else "cpu")
        evaluate(model, data, **{**kwargs, "device": device})
        finished = True
    except AdvpruneError as exc:  # the parent raises it as one line
        Path(errors, _ERROR_FILE.format(rank=rank)).write_text(str(exc))
        sys.exit(2)
    finally:
        shutdown(wait=finished)


def spawn_evaluate(
    evaluate: Callable[..., Any],
    model: nn.Module,
    data: Any,
    devices: list[torch.device],
    kwargs: dict[str, Any],
) -> Any:
    """Run :func:`~advprune.evaluation.evaluate` in ``len(devices)`` processes (a gloo or nccl
    group of their own) and return the report rank 0 wrote (into ``kwargs["out"]``, or a
    temporary folder)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, spawn

    from advprune.evaluation.report import REPORT_FILE, SAMPLES_FILE, load_report, load_samples

    cpus = os.cpu_count() or 1
    threads = max(1, cpus // len(devices))
    with tempfile.TemporaryDirectory(prefix="advprune-eval-") as tmp:
        out = kwargs.get("out")
        folder = Path(out) if out is not None else Path(tmp) / "out"
        kwargs = {**kwargs, "out": folder, "devices": None}
        args = (
            evaluate,
            devices,
            _free_port(),
            threads,
            _sendable(model, Path(tmp)),
            data,
            kwargs,
            tmp,
        )
        try:
            spawn(_worker, args=args, nprocs=len(devices), join=True)
        except (ProcessRaisedException, ProcessExitedException) as exc:
            messages = sorted(Path(tmp).glob("error-*.txt"))
            if messages:
                raise ConfigError(messages[0].read_text()) from None
            raise RuntimeError(f"a sharded evaluation process failed: {exc}") from None
        report = load_report(folder / REPORT_FILE)
        report.samples = load_samples(folder / SAMPLES_FILE)
        if out is None:
            report.files = {}
    return report


def _sendable(model: nn.Module, tmp: Path) -> nn.Module | Path:
    """``model``, or for a pruned (parametrized) advprune model, which PyTorch cannot pickle,
    its checkpoint (safetensors + card: the exact tensors and masks) for the processes."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    if getattr(model, "spec", None) is None:
        raise ConfigError(
            "evaluate(devices=N) cannot send a parametrized module that is not an advprune "
            "model to its processes; start them with torchrun instead"
        )
    from advprune.checkpoint import save_checkpoint

    return save_checkpoint(tmp / "model.safetensors", model)


def auto_batch_size(
    model: nn.Module, x: torch.Tensor, device: torch.device, *, cap: int = AUTO_BATCH_MAX
) -> int:
    """The largest batch (128 times a power of two, at most ``cap``) whose forward and
    backward pass, times :data:`AUTO_BATCH_HEADROOM`, fits in the GPU's free memory;
    :data:`AUTO_BATCH_CPU` on a CPU. ``x``: one input (its shape and dtype are used)."""
    if device.type != "cuda":
        return AUTO_BATCH_CPU
    sizes = []
    size = AUTO_BATCH_CPU
    while size <= cap:
        sizes.append(size)
        size *= 2
    best = AUTO_BATCH_CPU
    for size in sizes:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            xb = x.to(device).expand(size, *x.shape).clone().requires_grad_(True)
            model(xb).sum().backward()
            peak = torch.cuda.max_memory_allocated(device) - before
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            xb = None
            torch.cuda.empty_cache()
        if peak * AUTO_BATCH_HEADROOM > free:
            break
        best = size
    return best


def shard_of(batches: int, dist: DistContext) -> list[int]:
    """The batches this process runs: ``b % world_size == rank``."""
    return [b for b in range(batches) if b % dist.world_size == dist.rank]
