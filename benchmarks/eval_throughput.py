"""AutoAttack throughput: the reference ``pyautoattack`` run directly against advprune's
AutoAttack entry (one process, and sharded over processes), same model, points and seed.

For each model, in one run:

(a) reference: ``AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=SEED)
    .run_standard_evaluation(x, y, batch_size=N)`` as pyautoattack's README shows; robust
    accuracy = the model's accuracy on the returned points;
(b) advprune: ``evaluate(model, (x, y), eps=EPS, attacks="autoattack")``, one process, its
    default settings (its clean pass, failure-check probe and per-attack re-checks included);
(c) advprune sharded: the same with ``devices=P`` (P processes; on a CPU one thread each) and
    the attacks' model in channels-last memory format (``channels_last=True``; the default on
    CUDA), plus ``compile=True`` with ``--compile``.

advprune's batch (default: the points over P, one batch per process) is the same in (b) and
(c), so their per-sample results are the same; the reference runs all points in one batch.

Models: the quickstart's dense and LWM-99 digits models (``make quickstart`` writes them to
``quickstart_out/``; missing ones are trained with the quickstart's recipe into ``--models``),
at the quickstart's eps 3/16 (L∞); on CUDA also a ResNet-18 at 32×32 (trained for a few
epochs on synthetic data) at 8/255. Wall time, points/s and robust accuracy; the targets:
fidelity (advprune within 0.3 pp of the reference, never higher by more) and speed (sharded
advprune ≥ 2 × the reference's points/s).

    python benchmarks/eval_throughput.py   # all 360 test points -> results/eval_throughput.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "eval_throughput.md"
DIGITS_EPS = "3/16"  # the quickstart's threat model (digits pixels are multiples of 1/16)
CIFAR_EPS = "8/255"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _digits_models(folder: Path) -> dict[str, Path]:
    """The quickstart's dense and LWM-99 checkpoints (trained here if missing)."""
    paths = {"digits dense": folder / "dense" / "model.safetensors",
             "digits LWM-99": folder / "lwm-99" / "model.safetensors"}  # fmt: skip
    if not all(p.exists() for p in paths.values()):
        from advprune.quickstart import run_quickstart

        print(f"training the quickstart models into {folder} ...", flush=True)
        run_quickstart(folder, sparsities=(0.99,), progress="off", device="cpu")
    return paths


def _digits_points(n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from advprune.data import load_dataset

    test = load_dataset("digits").test
    n = len(test) if n is None else min(n, len(test))
    return torch.stack([test[i][0] for i in range(n)]), torch.tensor(
        [int(test[i][1]) for i in range(n)]
    )


def _cifar_model(
    device: torch.device, n: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A ResNet-18 at 32×32 trained 200 steps on synthetic, learnable data (protocol_gpu.py's
    recipe); its first ``n`` test points."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from protocol_gpu import synthetic_resnet18

    model, (x, y), _ = synthetic_resnet18(device, 200, n, 0)
    return model, x, y


def _reference(model, x, y, eps: float, seed: int, device) -> tuple[float, float]:
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    t0 = time.perf_counter()
    x_adv = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=x.shape[0])
    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(x_adv.to(device)).argmax(1).cpu() == y).float().mean())
    return seconds, acc


def _advprune(
    model, x, y, eps: str, seed: int, batch: int, devices, fast: dict
) -> tuple[float, float, str]:
    from advprune.evaluation import evaluate

    t0 = time.perf_counter()
    report = evaluate(model, (x, y), eps=eps, attacks="autoattack", batch_size=batch,
                      seed=seed, devices=devices, **fast)  # fmt: skip
    seconds = time.perf_counter() - t0
    return (
        seconds,
        report.entry("autoattack").robust_accuracy,
        report.entry("autoattack").config["library"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None,
                   help="points per model (the first N test points; default: all)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None,
                   help="advprune's batch, the shard unit (default: N / processes)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="run (c) with compile=True too")
    p.add_argument("--processes", type=int, default=None,
                   help="sharded run's processes (default: GPUs, else CPU cores)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of runs (a) and (b) (default: torch's, all cores); "
                   "on a busy machine 1 keeps OpenMP threads from spinning")  # fmt: skip
    p.add_argument("--models", type=Path, default=ROOT / "quickstart_out",
                   help="folder of the quickstart's models (trained there if missing)")  # fmt: skip
    p.add_argument("--only", choices=["digits", "cifar"], help="one group of models only")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from advprune.checkpoint import load_checkpoint

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    procs = args.processes or (torch.cuda.device_count() if cuda else os.cpu_count() or 1)
    cases = []
    if args.only != "cifar":
        x, y = _digits_points(args.n)
        for name, path in _digits_models(args.models).items():
            model, _ = load_checkpoint(path)
            cases.append((name, model.to(device).eval(), x, y, DIGITS_EPS))
    if cuda and args.only != "digits":
        model, x, y = _cifar_model(device, args.n or 1000)
        cases.append(("ResNet-18 32×32 (synthetic)", model, x, y, CIFAR_EPS))
    if not cases:
        print("no model to run (the CIFAR-size ResNet-18 needs CUDA)", file=sys.stderr)
        return 2

    rows = []
    fast = {"channels_last": True, "compile": args.compile}
    fast_text = "channels-last" + (", compiled" if args.compile else "")
    for name, model, x, y, eps in cases:
        eps_value = float(Fraction(eps))
        batch = args.batch or -(-x.shape[0] // procs)
        print(f"{name}: {x.shape[0]} points, eps {eps}, advprune's batch {batch}", flush=True)
        runs = [
            ("(a) pyautoattack run_standard_evaluation", None, {}),
            ("(b) advprune autoattack, 1 process", None, {}),
            (f"(c) advprune autoattack, {procs} processes, {fast_text}", procs, fast),
        ]
        ref_acc = ref_rate = None
        for label, devices, options in runs:
            before = _load()
            if label.startswith("(a)"):
                seconds, acc = _reference(model, x, y, eps_value, args.seed, device)
                impl = "reference"
            else:
                seconds, acc, impl = _advprune(model, x, y, eps, args.seed, batch, devices, options)
            rate = x.shape[0] / seconds
            if ref_acc is None:
                ref_acc, ref_rate = acc, rate
            row = {
                "model": name, "run": label, "points": x.shape[0], "seconds": seconds,
                "rate": rate, "robust": acc, "diff_pp": 100 * (acc - ref_acc),
                "speedup": rate / ref_rate, "load": f"{before} -> {_load()}", "impl": impl,
                "batch": batch,
            }  # fmt: skip
            rows.append(row)
            print(f"  {label}: {seconds:.1f} s, {rate:.3f} points/s, robust "
                  f"{100 * acc:.2f} % ({row['diff_pp']:+.2f} pp), x{row['speedup']:.2f}, "
                  f"load {row['load']}", flush=True)  # fmt: skip

    table = _table(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_markdown(args, table, rows, procs, device))
    print(f"wrote {args.out}")
    return 0


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | run | points | wall s | points/s | robust acc | vs ref (pp) | speed vs ref | "
        "load avg (1/5/15 min) before -> after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['run']} | {r['points']} | {r['seconds']:.1f} | "
            f"{r['rate']:.3f} | {100 * r['robust']:.2f} % | {r['diff_pp']:+.2f} | "
            f"{r['speedup']:.2f}x | {r['load']} |"
        )
    return "\n".join(lines)


def _markdown(args, table: str, rows: list[dict], procs: int, device) -> str:
    import pyautoattack

    from advprune._version import __version__

    fidelity, speed = [], []
    for r in rows:
        if r["run"].startswith("(a)"):
            continue
        ok = abs(r["diff_pp"]) <= 0.3 and r["diff_pp"] <= 0.3
        fidelity.append(f"- {r['model']}, {r['run']}: {r['diff_pp']:+.2f} pp -> "
                        f"{'met' if ok else 'MISSED'}")  # fmt: skip
        if r["run"].startswith("(c)"):
            speed.append(f"- {r['model']}, {r['run']}: {r['speedup']:.2f}x the reference's "
                         f"points/s -> {'met' if r['speedup'] >= 2 else 'MISSED'}")  # fmt: skip
    cpu = platform.processor() or platform.machine()
    return "\n".join(
        [
            "# AutoAttack throughput: reference pyautoattack vs advprune",
            "",
            "Command: `python benchmarks/eval_throughput.py"
            f"{' --n ' + str(args.n) if args.n else ''}"
            f"{' --batch ' + str(args.batch) if args.batch else ''}"
            f"{' --compile' if args.compile else ''}"
            f"{' --threads ' + str(args.threads) if args.threads else ''}"
            f"{' --only ' + args.only if args.only else ''}`",
            "",
            f"Machine: {device.type}, {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
            f" ({torch.get_num_threads()} threads in runs (a) and (b); {procs} processes of "
            f"{max(1, (os.cpu_count() or 1) // procs)} thread(s) in (c)), pyautoattack "
            f"{getattr(pyautoattack, '__version__', '?')}, advprune {__version__}. The first "
            f"{rows[0]['points']} test points of each model, seed {args.seed}; advprune's batch "
            f"{rows[0]['batch']} in (b) and (c) (the unit a process runs; the reference: all "
            "points in one batch). Wall times include advprune's clean pass, failure-check "
            "probe and re-checks, and for (c) starting the processes. advprune ran "
            f"{', '.join(sorted({r['impl'] for r in rows if r['impl'] != 'reference'}))}'s "
            "attacks unmodified (one call per attack on the points still robust).",
            "",
            table,
            "",
            "Targets:",
            "",
            "Fidelity (advprune's robust accuracy within 0.3 pp of the reference, never higher by "
            "more):",
            *fidelity,
            "",
            "Speed (sharded advprune ≥ 2 × the reference's points/s on this machine):",
            *speed,
            "",
            "GPU figures (ResNet-18 at 32×32, N GPUs ≥ 0.85 × N × one GPU, full protocol on "
            "10,000 points ≤ 10 min on one H100/H200): open, no GPU was available for this run.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
