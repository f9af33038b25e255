"""How long a grid takes: GPU-hours and wall time on N GPUs (``advprune bench plan``).

The estimate counts each job's work in training passes (one image through forward +
backward + step) by construction of what the job runs, and divides by a measured (or, where
none was measured, an assumed and so marked) throughput of its architecture in passes per
second (``bench/data/stage_costs.yaml``, or ``--train-rate``):

- training, per epoch: ``train images x p + validation images x (attack_steps + 1)``, where
  ``p`` is the objective's passes per image (natural 1, fast 2, PGD ``k + 1``, TRADES / MART
  ``k + 2``, IBP 2, CROWN-IBP / MixTrain 3); a prune stage trains ``rounds x epochs`` if its
  method trains while pruning; the dense model of each (architecture, dataset) once;
- evaluation, per test point (``c`` clean accuracy, ``r`` robust accuracy): AutoAttack
  standard ``1 + 100 c + r (900 + 900 x 4/3 + 5000 / 3)`` (APGD-CE on the correct points;
  APGD-T and FAB-T, 9 targets x 100 iterations, and Square's 5000 forward-only queries on the
  robust ones), HO-FMN ``fmn_steps x c + 1`` plus its tuning, ``trials x tune_steps x
  tune_batch`` once per model, PGD ``pgd_steps x c + 1``, FMN ``fmn_steps x c + 1``; or a
  measured ``--eval-rate`` in points per second.

The wall time on N GPUs schedules the dense models first, then the jobs, longest first, each
on the GPU free earliest once its dense model exists (jobs run on one GPU each).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from advprune.bench.grid import Grid, Job, _stage_config, jobs
from advprune.errors import ConfigError

__all__ = ["GridPlan", "format_plan", "plan_grid", "stage_costs"]

OBJECTIVE_PASSES = {"natural": 1, "smooth": 1, "fast": 2, "ibp": 2, "crown-ibp": 3, "mixtrain": 3}


@cache
def stage_costs() -> dict[str, Any]:
    """The data file ``bench/data/stage_costs.yaml``."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "data" / "stage_costs.yaml").read_text())


def objective_passes(cfg: Any) -> int:
    """Training passes per image of ``cfg``'s objective."""
    if cfg.objective in OBJECTIVE_PASSES:
        return OBJECTIVE_PASSES[cfg.objective]
    extra = 2 if cfg.objective in ("trades", "mart") else 1
    return cfg.attack_steps + extra


def training_passes(cfg: Any, sizes: dict[str, int], rounds: int = 1) -> float:
    """Passes of a training stage of ``cfg`` (``rounds`` x its epochs, validation included)."""
    n = sizes["train"]
    val = round(n * cfg.val_fraction)
    val_passes = 1 if cfg.objective in ("natural", "smooth") else cfg.attack_steps + 1
    per_epoch = (n - val) * objective_passes(cfg) + val * val_passes
    return rounds * cfg.epochs * per_epoch


def eval_passes(grid: Grid, points: int, clean: float, robust: float) -> float:
    """Passes of the grid's evaluation of one model on ``points`` test points."""
    opts = grid.evaluation.options
    fmn_steps = opts.get("fmn_steps", 200)
    total = 0.0
    for attack in grid.evaluation.attacks:
        if attack == "autoattack":
            per_point = 1 + 100 * clean + robust * (900 + 900 * 4 / 3 + 5000 / 3)
        elif attack == "hofmn":
            tuning = (opts.get("hofmn_trials", 32) * opts.get("hofmn_tune_steps", 100)
                      * opts.get("hofmn_tune_batch", 64))  # fmt: skip
            total += tuning
            per_point = fmn_steps * clean + 1
        elif attack == "pgd":
            per_point = opts.get("pgd_steps", 20) * clean + 1
        elif attack == "fmn":
            per_point = fmn_steps * clean + 1
        else:
            raise ConfigError(
                f"bench plan counts no cost for attack {attack!r}; give the evaluation's "
                "measured speed with --eval-rate ARCH=POINTS_PER_S"
            )
        total += per_point * points
    return total


@dataclass
class JobCost:
    """The estimated hours of one job (training and evaluation) and of its dense model."""

    job: Job
    train_h: float
    eval_h: float
    dense: str
    dense_h: float

    @property
    def hours(self) -> float:
        return self.train_h + self.eval_h


@dataclass
class GridPlan:
    """The estimate and every input it used."""

    grid: Grid
    gpus: int
    device: str
    costs: list[JobCost]
    rates: dict[str, tuple[float, str, bool]]  # arch: (passes/s, source, assumption)
    eval_rates: dict[str, float]
    clean: float
    robust: float
    notes: list[str] = field(default_factory=list)

    @property
    def dense_hours(self) -> dict[str, float]:
        """Hours of each dense model (counted once per (architecture, dataset))."""
        return {c.dense: c.dense_h for c in self.costs if c.dense_h}

    @property
    def gpu_hours(self) -> float:
        return sum(c.hours for c in self.costs) + sum(self.dense_hours.values())

    @property
    def wall_hours(self) -> float:
        """List schedule: dense models first, then jobs longest first on the earliest free
        GPU once their dense model is trained."""
        free = [0.0] * self.gpus
        ready: dict[str, float] = {}
        for dense, hours in sorted(self.dense_hours.items(), key=lambda kv: -kv[1]):
            start = heapq.heappop(free)
            ready[dense] = start + hours
            heapq.heappush(free, start + hours)
        end = max(ready.values(), default=0.0)
        for cost in sorted(self.costs, key=lambda c: -c.hours):
            start = max(heapq.heappop(free), ready.get(cost.dense, 0.0))
            heapq.heappush(free, start + cost.hours)
            end = max(end, start + cost.hours)
        return end


def plan_grid(
    grid: Grid,
    *,
    gpus: int = 1,
    device: str = "gpu",
    train_rates: dict[str, float] | None = None,
    eval_rates: dict[str, float] | None = None,
    train_sizes: dict[str, int] | None = None,
    clean: float | None = None,
    robust: float | None = None,
    models: int | None = None,
) -> GridPlan:
    """Estimate the cost of every runnable job of ``grid`` on ``gpus`` devices of kind
    ``device`` (the data file's ``cpu`` or ``gpu`` figures, or the rates given); ``models``
    scales the grid to that many jobs of the same mix (its jobs repeated in order)."""
    from advprune.pipeline import make_method

    data = stage_costs()
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    known = data["train_rates"]
    if device not in known:
        raise ConfigError(f"--device {device!r}: the data file has {', '.join(known)} figures")
    acc = data["accuracy"]
    clean = acc["clean"] if clean is None else clean
    robust = acc["robust"] if robust is None else robust
    if not 0 <= robust <= clean <= 1:
        raise ConfigError(f"need 0 <= robust <= clean <= 1, got clean {clean}, robust {robust}")
    given = dict(train_rates or {})
    sizes = {k: dict(v) for k, v in data["datasets"].items()}
    for name, n in (train_sizes or {}).items():
        sizes.setdefault(name, {"test": 10000})["train"] = int(n)
    eval_rates = dict(eval_rates or {})
    rates: dict[str, tuple[float, str, bool]] = {}
    costs = []
    dense_done: set[str] = set()
    for job in jobs(grid):
        if job.skip:
            continue
        if job.arch not in rates:
            if job.arch in given:
                rates[job.arch] = (given[job.arch], "given: --train-rate", False)
            elif job.arch in known[device]:
                entry = known[device][job.arch]
                rates[job.arch] = (entry["rate"], entry["source"], bool(entry.get("assumption")))
            else:
                raise ConfigError(
                    f"no {device} training rate of {job.arch!r} in the data file; measure it "
                    f"(benchmarks/stage_costs.py --archs {job.arch}) and pass --train-rate "
                    f"{job.arch}=PASSES_PER_S"
                )
        if job.dataset not in sizes or "train" not in sizes[job.dataset]:
            raise ConfigError(
                f"the data file does not know the size of {job.dataset!r}; pass --train-size "
                f"{job.dataset}=N"
            )
        size = sizes[job.dataset]
        rate = rates[job.arch][0]
        passes = 0.0
        method = make_method(_stage_config(grid, job, "prune"))
        for stage in method.stages:
            cfg = _stage_config(grid, job, stage)
            kind = method.stage_kind(stage)
            if kind == "prune" and method.trainable("prune") and cfg.epochs > 0:
                passes += training_passes(cfg, size, rounds=make_method(cfg).rounds)
            elif kind == "train":
                passes += training_passes(cfg, size)
        dense = f"{job.arch}_{job.dataset}"
        dense_h = 0.0
        if "pretrain" in method.stages and dense not in dense_done:
            dense_done.add(dense)
            dense_h = training_passes(_stage_config(grid, job, "pretrain"), size) / rate / 3600
        points = grid.evaluation.n or size["test"]
        if job.arch in eval_rates:
            eval_h = points / eval_rates[job.arch] / 3600
        else:
            eval_h = eval_passes(grid, points, clean, robust) / rate / 3600
        costs.append(JobCost(job, passes / rate / 3600, eval_h, dense, dense_h))
    if not costs:
        raise ConfigError("the grid has no runnable job to plan")
    notes = []
    dense_of = {c.dense: c.dense_h for c in costs if c.dense_h}
    if models is not None:
        if models < 1:
            raise ConfigError(f"--models must be >= 1, got {models}")
        notes.append(
            f"scaled from the grid's {len(costs)} jobs to {models} models of the same mix "
            "(its jobs repeated, one (architecture, dataset) after the other; each dense "
            "model counted once)"
        )
        groups: dict[str, list[JobCost]] = {}
        for c in costs:
            groups.setdefault(c.dense, []).append(c)
        order = [g[i] for i in range(max(map(len, groups.values()))) for g in groups.values()
                 if i < len(g)]  # fmt: skip
        seen: set[str] = set()
        costs = []
        for i in range(models):
            c = order[i % len(order)]
            costs.append(JobCost(c.job, c.train_h, c.eval_h, c.dense,
                                 0.0 if c.dense in seen else dense_of[c.dense]))  # fmt: skip
            seen.add(c.dense)
    plan = GridPlan(grid, gpus, device, costs, rates, eval_rates, clean, robust, notes)
    if grid.evaluation.certify:
        plan.notes.append(f"certifiers ({', '.join(grid.evaluation.certify)}) are not counted")
    return plan


def _h(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:,.1f} min"


def format_plan(plan: GridPlan) -> str:
    """The estimate as text: a table per (architecture, dataset), the totals, the inputs."""
    groups: dict[tuple[str, str], list[JobCost]] = {}
    for c in plan.costs:
        groups.setdefault((c.job.arch, c.job.dataset), []).append(c)
    lines = [
        f"grid {plan.grid.name}: {len(plan.costs)} jobs on {plan.gpus} {plan.device.upper()}(s)",
        "",
        "| architecture | dataset | jobs | dense model | training / job | evaluation / job "
        f"| {plan.device.upper()}-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for (arch, dataset), group in groups.items():
        dense = plan.dense_hours.get(f"{arch}_{dataset}", 0.0)
        total = sum(c.hours for c in group) + dense
        lines.append(
            f"| {arch} | {dataset} | {len(group)} | {_h(dense)} | "
            f"{_h(sum(c.train_h for c in group) / len(group))} | "
            f"{_h(sum(c.eval_h for c in group) / len(group))} | {total:,.1f} |"
        )
    lines += [
        "",
        f"total: {plan.gpu_hours:,.1f} {plan.device.upper()}-hours; wall time on {plan.gpus} "
        f"{plan.device.upper()}(s): {_h(plan.wall_hours)} ({plan.wall_hours / 24:,.1f} days)",
        "",
        "inputs:",
    ]
    for arch, (rate, source, assumed) in plan.rates.items():
        mark = "ASSUMED " if assumed else ""
        lines.append(f"- {arch}: {mark}{rate:g} training passes/s ({' '.join(source.split())})")
    for arch, rate in plan.eval_rates.items():
        lines.append(f"- {arch}: evaluation {rate:g} points/s (given: --eval-rate)")
    lines.append(
        f"- evaluation counted in passes at clean accuracy {plan.clean:g} and robust accuracy "
        f"{plan.robust:g} (attacks: {', '.join(plan.grid.evaluation.attacks)}); see "
        "advprune/bench/plan.py"
    )
    if any(assumed for _, _, assumed in plan.rates.values()):
        lines.append(
            "- WARNING: rates marked ASSUMED were not measured; measure them with "
            "`python benchmarks/stage_costs.py --device cuda` and pass --train-rate ARCH=N"
        )
    lines += [f"- {note}" for note in plan.notes]
    return "\n".join(lines)
