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
import copy
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
from advprune.sparsity.compressed import encode_state_dict, sparse_state_dict
from advprune.sparsity.masks import PRUNABLE_TYPES, masked_modules
from advprune.sparsity.report import LayerSparsity, export_dense, sparsity_report


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
    """Size and speed of one model; ``baseline_latency`` is the dense model's, timed alongside.

    From :func:`profile_model`: ``total_params`` / ``baseline_macs`` / ``baseline_layers`` are
    the dense base architecture's, ``kept_params`` the non-zero parameters of the model that
    was timed (``timed``: ``compacted``, ``compacted in memory``, ``masks folded``,
    ``plain (as stored)``),
    ``macs`` what its dense kernels execute and ``kept_macs`` those of non-zero weights only.
    """

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
    timed: str = "model"
    baseline_layers: list[LayerSparsity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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

    def summary(self) -> dict[str, Any]:
        """The headline figures (what evaluation reports, the results store and leaderboards
        keep): parameters and MACs against the dense base, file sizes, latency and speed-ups."""
        base_macs = self.baseline_macs or self.macs
        speedups = self.speedups()
        base = {(b.device, b.batch_size): b for b in self.baseline_latency}
        return {
            "timed": self.timed,
            "input_size": list(self.input_size),
            "base_params": self.total_params,
            "kept_params": self.kept_params,
            "params_fraction": self.kept_params / max(1, self.total_params),
            "base_macs": base_macs,
            "macs": self.macs,
            "kept_macs": self.kept_macs,
            "macs_fraction": self.kept_macs / max(1, base_macs),
            "files": dict(self.files),
            "latency": [
                {
                    "device": lat.device,
                    "batch_size": lat.batch_size,
                    "threads": lat.threads,
                    "median_ms": lat.median_ms,
                    "baseline_median_ms": getattr(
                        base.get((lat.device, lat.batch_size)), "median_ms", None
                    ),
                    "speedup": speedups.get((lat.device, lat.batch_size)),
                    "warmup": lat.warmup,
                    "repeats": lat.repeats,
                }
                for lat in self.latency
            ],
            "notes": list(self.notes),
        }

    def format_layers(self) -> str:
        """Per-layer MACs of the timed model against the dense base (one row per layer)."""
        base = {r.name: r for r in self.baseline_layers}
        head = f"{'layer':<28} {'kind':<7} {'MACs':>14} {'kept MACs':>14} {'dense base':>14}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            b = base.get(r.name)
            rows.append(
                f"{r.name:<28} {r.kind:<7} {r.flops_dense:>14,} {r.flops:>14,} "
                f"{b.flops_dense if b else 0:>14,}"
            )
        return "\n".join(rows)

    def format(self) -> str:
        """A short plain-text summary."""
        rows = [
            f"timed: {self.timed}",
            f"parameters: {self.kept_params:,} kept of {self.total_params:,}"
            f" ({100 * self.kept_params / max(1, self.total_params):.2f} %)",
            f"MACs per input: {self.kept_macs:,} kept of {self.macs:,}"
            + (
                f" (dense model: {self.baseline_macs:,}; kept "
                f"{100 * self.kept_macs / self.baseline_macs:.2f} %)"
                if self.baseline_macs
                else ""
            ),
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
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)


def _speedup_text(latency: Sequence[Mapping[str, Any]]) -> str:
    parts = [
        f"{lat['speedup']:.2f}x {lat['device']} batch {lat['batch_size']}"
        for lat in latency
        if lat.get("speedup")
    ]
    return ", ".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line of a :meth:`Profile.summary`: parameters and MACs kept against the dense
    base, the speed-ups measured, the file sizes."""
    text = (
        f"params {summary['kept_params']:,} of {summary['base_params']:,} "
        f"({100 * summary['params_fraction']:.2f} %), MACs {summary['kept_macs']:,} of "
        f"{summary['base_macs']:,} ({100 * summary['macs_fraction']:.2f} %), timed "
        f"{summary.get('timed')}"
    )
    speed = _speedup_text(summary.get("latency") or [])
    if speed:
        text += f"; speed-up vs dense: {speed}"
    files = summary.get("files") or {}
    if files:
        text += "; files " + ", ".join(f"{k} {v:,} B" for k, v in files.items())
    return text


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


def compressed_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Size of ``state`` written by :func:`advprune.sparsity.save_compressed`."""
    stored, metadata = encode_state_dict(state)
    return len(save(stored, metadata=metadata))


def _prunable_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE_TYPES))


def sparsity_vs_base(model: nn.Module) -> float:
    """Removed fraction of the dense base architecture's conv / linear weights: one minus the
    model's non-zero conv / linear weights over the base's (``model.spec.build()``). Equals the
    measured sparsity for a masked model; for a compacted one it counts the removed channels."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("sparsity against the base needs a model with an advprune spec")
    kept = sparsity_report(model).kept
    return 1.0 - kept / max(1, _prunable_weights(spec.build()))


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
    dtype: torch.dtype = torch.float32,
    move: bool = True,
) -> dict[str, Latency]:
    """Median forward time of each model on one random batch, the models timed in turn.

    The models are put in eval mode and moved to ``device`` and to the memory format
    (channels-last with ``channels_last``, else contiguous) in place. ``threads`` sets
    ``torch.set_num_threads`` for the measurement (default: as it is), restored afterwards.
    CUDA times come from CUDA events between synchronisations. ``dtype``: of the input batch
    (the models must match it, e.g. float16 models on CUDA). ``move=False`` times the models
    where and as they are (e.g. holding semi-structured sparse weights, which ``.to()`` would
    try to swap).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(batch_size, *input_size, device=device, dtype=dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    ready = {
        name: m.to(device, memory_format=memory_format).eval() if move else m
        for name, m in models.items()
    }
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
    _time(result, model, baseline, batch_sizes, devices, threads, warmup, repeats, False)
    return result


def _time(
    result: Profile,
    model: nn.Module,
    baseline: nn.Module | None,
    batch_sizes: Sequence[int],
    devices: Sequence[str],
    threads: int | None,
    warmup: int,
    repeats: int,
    channels_last: bool,
) -> None:
    models = {"model": model, **({"baseline": baseline} if baseline is not None else {})}
    for device in devices:
        for batch in batch_sizes:
            lat = measure_latency(
                models,
                result.input_size,
                batch,
                device=device,
                threads=threads,
                warmup=warmup,
                repeats=repeats,
                channels_last=channels_last,
            )
            result.latency.append(lat["model"])
            if baseline is not None:
                result.baseline_latency.append(lat["baseline"])


def profile_model(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    compacted: bool = False,
    structured: bool = False,
    files: Mapping[str, int] | None = None,
    batch_sizes: Sequence[int] = (1, 256),
    devices: Sequence[str] | None = None,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    channels_last: bool = False,
) -> Profile:
    """What a pruned advprune model (masked, compacted or dense) costs against the dense base
    model of its architecture (``model.spec.build()``), timed alongside it.

    The model timed and counted is the compacted one where there is one: ``model`` itself when
    ``compacted`` (a compacted checkpoint), else a model with filters / channels masks (or,
    with ``structured``, zero filters / channels with the masks folded) is compacted in
    memory (:func:`advprune.sparsity.compact`; without Torch-Pruning installed it is timed
    with its masks folded, and a note says so); a model with only unstructured masks
    is timed with its masks folded (dense kernels: zeros cost as much as weights). ``files``:
    sizes already known (``{"checkpoint": bytes}``); ``dense`` (the base architecture as
    safetensors), ``compressed`` (:func:`compressed_bytes` of the folded weights) and, where
    there is a compacted model, ``compacted`` are added. ``batch_sizes=()`` skips timing.
    """
    from advprune.sparsity.compaction import compact

    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("profiling against the dense base needs a model with an advprune spec")
    base = spec.build().eval()
    sizes = dict(files or {})
    sizes["dense"] = state_dict_bytes(base.state_dict())
    sizes["compressed"] = compressed_bytes(sparse_state_dict(model))
    notes: list[str] = []
    masks = masked_modules(model)
    structured = structured or any(m.granularity in ("filters", "channels") for _, m in
                                   masks.values())  # fmt: skip
    if compacted:
        timed, run = "compacted", export_dense(copy.deepcopy(model)).eval()
    elif structured:
        try:
            run, _ = compact(model)
            timed = "compacted in memory"
        except ConfigError as exc:  # Torch-Pruning missing: say so, time the folded model
            notes.append(f"not compacted ({exc}); timed with its masks folded")
            run, timed = export_dense(copy.deepcopy(model)).eval(), "masks folded"
    elif masks:
        run, timed = export_dense(copy.deepcopy(model)).eval(), "masks folded"
        notes.append("unstructured masks: dense kernels compute the zeros too (no speed-up)")
    else:
        run, timed = copy.deepcopy(model).eval(), "plain (as stored)"
    if timed.startswith("compacted"):
        sizes["compacted"] = state_dict_bytes(run.state_dict())
    macs, kept_macs, layers = count_macs(run, input_size)
    base_macs, _, base_layers = count_macs(base, input_size)
    result = Profile(
        input_size=tuple(input_size),
        total_params=count_params(base)[0],
        kept_params=count_params(run)[1],
        macs=macs,
        kept_macs=kept_macs,
        layers=layers,
        baseline_macs=base_macs,
        files=sizes,
        timed=timed,
        baseline_layers=base_layers,
        notes=notes,
    )
    if devices is None:
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    _time(result, run, base, batch_sizes, devices, threads, warmup, repeats, channels_last)
    return result
