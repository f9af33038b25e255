"""What a pruned model costs: parameters, multiply-accumulates, file sizes and measured latency.

MACs are the multiply-accumulates of conv and linear layers for one input, measured with forward
hooks (:func:`advprune.sparsity.sparsity_report`); BatchNorm (folded into the preceding conv at
inference), activations, pooling and additions are not counted. ``kept_macs`` counts only kept
weights (what an ideal sparse kernel would do); for a compacted model (see
:func:`advprune.sparsity.compact`) the two are equal and are real. Latency is measured, never
estimated: after warm-up, the median of repeated timed forward passes, with the CPU thread count
stated, on CPU and (when present) CUDA. Models compared in one :func:`measure_latency` call are
timed in turn within each repeat, so load on a shared machine affects them alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from advprune.errors import ConfigError
from advprune.sparsity.report import LayerSparsity, sparsity_report


@dataclass
class Latency:
    """Measured time of one forward pass of a batch (milliseconds)."""

    device: str
    batch_size: int
    threads: int | None  # CPU threads (torch.get_num_threads); None on CUDA
    median_ms: float
    q1_ms: float
    q3_ms: float
    warmup: int
    repeats: int

    @property
    def per_sample_ms(self) -> float:
        return self.median_ms / self.batch_size


@dataclass
class Profile:
    """Size and speed of one model; ``baseline_latency`` is the dense model's, timed alongside."""

    input_size: tuple[int, ...]
    total_params: int
    kept_params: int
    macs: int
    kept_macs: int
    layers: list[LayerSparsity] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    baseline_latency: list[Latency] = field(default_factory=list)
    baseline_macs: int | None = None
    files: dict[str, int] = field(default_factory=dict)

    def speedups(self) -> dict[tuple[str, int], float]:
        """``{(device, batch): baseline median / model median}`` where both were measured."""
        base = {(b.device, b.batch_size): b.median_ms for b in self.baseline_latency}
        return {
            (m.device, m.batch_size): base[(m.device, m.batch_size)] / m.median_ms
            for m in self.latency
            if (m.device, m.batch_size) in base
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        out["speedups"] = [
            {"device": d, "batch_size": b, "speedup": s} for (d, b), s in self.speedups().items()
        ]
        return out

    def format(self) -> str:
        """A short plain-text summary."""
        rows = [
            f"parameters: {self.kept_params:,} kept of {self.total_params:,}",
            f"MACs per input: {self.kept_macs:,} kept of {self.macs:,}"
            + (f" (dense model: {self.baseline_macs:,})" if self.baseline_macs else ""),
        ]
        rows += [f"file {name}: {size:,} bytes" for name, size in self.files.items()]
        speedups = self.speedups()
        for lat in self.latency:
            threads = f", {lat.threads} threads" if lat.threads else ""
            speed = speedups.get((lat.device, lat.batch_size))
            rows.append(
                f"latency {lat.device} batch {lat.batch_size}{threads}: {lat.median_ms:.3f} ms "
                f"median of {lat.repeats} (IQR {lat.q1_ms:.3f}-{lat.q3_ms:.3f})"
                + (f", {speed:.2f}x the dense model" if speed else "")
            )
        return "\n".join(rows)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int, list[LayerSparsity]]:
    """``(macs, kept_macs, per-layer rows)`` of conv and linear layers for one input."""
    report = sparsity_report(model, tuple(input_size))
    return report.flops_dense, report.flops, report.layers


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, kept)`` parameters: every parameter of the dense architecture (BatchNorm and
    biases included; learnable mask scores excluded), and that minus the conv / linear weights
    the masks remove (or that are zero)."""
    report = sparsity_report(model)
    return report.total_params, report.total_params - report.prunable_params + report.kept


def state_dict_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Size of ``state`` written as one safetensors file."""
    return len(save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def file_sizes(paths: Mapping[str, str | Path]) -> dict[str, int]:
    """``{label: bytes}`` of existing files."""
    out = {}
    for label, path in paths.items():
        if not Path(path).is_file():
            raise ConfigError(f"cannot measure the size of {label} file {path}: no such file")
        out[label] = Path(path).stat().st_size
    return out


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int],
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    channels_last: bool = False,
) -> dict[str, Latency]:
    """Median forward time of each model on one random batch, the models timed in turn.

    The models are put in eval mode and moved to ``device`` and to the memory format
    (channels-last with ``channels_last``, else contiguous) in place. ``threads`` sets
    ``torch.set_num_threads`` for the measurement (default: as it is), restored afterwards.
    CUDA times come from CUDA events between synchronisations.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(batch_size, *input_size, device=device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    ready = {name: m.to(device, memory_format=memory_format).eval() for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in ready}
    with _threads(None if cuda else threads) as n_threads:
        names = list(ready)
        for step in range(warmup + repeats):
            order = names[step % len(names) :] + names[: step % len(names)]
            for name in order:
                if cuda:
                    torch.cuda.synchronize(device)
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    ready[name](x)
                    end.record()
                    torch.cuda.synchronize(device)
                    elapsed = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    ready[name](x)
                    elapsed = (time.perf_counter() - t0) * 1e3
                if step >= warmup:
                    times[name].append(elapsed)
    out = {}
    for name, ts in times.items():
        q1, median, q3 = _quartiles(ts)
        out[name] = Latency(
            device=str(device),
            batch_size=batch_size,
            threads=None if cuda else n_threads,
            median_ms=median,
            q1_ms=q1,
            q3_ms=q3,
            warmup=warmup,
            repeats=repeats,
        )
    return out


def profile(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    baseline: nn.Module | None = None,
    batch_sizes: Sequence[int] = (1, 256),
    devices: Sequence[str] | None = None,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    files: Mapping[str, str | Path] | None = None,
) -> Profile:
    """Parameters, MACs, file sizes and latency of ``model`` (and of ``baseline``, the dense
    model of the same architecture, timed alongside so that speed-ups come from one run).

    ``devices`` defaults to CPU, plus CUDA when available. Pass ``batch_sizes=()`` to skip
    timing.
    """
    total, kept = count_params(model)
    macs, kept_macs, layers = count_macs(model, input_size)
    if devices is None:
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    result = Profile(
        input_size=tuple(input_size),
        total_params=total,
        kept_params=kept,
        macs=macs,
        kept_macs=kept_macs,
        layers=layers,
        baseline_macs=count_macs(baseline, input_size)[0] if baseline is not None else None,
        files=file_sizes(files or {}),
    )
    models = {"model": model, **({"baseline": baseline} if baseline is not None else {})}
    for device in devices:
        for batch in batch_sizes:
            lat = measure_latency(
                models,
                input_size,
                batch,
                device=device,
                threads=threads,
                warmup=warmup,
                repeats=repeats,
            )
            result.latency.append(lat["model"])
            if baseline is not None:
                result.baseline_latency.append(lat["baseline"])
    return result
