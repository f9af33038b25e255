"""Training throughput per architecture: forward + backward passes per second (fp32, SGD step
included), the unit `advprune bench plan` counts training and evaluation in.

    python benchmarks/stage_costs.py --threads 1 --batch 32   # CPU, one thread (as grid jobs)
    python benchmarks/stage_costs.py --device cuda --batch 128  # on a GPU: numbers for
        `advprune bench plan --train-rate ARCH=N` (replace the data file's assumptions)

Prints a Markdown table and writes benchmarks/results/stage_costs.md (with the command, the
machine, torch's thread count and the load average before and after).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from _results import write_results

from advprune.models import create, default_input_size

ARCHS = {"digits_cnn": 10, "resnet18": 10, "vgg16": 10}  # name: classes


def passes_per_second(
    name: str, classes: int, batch: int, device: str, seconds: float
) -> tuple[float, int]:
    """Images through one forward + backward pass + SGD step per second (after a warm-up)."""
    c, h, w = default_input_size(name)
    model = create(name, num_classes=classes, in_channels=c, mean=(0.5,) * c, std=(0.5,) * c)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, c, h, w, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        step()
        steps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start), steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per architecture")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument(
        "--threads", type=int, help="CPU threads (default torch's; grid jobs pinned to one: 1)"
    )
    p.add_argument("--out", default="benchmarks/results/stage_costs.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in args.archs.split(","):
        rate, steps = passes_per_second(name, ARCHS.get(name, 10), args.batch, args.device,
                                        args.seconds)  # fmt: skip
        rows.append((name, default_input_size(name), rate, steps))
        print(f"{name}: {rate:.1f} passes/s ({steps} steps)", flush=True)
    load_after = os.getloadavg()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        "# Training throughput per architecture (forward + backward + SGD step, fp32)",
        "",
        f"Command: `python benchmarks/stage_costs.py --device {args.device} --batch "
        f"{args.batch} --seconds {args.seconds}"
        + (f" --threads {args.threads}`" if args.threads else "`"),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (the machine is shared: "
        "other processes ran; rates are lower bounds).",
        "",
        "| architecture | input | batch | passes / s | timed steps |",
        "|---|---|---|---|---|",
    ]
    for name, size, rate, steps in rows:
        lines.append(
            f"| {name} | {'x'.join(map(str, size))} | {args.batch} | {rate:.1f} | {steps} |"
        )
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
