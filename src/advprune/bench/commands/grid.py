"""``advprune bench run | collect | status | plan GRID.yaml``: grid runs of the benchmark on
this machine or a Slurm cluster (see advprune.bench.grid and advprune.bench.executors)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from advprune.bench.commands.store import add_store_flag, store_path
from advprune.errors import ConfigError
from advprune.progress import add_progress_flag


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid file (YAML), e.g. configs/bench_digits.yaml")
    p.add_argument("--out", help="output folder (default runs/<grid name>)")
    add_store_flag(p, "OUT/results.sqlite")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "run",
        help="run a grid of prune / finetune / evaluate jobs (local processes or Slurm)",
        description="Runs (or submits) every job of the grid that is not done, then stores "
        "the finished ones. --executor local (default) runs --workers K job processes at once "
        "on this machine; --executor slurm submits one job array through submitit and returns "
        "(--wait: waits and stores). Running it again stores what finished and starts only "
        "what is not done.",
    )
    _grid_args(p)
    p.add_argument("--job", type=int, help="run only job K in this process (see --list)")
    p.add_argument("--list", dest="list_jobs", action="store_true", help="list the jobs")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="same as --list")
    p.add_argument(
        "--executor", choices=["local", "slurm"], help="where jobs run (default: the grid's, local)"
    )
    p.add_argument(
        "--workers", type=int,
        help="local: jobs at once (default: the grid's, else one per GPU, else one per 2 cores)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int,
        help="local: CPU threads per job (default: the cores divided among the workers)",
    )  # fmt: skip
    p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and store them")
    g = p.add_argument_group("Slurm resources per job (override the grid file's slurm: block)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", help="minutes or [D-]HH:MM:SS")
    g.add_argument("--gpus-per-job", type=int)
    g.add_argument("--cpus-per-job", type=int)
    g.add_argument("--mem", help="memory per job, e.g. 32G")
    g.add_argument(
        "--sbatch", action="append", default=[], metavar="KEY=VALUE",
        help="another #SBATCH --KEY=VALUE (repeatable), e.g. --sbatch constraint=a100",
    )  # fmt: skip
    add_progress_flag(p)
    p.set_defaults(func=cmd_run)

    p = bench.add_parser(
        "collect", help="store the finished jobs of a grid (idempotent; refuses altered folders)"
    )
    _grid_args(p)
    p.set_defaults(func=cmd_collect)

    p = bench.add_parser(
        "status", help="the state of every job of a grid (stores the finished ones first)"
    )
    _grid_args(p)
    p.add_argument("--lines", type=int, default=10, help="log lines shown per failed job")
    p.set_defaults(func=cmd_status)

    p = bench.add_parser(
        "plan",
        help="estimate the GPU-hours and wall time of a grid on N GPUs",
        description="Counts each job's training and evaluation in training passes (one "
        "image through forward + backward + step) and divides by each architecture's measured "
        "throughput (advprune's data file bench/data/stage_costs.yaml, every figure with its "
        "source; figures not measured are printed as ASSUMED) or --train-rate / --eval-rate.",
    )
    p.add_argument("grid", help="grid file (YAML)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs running jobs at once (default 1)")
    p.add_argument("--device", default="gpu", help="which figures of the data file (gpu, cpu)")
    p.add_argument(
        "--train-rate", action="append", default=[], metavar="ARCH=IMAGES_PER_S",
        help="training throughput of ARCH (forward+backward passes per second), replacing "
        "the data file's",
    )  # fmt: skip
    p.add_argument(
        "--eval-rate", action="append", default=[], metavar="ARCH=POINTS_PER_S",
        help="evaluation throughput of ARCH (points/s of the grid's attacks)",
    )  # fmt: skip
    p.add_argument(
        "--train-size", action="append", default=[], metavar="DATASET=N",
        help="training images of DATASET (default: the data file's)",
    )  # fmt: skip
    p.add_argument(
        "--models", type=int, help="scale to N jobs of the grid's mix (e.g. the APB's 240)"
    )
    p.add_argument("--clean", type=float, help="clean accuracy the attack costs assume (0.8)")
    p.add_argument("--robust", type=float, help="robust accuracy the attack costs assume (0.45)")
    p.set_defaults(func=cmd_plan)


def _out(args: argparse.Namespace, grid: Any) -> tuple[Path, Path]:
    out = Path(args.out or f"runs/{grid.name}")
    return out, store_path(args, out / "results.sqlite")


def cmd_run(args: argparse.Namespace) -> int:
    from advprune.bench.grid import jobs, load_grid

    grid = load_grid(args.grid)
    out, store = _out(args, grid)
    all_jobs = jobs(grid)
    if args.list_jobs or args.dry_run:
        return _list(grid, out, store)
    if args.job is not None:
        if not 0 <= args.job < len(all_jobs):
            raise ConfigError(
                f"--job {args.job} is not a job of {args.grid} (0..{len(all_jobs) - 1})"
            )
        return _one_job(grid, all_jobs[args.job], out, args.progress)
    executor = args.executor or grid.executor
    if executor == "slurm":
        return _submit(args, grid, out, store)
    if any(getattr(args, f) is not None for f in _SLURM_FLAGS) or args.sbatch or args.wait:
        raise ConfigError("Slurm flags (--partition, --time, --wait, ...) need --executor slurm")
    from advprune.bench.executors import run_local

    for flag in ("workers", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    outcome = run_local(
        args.grid, grid, out, store, workers=args.workers or grid.workers, threads=args.threads,
        progress=args.progress,
    )  # fmt: skip
    refused = f", {len(outcome['refused'])} refused" if outcome["refused"] else ""
    print(
        f"grid {grid.name}: {len(outcome['ran'])} ran, {len(outcome['done'])} already stored, "
        f"{len(outcome['skip'])} skipped, {len(outcome['failed'])} failed{refused}; store {store}"
    )
    return 1 if outcome["failed"] or outcome["refused"] else 0


_SLURM_FLAGS = ("partition", "account", "qos", "time", "gpus_per_job", "cpus_per_job", "mem")


def _slurm_spec(args: argparse.Namespace, grid: Any) -> Any:
    """The grid's slurm settings with the command line's on top (validated)."""
    from pydantic import ValidationError

    from advprune._validation import first_validation_error
    from advprune.bench.grid import SlurmSpec

    given = {f: getattr(args, f) for f in _SLURM_FLAGS if getattr(args, f) is not None}
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"--sbatch takes KEY=VALUE (or KEY), got {item!r}")
        extra[key.strip().lstrip("-")] = value.strip() if sep else True
    settings = grid.slurm.model_dump()
    settings.update(given)
    settings["sbatch"] = {**settings["sbatch"], **extra}
    try:
        return SlurmSpec(**settings)
    except ValidationError as exc:
        raise ConfigError(first_validation_error(exc)) from None


def _submit(args: argparse.Namespace, grid: Any, out: Path, store: Path) -> int:
    from advprune.bench.executors import submit_slurm

    if args.workers is not None or args.threads is not None:
        raise ConfigError(
            "--workers / --threads are for --executor local; Slurm jobs get --cpus-per-job"
        )
    outcome = submit_slurm(
        args.grid, grid, out, store, _slurm_spec(args, grid), progress=args.progress,
        wait=args.wait, poll_s=float(os.environ.get("ADVPRUNE_POLL_S", "30")),
    )  # fmt: skip
    line = (
        f"grid {grid.name}: {len(outcome['submitted'])} submitted, {len(outcome['queued'])} "
        f"already queued, {len(outcome['done'])} already stored, {len(outcome['skip'])} skipped"
    )
    if args.wait:
        line += f"; {len(outcome['ran'])} ran, {len(outcome['failed'])} failed"
    print(f"{line}; store {store}" + ("" if args.wait else f" (advprune bench status {args.grid})"))
    return 1 if outcome.get("failed") or outcome["refused"] else 0


def _list(grid: Any, out: Path, store: Path) -> int:
    from advprune.bench.executors import job_states

    for s in job_states(grid, out, store, collect_first=False):
        why = f"  ({s.job.skip})" if s.job.skip else ""
        print(f"{s.job.index:4d}  {s.state.replace(' ', '-'):<12} {s.job.key}{why}")
    return 0


def _one_job(grid: Any, job: Any, out: Path, progress: Any) -> int:
    from advprune.bench.executors import die_with_parent
    from advprune.bench.grid import run_job

    if os.environ.get("ADVPRUNE_DIE_WITH_PARENT") == "1":
        die_with_parent()
    import socket

    import torch

    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    print(
        f"[{job.index}] {job.key} on {socket.gethostname()}: {torch.get_num_threads()} CPU "
        f"thread(s), CUDA_VISIBLE_DEVICES={gpus}",
        flush=True,
    )
    record = run_job(grid, job, out, progress=progress)
    robust = record.get("robust_accuracy")
    print(
        f"[{job.index}] {job.key}: clean {100 * record['clean_accuracy']:.2f} %, worst case "
        f"{100 * (robust or 0):.2f} % ({record['protocol']}) -> {out / 'jobs' / job.key}"
    )
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from advprune.bench.collect import collect
    from advprune.bench.grid import load_grid

    grid = load_grid(args.grid)
    out, store = _out(args, grid)
    done = collect(grid, out, store)
    for job, why in done.refused:
        print(f"[{job.index}] {job.key}: REFUSED: {why}")
    print(f"grid {grid.name}: {done.summary()}; store {store}")
    return 1 if done.refused else 0


def cmd_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from advprune.bench.executors import job_states
    from advprune.bench.grid import load_grid

    grid = load_grid(args.grid)
    out, store = _out(args, grid)
    states = job_states(grid, out, store, tail_lines=args.lines)
    for s in states:
        detail = f"  ({s.detail})" if s.detail else ""
        print(f"{s.job.index:4d}  {s.state:<12} {s.job.key}{detail}")
        if s.state in ("failed", "interrupted") and (s.tail or s.log):
            print(f"        log {s.log}:")
            for line in s.tail:
                print(f"        | {line}")
    counts = Counter(s.state for s in states)
    print(f"grid {grid.name}: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return 0


def _rates(items: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not name.strip() or number <= 0:
            raise ConfigError(f"{flag} takes NAME=NUMBER with a number > 0, got {item!r}")
        out[name.strip()] = number
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from advprune.bench.grid import load_grid
    from advprune.bench.plan import format_plan, plan_grid

    grid = load_grid(args.grid)
    plan = plan_grid(
        grid, gpus=args.gpus, device=args.device,
        train_rates=_rates(args.train_rate, "--train-rate"),
        eval_rates=_rates(args.eval_rate, "--eval-rate"),
        train_sizes={k: int(v) for k, v in _rates(args.train_size, "--train-size").items()},
        clean=args.clean, robust=args.robust, models=args.models,
    )  # fmt: skip
    print(format_plan(plan))
    return 0
