"""What pruning buys: measured speed-up of compacted channel-pruned models, compressed file sizes.

.venv/bin/python benchmarks/compression.py [--out benchmarks/results/compression.md]
    [--threads N] [--repeats R] [--quick]

1. Channel pruning (LWM channel masks, every conv / linear layer at the target) of ResNet-18
   (the trained CIFAR-10 model pyautoattack ships) and VGG-16 (random initialisation), both at
   32x32, at 50 / 75 / 90 %; each masked model compacted (``advprune.sparsity.compact``); the
   compacted model's measured CPU speed-up over the dense model at batch 64 and batch 1
   (timed in turn in one run, median of repeats) against the ideal MACs ratio.
   Target: at 75 %, speed-up >= 0.7 x the MACs ratio at batch 64.
2. Unstructured LWM at 90 / 95 / 99 %: the compressed safetensors file
   (``advprune.sparsity.save_compressed``) against the dense safetensors file, and an exact
   round trip. Target: 99 %-sparse ResNet-18 <= 3 % of the dense file.
3. 2:4 semi-structured linear layers on CUDA (Ampere or later) against dense; skipped with a
   line saying so when no such GPU is present.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_model
from safetensors.torch import save_file
from torch import nn, profiler

from advprune.bench.importers import read_state_dict
from advprune.methods.lwm import LWM
from advprune.models import create
from advprune.sparsity import (
    compact,
    count_macs,
    load_compressed,
    measure_latency,
    nm_mask,
    save_compressed,
    semi_structured_support,
    sparse_state_dict,
)

SPARSITIES = (0.5, 0.75, 0.9)
FILE_SPARSITIES = (0.9, 0.95, 0.99)
INPUT = (3, 32, 32)


def _load() -> float:
    """The 1-minute load average (nan where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _resnet18_weights() -> dict[str, torch.Tensor] | None:
    try:
        import pyautoattack
    except ImportError:
        return None
    path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    return read_state_dict(path) if path.is_file() else None


def _model(arch: str) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = create(arch).eval()
    if arch == "resnet18":
        state = _resnet18_weights()
        if state is not None:
            model.load_state_dict(state, strict=True)
            return model, "trained (pyautoattack model_test.pt)"
    return model, "random initialisation"


def _speedups(
    dense: nn.Module, thin: nn.Module, args: argparse.Namespace, channels_last: bool
) -> dict[int, tuple[float, float]]:
    """``{batch: (dense ms, compacted ms)}`` timed in turn in one call per batch size."""
    out = {}
    for batch, repeats in ((64, args.repeats), (1, args.repeats * 5)):
        lat = measure_latency(
            {"dense": dense, "compacted": thin},
            INPUT,
            batch,
            threads=args.threads,
            warmup=args.warmup,
            repeats=repeats,
            channels_last=channels_last,
        )
        out[batch] = (lat["dense"].median_ms, lat["compacted"].median_ms)
    return out


def _breakdown(model: nn.Module, threads: int, channels_last: bool) -> dict[str, float]:
    """Share of CPU time per operator over three batch-64 forward passes."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()
    x = torch.rand(64, *INPUT).contiguous(memory_format=fmt)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model(x)
            with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model(x)
    finally:
        torch.set_num_threads(before)
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values())
    return {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def _padded_macs(model: nn.Module, block: int = 16) -> int:
    """MACs if every conv / linear width were rounded up to ``block`` (what oneDNN's blocked
    layouts compute for a layer whose channel count is not a multiple of the block)."""
    _, _, layers = count_macs(model, INPUT)
    modules = dict(model.named_modules())
    total = 0
    for row in layers:
        module = modules[row.name]
        w_in, w_out = module.weight.shape[1], module.weight.shape[0]
        padded = math.ceil(w_in / block) * block * math.ceil(w_out / block) * block
        total += row.flops_dense * padded // (w_in * w_out)
    return total


def channel_rows(
    args: argparse.Namespace, log: list[str], breakdowns: list[str], targets: list[str]
) -> list[list[str]]:
    rows = []
    for arch in ("resnet18", "vgg16"):
        dense, source = _model(arch)
        log.append(f"{arch}: {source}")
        dense_macs = count_macs(dense, INPUT)[0]
        dense_params = sum(p.numel() for p in dense.parameters())
        for sparsity in SPARSITIES:
            masked, _ = _model(arch)
            LWM(sparsity, structure="channels").prune(masked)
            t0 = time.perf_counter()
            thin, _ = compact(masked)
            seconds = time.perf_counter() - t0
            macs = count_macs(thin, INPUT)[0]
            ideal = dense_macs / macs
            params = sum(p.numel() for p in thin.parameters())
            for channels_last in (False, True):
                speed = _speedups(dense, thin, args, channels_last)
                (d64, c64), (d1, c1) = speed[64], speed[1]
                rows.append(
                    [
                        arch,
                        f"{sparsity:.0%}",
                        "channels-last" if channels_last else "contiguous",
                        f"{params / dense_params:.3f}",
                        f"{macs / 1e6:.1f} / {dense_macs / 1e6:.1f}",
                        f"{ideal:.2f}x",
                        f"{d64:.0f} / {c64:.0f}",
                        f"{d64 / c64:.2f}x",
                        f"**{d64 / c64 / ideal:.2f}**"
                        if sparsity == 0.75
                        else f"{d64 / c64 / ideal:.2f}",
                        f"{d1:.2f} / {c1:.2f}",
                        f"{d1 / c1:.2f}x",
                        f"{d1 / c1 / ideal:.2f}",
                        f"{seconds:.1f}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
                if sparsity == 0.75:
                    fmt = "channels-last" if channels_last else "contiguous"
                    ratio = d64 / c64 / ideal
                    targets.append(
                        f"- {arch} 75 %, {fmt}: speed-up {d64 / c64:.2f}x = {ratio:.2f} of the "
                        f"ideal {ideal:.2f}x: target (>= 0.70) "
                        f"{'met' if ratio >= 0.7 else 'missed'}"
                    )
                if sparsity == 0.75 and channels_last:
                    padded = dense_macs / _padded_macs(thin)
                    targets.append(
                        f"  ({arch} 75 %: with every compacted width rounded up to a multiple "
                        f"of 16, oneDNN's AVX-512 channel block, the MACs ratio would be "
                        f"{padded:.2f}x)"
                    )
                if sparsity == 0.75:
                    for label, model in (("dense", dense), ("compacted", thin)):
                        shares = _breakdown(copy.deepcopy(model), args.threads, channels_last)
                        top = ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:5])
                        breakdowns.append(f"- {arch} 75 % {label}, {fmt}: {top}")
    return rows


def file_rows(log: list[str]) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("resnet18", "vgg16"):
            for sparsity in FILE_SPARSITIES:
                model, _ = _model(arch)
                LWM(sparsity).prune(model)
                state = sparse_state_dict(model)
                dense_path = Path(tmp) / "dense.safetensors"
                save_file({k: v.contiguous() for k, v in state.items()}, str(dense_path))
                path = save_compressed(state, Path(tmp) / "compressed.safetensors")
                back = load_compressed(path)
                exact = back.keys() == state.keys() and all(
                    back[k].dtype == v.dtype
                    and torch.equal(
                        back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
                    )
                    for k, v in state.items()
                )
                dense_size, size = dense_path.stat().st_size, path.stat().st_size
                rows.append(
                    [
                        arch,
                        f"{sparsity:.0%}",
                        f"{dense_size:,}",
                        f"{size:,}",
                        f"{size / dense_size:.2%}",
                        "yes" if exact else "NO",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    return rows


def semi_structured_lines(args: argparse.Namespace) -> list[str]:
    why = semi_structured_support()
    if why is not None:
        return [f"2:4 semi-structured: skipped, {why}; left open."]
    from torch.sparse import to_sparse_semi_structured

    name = torch.cuda.get_device_name()

    lines = [
        f"2:4 semi-structured linear layers on {name}, fp16, "
        "dense F.linear vs the same weights with a 2:4 mask as a semi-structured tensor:",
        "",
        "| out x in | batch | dense ms | 2:4 ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for out_f, in_f in ((4096, 4096), (8192, 8192), (4096, 16384)):
        for batch in (64, 1024, 8192):
            dense = nn.Linear(in_f, out_f, bias=False).half().cuda().eval()
            with torch.no_grad():
                dense.weight.mul_(nm_mask(dense.weight.abs(), 2, 4))
            sparse = nn.Linear(in_f, out_f, bias=False).half().cuda().eval()
            sparse.weight = nn.Parameter(
                to_sparse_semi_structured(dense.weight.detach()), requires_grad=False
            )
            lat = measure_latency(  # fp16 inputs; the modules timed where they are (move=False:
                {"dense": dense, "2:4": sparse},  # .to() would try to swap the sparse weight)
                (in_f,),
                batch,
                device="cuda",
                warmup=args.warmup,
                repeats=args.repeats * 3,
                dtype=torch.float16,
                move=False,
            )
            d, s = lat["dense"].median_ms, lat["2:4"].median_ms
            lines.append(f"| {out_f} x {in_f} | {batch} | {d:.3f} | {s:.3f} | {d / s:.2f}x |")
    return lines


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/compression.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine, threads waiting for each other at "
        "every operator's barrier make multi-threaded timings erratic)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 repeats, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    threads = args.threads
    log: list[str] = []
    breakdowns: list[str] = []
    targets: list[str] = []
    load = _load()
    started = time.perf_counter()
    channels = channel_rows(args, log, breakdowns, targets)
    files = file_rows(log)
    semi = semi_structured_lines(args)
    print("\n".join(semi))
    wall = time.perf_counter() - started
    load_end = _load()
    command = " ".join([".venv/bin/python", *sys.argv])
    doc = [
        "# Compression benchmark: compacted channel pruning, compressed checkpoints, 2:4",
        "",
        f"Produced on {datetime.date.today()} by",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, "
        f"{threads} CPU thread(s), mkldnn "
        f"{'on' if torch.backends.mkldnn.is_available() else 'off'}; load average "
        f"{load:.1f} when the run started and {load_end:.1f} when it ended (1-minute figures; "
        "the machine is shared, and a load above the CPU count inflates every time); wall time "
        f"{wall / 60:.1f} min. Models: {'; '.join(log)}.",
        "",
        "## 1. Channel pruning, compacted, CPU (inputs 3x32x32)",
        "",
        "LWM channel masks (mean |w| per input channel, every conv and linear layer at the "
        "target), compacted with `advprune.sparsity.compact` (exact: logits checked). "
        f"Latency: median of {args.repeats} runs at batch 64 and {args.repeats * 5} at batch 1 "
        f"after {args.warmup} warm-up runs, dense and compacted timed in turn. Ideal = dense "
        "MACs / compacted MACs; 'of ideal' = measured speed-up / ideal.",
        "",
        *_table(
            [
                "model",
                "sparsity",
                "memory format",
                "params kept",
                "MMACs (compacted / dense)",
                "ideal",
                "b64 ms (dense / compacted)",
                "b64 speed-up",
                "of ideal",
                "b1 ms (dense / compacted)",
                "b1 speed-up",
                "of ideal",
                "compact s",
            ],
            channels,
        ),
        "",
        "Target at 75 % and batch 64 (speed-up >= 0.7 x the ideal MACs ratio):",
        "",
        *targets,
        "",
        "Batch 1 gains less: a 32x32 image through a thin layer is a few microseconds of "
        "arithmetic, so each operator's fixed cost (dispatch, oneDNN primitive set-up, "
        "memory allocation) is a larger share, and it does not shrink with the width.",
        "",
        "Where the time goes at 75 % (share of CPU time per operator, batch 64, torch.profiler):",
        "",
        *breakdowns,
        "",
        "## 2. Compressed unstructured checkpoints",
        "",
        "LWM unstructured masks (every conv and linear layer at the target), the masked state "
        "dict (`sparse_state_dict`) as a plain safetensors file and as a compressed one "
        "(`save_compressed`: per tensor the smallest of dense, bitmask and CSR). Exact: every "
        "tensor read back bit for bit.",
        "",
        *_table(["model", "sparsity", "dense bytes", "compressed bytes", "ratio", "exact"], files),
        "",
        "## 3. 2:4 semi-structured sparsity (CUDA)",
        "",
        *semi,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
