"""Throughput of one PGD-10 adversarial-training step: a plain reference loop against
advprune's trainer, dense and with every kind of mask.

.venv/bin/python benchmarks/train_throughput.py [--device cpu|cuda] [--models resnet18,vgg16]
    [--batch B] [--rounds R] [--threads N] [--compile] [--epoch-images 50000] [--quick]
    [--out benchmarks/results/train_throughput.md]

Side by side in one process, on 32x32 inputs (synthetic CIFAR-sized data, uint8 like CIFAR),
every variant runs one PGD-10 training step (L-inf eps 8/255, step 2/255, random start,
attack in eval mode, SGD with momentum 0.9 and weight decay 5e-4) per round; rounds go over
the variants in turn so that a change in the machine's load hits them alike; the step time
of a variant is the median over the rounds, and each ratio the median of its per-round
ratios.

Variants:

- ``reference``: the loop as the seeds' repositories write it: an eager fp32 module, PGD
  written with ``torch.autograd.grad``, ``loss.backward()``, ``optimizer.step()`` and one
  host read per batch (the loss and accuracy, for the progress line); batches from a
  ready float tensor on the device (no loading cost at all).
- ``dense``: ``advprune.training.Trainer`` with the ``pgd`` objective on a
  ``DeviceLoader`` (what ``advprune train`` runs).
- ``lwm-90``: LWM's fixed masks at 90 % sparsity, weights and BatchNorm training
  (the finetune stage); ``hydra-90``, ``harp-90``: the prune stage of HYDRA (scores
  training) and HARP (scores and rates training, with its hardware loss) at 90 %;
  ``binary-90``: the robust binary network's prune stage (scores on frozen +-1 weights).

With ``--device cuda``: the same in fp32, then ``dense-bf16-cl`` and every masked variant
in bf16 with channels-last (``--compile`` adds ``dense-bf16-cl-compile``), and the time of
one full epoch of ``--epoch-images`` (50,000) synthetic images at batch 256 in bf16 +
channels-last.

CPU defaults (batch 8, 4 timed rounds) keep a run to a few minutes on 2 idle cores; the
timings are noisy on a shared machine, so the per-round load average is printed and the
1-minute load range goes into the table. On a machine other processes load, ``--threads 1``
gives steadier ratios: two OpenMP threads on two busy cores spin-wait on each other whenever
one of them is descheduled.

Targets (issue 14): CPU: dense >= 0.97 x the reference's throughput, every masked step
<= 1.10 x the dense step's time. One GPU (ResNet-18, batch 256): bf16 + channels-last >= 3 x
the reference fp32 loop; an epoch of 50,000 images <= 10 s.

The Markdown table is printed and written to ``--out`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_model, load_average
from torch import nn

from advprune.data import DeviceLoader, TensorImageDataset
from advprune.methods import create_method
from advprune.models import create
from advprune.training import (
    Regularizer,
    TrainConfig,
    Trainer,
    create_objective,
    parameter_groups,
)

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10
SPARSITY = 0.9
MASKED = ("lwm-90", "hydra-90", "harp-90", "binary-90")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(n: int, seed: int = 0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.randint(0, 10, (n,), generator=g))


# ---------------------------------------------------------------------------- the reference


class ReferenceLoop:
    """PGD-10 adversarial training as the seeds' repositories write it."""

    def __init__(
        self, model: nn.Module, data: TensorImageDataset, batch: int, device: torch.device
    ) -> None:
        self.model = model.to(device)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.x = data.images.to(device).float().div(255)
        self.y = data.labels.to(device)
        self.batch, self.device = batch, device

    def pgd(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + STEP * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
        self.model.train()
        return x_adv

    def run(self, steps: int) -> None:
        for i in range(steps):
            lo = (i * self.batch) % len(self.x)
            x, y = self.x[lo : lo + self.batch], self.y[lo : lo + self.batch]
            logits = self.model(self.pgd(x, y))
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            # the progress line: one read per batch
            _ = torch.stack([loss.detach(), (logits.argmax(1) == y).sum().float()]).tolist()


# ---------------------------------------------------------------------------- advprune


def _stage(variant: str, arch: str) -> tuple[nn.Module, tuple[str, ...], Regularizer | None]:
    """The model of ``variant``, the parameter kinds it trains and its regularizer."""
    torch.manual_seed(0)
    model = create(arch)
    if variant.startswith("dense"):
        return model, ("weights", "bn"), None
    name = variant.split("-")[0]
    method = create_method(name, SPARSITY)
    pruned = method.prepare(copy.deepcopy(model))
    for r in range(method.rounds):
        method.prune_round(pruned, r)
    stage = "finetune" if name == "lwm" else "prune"
    return pruned, method.trainable(stage), method.regularizer(stage)


class AdvpruneStep:
    """advprune's trainer on a variant; :meth:`run` trains ``steps`` batches."""

    def __init__(
        self,
        variant: str,
        arch: str,
        data: TensorImageDataset,
        batch: int,
        device: torch.device,
        precision: str,
        channels_last: bool,
        compile_model: bool,
    ) -> None:
        model, kinds, regularizer = _stage(variant, arch)
        model = model.to(device)
        self.trainer = Trainer(
            model,
            create_objective("pgd", eps="8/255", step_size="2/255", steps=STEPS),
            DeviceLoader(data, batch, shuffle=True, device=device),
            TrainConfig(
                epochs=1000,
                lr=0.1,
                schedule="constant",
                precision=precision,
                channels_last=channels_last,
            ),
            param_groups=parameter_groups(model, kinds),
            regularizer=regularizer,
            device=device,
            progress=False,
            report_every=10**9,
        )
        if compile_model:
            self.trainer.train_module = torch.compile(self.trainer.model)
        self.epoch = 0

    def run(self, steps: int) -> None:
        loader = self.trainer.train_loader
        assert len(loader) == steps, (len(loader), steps)
        self.trainer.train_epoch(self.epoch)  # reads its figures once, at the end
        self.epoch += 1


# ---------------------------------------------------------------------------- measuring


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _measure(
    runners: dict[str, Callable[[int], None]], rounds: int, steps: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Wall and process-CPU seconds per step of every runner, ``rounds`` times in turn after
    one warm-up round (the order rotates from round to round, so no variant always follows
    the same one), and the 1-minute load average after each round."""
    names = list(runners)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    loads: list[float] = []
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name](steps)
            _sync(device)
            if r > 0:
                wall[name].append((time.perf_counter() - t0) / steps)
                cpu[name].append((time.process_time() - c0) / steps)
        if r > 0:
            loads.append(_load1())
            line = ", ".join(f"{n} {wall[n][-1]:.3f}" for n in runners)
            print(f"  round {r}/{rounds}: s/step {line} (load {load_average()})", file=sys.stderr)
    return wall, cpu, loads


def _ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a / b."""
    return statistics.median(x / y for x, y in zip(a, b))


def _rows(
    arch: str,
    batch: int,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    loads: list[float],
    precision: dict[str, str],
    reference: str,
    dense: str,
) -> list[str]:
    rows = []
    load = f"{min(loads):.1f}-{max(loads):.1f}"
    for name, ts in times.items():
        step = statistics.median(ts)
        speed = _ratio(times[reference], ts)  # throughput relative to the reference
        cost = "" if name == reference else f"{_ratio(ts, times[dense]):.3f}"
        cpu_cost = "" if name == reference else f"{_ratio(cpu[name], cpu[dense]):.3f}"
        rows.append(
            f"| {arch} | {name} | {precision[name]} | {batch} | {1000 * step:.0f} | "
            f"{batch / step:.1f} | {speed:.3f} | {_ratio(cpu[reference], cpu[name]):.3f} | "
            f"{cost} | {cpu_cost} | {load} |"
        )
    return rows


def bench_model(
    arch: str, args: argparse.Namespace, device: torch.device, lines: list[str], verdicts: list[str]
) -> None:
    steps = args.steps
    data = _data(args.batch * steps)
    torch.manual_seed(0)
    runners: dict[str, Callable[[int], None]] = {
        "reference": ReferenceLoop(create(arch), data, args.batch, device).run
    }
    precision = {"reference": "fp32"}
    variants = [("dense", "fp32", False, False)] + [(v, "fp32", False, False) for v in MASKED]
    if device.type == "cuda":
        variants = [("dense", "fp32", False, False), ("dense-bf16-cl", "bf16", True, False)]
        if args.compile:
            variants.append(("dense-bf16-cl-compile", "bf16", True, True))
        variants += [(f"{v}-bf16-cl", "bf16", True, False) for v in MASKED]
    for name, prec, cl, comp in variants:
        runners[name] = AdvpruneStep(name, arch, data, args.batch, device, prec, cl, comp).run
        precision[name] = prec + (" + channels-last" if cl else "") + (" + compile" if comp else "")
    print(f"{arch}: {', '.join(runners)}", file=sys.stderr)
    times, cpu, loads = _measure(runners, args.rounds, steps, device)
    fast = "dense-bf16-cl" if device.type == "cuda" else "dense"
    lines += _rows(arch, args.batch, times, cpu, loads, precision, "reference", fast)
    dense_speed = _ratio(times["reference"], times["dense"])
    load = f"1-min load {min(loads):.1f}-{max(loads):.1f}"
    if device.type == "cpu":
        ok = dense_speed >= 0.97
        verdicts.append(
            f"- {arch}, CPU: advprune dense = {dense_speed:.3f} x the reference's "
            f"throughput (CPU time: {_ratio(cpu['reference'], cpu['dense']):.3f}; target "
            f">= 0.97; {load}): **{'met' if ok else 'missed'}**"
        )
        for v in MASKED:
            cost = _ratio(times[v], times["dense"])
            verdicts.append(
                f"- {arch}, CPU: {v} step = {cost:.3f} x the dense step's time (CPU time: "
                f"{_ratio(cpu[v], cpu['dense']):.3f}; target <= 1.10; {load}): "
                f"**{'met' if cost <= 1.10 else 'missed'}**"
            )
    else:
        speed = _ratio(times["reference"], times["dense-bf16-cl"])
        verdicts.append(
            f"- {arch}, GPU: bf16 + channels-last = {speed:.2f} x the reference fp32 "
            f"loop (target >= 3): **{'met' if speed >= 3 else 'missed'}**"
        )
        for v in MASKED:
            cost = _ratio(times[f"{v}-bf16-cl"], times["dense-bf16-cl"])
            verdicts.append(f"- {arch}, GPU: {v} bf16 step = {cost:.3f} x the dense bf16 step")


def bench_epoch(args: argparse.Namespace, device: torch.device) -> str:
    """One full epoch of ``--epoch-images`` synthetic images at batch 256, bf16 + CL."""
    data = _data(args.epoch_images)
    step = AdvpruneStep("dense", "resnet18", data, 256, device, "bf16", True, args.compile)
    step.trainer.train_epoch(0)  # warm-up epoch (cuDNN autotuning, compilation)
    _sync(device)
    t0 = time.perf_counter()
    step.trainer.train_epoch(1)
    _sync(device)
    seconds = time.perf_counter() - t0
    verdict = "met" if seconds <= 10 else "missed"
    return (
        f"- resnet18, GPU: one PGD-10 epoch of {args.epoch_images} images at batch 256, "
        f"bf16 + channels-last{' + compile' if args.compile else ''}: {seconds:.1f} s "
        f"({args.epoch_images / seconds:.0f} images/s; target <= 10 s): **{verdict}**"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--models", default="resnet18,vgg16")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds after the warm-up")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--compile", action="store_true", help="CUDA: add a torch.compile variant")
    p.add_argument("--epoch-images", type=int, default=50_000, help="CUDA: the epoch's size")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: batch 2, one round, nothing written"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True  # as the reference loops set it
    if args.batch is None:
        args.batch = 256 if device.type == "cuda" else 8
    if args.quick:
        args.batch, args.rounds, args.epoch_images = 2, 1, 2048
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, load_before, t0 = datetime.datetime.now(), load_average(), time.perf_counter()
    lines = [
        "| model | variant | precision | batch | ms / step | images / s | x reference "
        "throughput | (CPU time) | x dense step time | (CPU time) | 1-min load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for arch in args.models.split(","):
        bench_model(arch.strip(), args, device, lines, verdicts)
    if device.type == "cuda":
        verdicts.append(bench_epoch(args, device))
    machine = (
        f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    ) + f"{os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, "
    machine += f"{torch.get_num_threads()} CPU thread(s)"
    command = " ".join(["python", "benchmarks/train_throughput.py", *(argv or sys.argv[1:])])
    report = [
        f"# Training throughput: one PGD-10 adversarial-training step ({device.type})",
        "",
        f"Produced on {started:%Y-%m-%d %H:%M} by",
        "",
        "```bash",
        command.replace("python ", ".venv/bin/python ", 1),
        "```",
        "",
        f"Machine: {machine}; load average (1 / 5 / 15 min) {load_before} at the start and "
        f"{load_average()} at the end (the machine is shared); wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min.",
        "",
        "32x32 synthetic uint8 images, L-inf eps 8/255, PGD-10 (step 2/255, random start, "
        "attack in eval mode), SGD (momentum 0.9, weight decay 5e-4). Median of "
        f"{args.rounds} rounds after a warm-up round, {args.steps} step(s) per variant per "
        "round, variants in turn (the order rotating from round to round); ratios are "
        "medians of per-round ratios. 'x reference throughput': images/s over the reference "
        "loop's; 'x dense step time': the step's time over advprune's dense step; "
        "'(CPU time)': the same ratio of the process's CPU seconds (less sensitive to other "
        "processes on a shared machine; the targets are judged on wall time); '1-min load': "
        "the lowest and highest 1-minute load average read after each round"
        + (" (bf16 + channels-last)" if device.type == "cuda" else "")
        + ".",
        "",
        *lines,
        "",
        "## Targets",
        "",
        *verdicts,
        "",
    ]
    text = "\n".join(report)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
