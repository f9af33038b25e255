"""The attacks' forward work on one model: eager, channels-last, compiled, both; side by side.

What ``evaluate(channels_last=..., compile=...)`` buys (advprune.evaluation.forward): the time
of one forward pass without gradients (Square's queries, re-checks) and one forward + input
gradient (APGD's and FAB's steps) at the batch sizes AutoAttack sees, in one process with 1
and with all threads (a sharded CPU evaluation runs one thread per process; the reference
runs torch's default threads). The compiled model compiles once before timing (not timed;
``torch.compile`` only serves forward passes without gradients in advprune). Also the
machine's one-thread sgemm rate, to tell how close a kernel is to the core's peak.

    python benchmarks/forward_kernels.py   # -> benchmarks/results/forward_kernels.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, load_average
from _results import write_results

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def _forward(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def _forward_backward(model, x):
    def run():
        xg = x.detach().clone().requires_grad_(True)
        model(xg)[:, 0].sum().backward()

    return run


def _sgemm_gflops(repeats: int = 20) -> float:
    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    return 2 * 1024**3 / (_time(lambda: a @ b, repeats) / 1e3) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "quickstart_out/dense/model.safetensors")
    p.add_argument("--batches", default="110,220", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/forward_kernels.md")
    args = p.parse_args(argv)
    from advprune.checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.model)
    model.eval().requires_grad_(False)
    card = json.loads(args.model.with_suffix(".json").read_text())
    card_shape = tuple(card["input_shape"])
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants = {
        "eager": (model, False),
        "channels-last": (cl, True),
        "compiled": (torch.compile(copy.deepcopy(model), dynamic=True), False),
        "channels-last + compiled": (torch.compile(copy.deepcopy(cl), dynamic=True), True),
    }
    threads_all = torch.get_num_threads()
    rows = []
    load_before = load_average()
    for threads in sorted({1, threads_all}):
        torch.set_num_threads(threads)
        sgemm = _sgemm_gflops()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.rand(batch, *card_shape)
            base = None
            for name, (m, channels_last) in variants.items():
                xv = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                with torch.no_grad():
                    m(xv)  # compiles the compiled ones (not timed)
                fwd = _time(_forward(m, xv), args.repeats)
                fb = None if "compiled" in name else _time(_forward_backward(m, xv), args.repeats)
                base = base or (fwd, fb)
                rows.append(
                    f"| {threads} | {batch} | {name} | {fwd:.2f} | {base[0] / fwd:.2f}x | "
                    + (f"{fb:.2f} | {base[1] / fb:.2f}x |" if fb is not None else "- | - |")
                )
            print("\n".join(rows[-4:]), flush=True)
        rows.append(f"| {threads} | - | sgemm 1024² (the cores' peak) | {sgemm:.0f} GFLOP/s "
                    "| | | |")  # fmt: skip
    lines = [
        "# The attacks' forward work: eager, channels-last, compiled",
        "",
        "Command: `python benchmarks/forward_kernels.py"
        + (f" --batches {args.batches}" if args.batches != "110,220" else "")
        + "`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; model "
        f"`{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`, "
        f"input {card_shape}; load average {load_before} before, {load_average()} after. "
        "Milliseconds per call (mean of the repeats); x: speed against eager at the same "
        "threads and batch. Forward + input gradient is not timed for compiled models: "
        "advprune compiles only the forward passes without gradients.",
        "",
        "| threads | batch | model | forward ms | vs eager | forward + input grad ms | vs eager |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    write_results(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
