"""The full benchmark protocol on one GPU: AutoAttack standard + HO-FMN on 10,000 CIFAR-size
points with a ResNet-18, timed (issue target: ≤ 10 minutes on one H100 / H200).

One prepared script for a GPU session: trains a ResNet-18 for a few hundred steps on synthetic,
learnable 32×32 data (class = which of 10 fixed patterns was added to noise; the robust
accuracy of such a model means nothing, the wall time is the figure), then runs
``evaluate(model, (x, y), eps="8/255", attacks="autoattack,hofmn", batch_size="auto")`` with
the GPU defaults (channels-last; float32 in full precision, no TF32) on ``--n`` points, HO-FMN
tuned on a separate synthetic split. ``--devices N`` shards over N GPUs. The evaluation writes
its batches to ``--out`` (a rerun resumes; pass a new folder to time from scratch). Writes
``benchmarks/results/protocol_gpu.md``.

    python benchmarks/protocol_gpu.py                     # 10,000 points, one GPU
    python benchmarks/protocol_gpu.py --n 2000 --compile  # smaller, compiled forward passes
    python benchmarks/protocol_gpu.py --device cpu --n 16 --train-steps 2 --hofmn-trials 2
                                                          # smoke run on a CPU (~4 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model
from _results import write_results

ROOT = Path(__file__).resolve().parents[1]


def synthetic_resnet18(device: torch.device, steps: int, n: int, n_tune: int):
    """A ResNet-18 trained ``steps`` SGD steps on synthetic 32×32 data; ``n`` test and
    ``n_tune`` tuning points drawn the same way (in [0, 1])."""
    from advprune.models import create

    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 3, 32, 32, generator=g)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (k,), generator=g)
        x = (0.5 * torch.rand(k, 3, 32, 32, generator=g) + 0.5 * patterns[y]).clamp(0, 1)
        return x, y

    model = create("resnet18", num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = draw(256)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), draw(n), draw(n_tune)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="evaluation points (10,000)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    p.add_argument("--devices", type=int, default=1, help="GPUs to shard over (1)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--hofmn-trials", type=int, default=32, help="HO-FMN trials (32)")
    p.add_argument("--compile", action="store_true", help="compiled no-grad forward passes")
    p.add_argument("--out", type=Path, default=None, help="evaluation folder (default: temp)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/protocol_gpu.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; for a smoke run: --device cpu --n 16 --train-steps 2",
              file=sys.stderr)  # fmt: skip
        return 2
    from advprune.evaluation import evaluate

    t0 = time.perf_counter()
    model, (x, y), tune = synthetic_resnet18(device, args.train_steps, args.n, 4096)
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "eval"
        t0 = time.perf_counter()
        report = evaluate(
            model, (x, y), tune_data=tune, eps="8/255", attacks="autoattack,hofmn",
            batch_size="auto", hofmn_trials=args.hofmn_trials, compile=args.compile,
            devices=args.devices if args.devices > 1 else None, device=device, out=out,
            progress="lines", hofmn_cache=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    rows = [
        f"| {e.name} | {e.seconds:.1f} | {100 * e.robust_accuracy:.2f} % |" for e in report.entries
    ]
    target = "met" if wall <= 600 else "MISSED"
    lines = [
        "# The full protocol on one GPU: AutoAttack standard + HO-FMN, ResNet-18, 32×32",
        "",
        f"Command: `python benchmarks/protocol_gpu.py {' '.join(argv or sys.argv[1:])}`",
        "",
        f"Machine: {gpu} ({args.devices} device(s)), {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}. {args.n} synthetic points (model trained {args.train_steps} "
        f"steps in {train_s:.0f} s, clean accuracy {100 * report.clean_accuracy:.2f} %), eps "
        f"8/255; batch size {report.settings['batch_size']} "
        f"({report.settings['batch_size_choice']}), channels_last "
        f"{report.settings['channels_last']}, compile {report.settings['compile']}, fp32 "
        f"{report.settings['fp32_precision']}.",
        "",
        "| attack | seconds (summed over processes) | robust accuracy |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Wall time of the whole protocol (clean pass, probe, attacks, tuning, report): "
        f"{wall:.1f} s = {wall / 60:.2f} min; target ≤ 10 min on one H100 / H200 at 10,000 "
        f"points: {target if args.n >= 10_000 and device.type == 'cuda' else 'not measured here'}.",
        "",
    ]
    write_results(lines, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
