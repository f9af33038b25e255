"""``advprune bench run GRID.yaml``: grid runs of the benchmark (see advprune.bench.grid)."""

from __future__ import annotations

import argparse
from pathlib import Path

from advprune.bench.commands.store import add_store_flag, store_path
from advprune.progress import add_progress_flag


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "run", help="run a grid of prune / finetune / evaluate jobs (one process per job)"
    )
    p.add_argument("grid", help="grid file (YAML), e.g. configs/bench_digits.yaml")
    p.add_argument("--out", help="output folder (default runs/<grid name>)")
    p.add_argument("--job", type=int, help="run only job K in this process (see --list)")
    p.add_argument("--list", dest="list_jobs", action="store_true", help="list the jobs")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="same as --list")
    add_progress_flag(p)
    add_store_flag(p, "OUT/results.sqlite")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from advprune.bench.grid import job_status, jobs, load_grid, run_grid, run_job
    from advprune.errors import ConfigError

    grid = load_grid(args.grid)
    out = Path(args.out or f"runs/{grid.name}")
    store = store_path(args, out / "results.sqlite")
    all_jobs = jobs(grid)
    if args.list_jobs or args.dry_run:
        for job in all_jobs:
            status = job_status(grid, job, store)
            why = f"  ({job.skip})" if job.skip else ""
            print(f"{job.index:4d}  {status:<8} {job.key}{why}")
        return 0
    if args.job is not None:
        if not 0 <= args.job < len(all_jobs):
            raise ConfigError(
                f"--job {args.job} is not a job of {args.grid} (0..{len(all_jobs) - 1})"
            )
        job = all_jobs[args.job]
        if job_status(grid, job, store) == "done":
            print(f"[{job.index}] {job.key}: already in {store}, skipped")
            return 0
        rows = run_job(grid, job, out, store, progress=args.progress)
        worst = rows[-1]
        print(
            f"[{job.index}] {job.key}: clean {100 * worst.clean_accuracy:.2f} %, worst case "
            f"{100 * (worst.robust_accuracy or 0):.2f} % ({worst.protocol}) -> {store}"
        )
        return 0
    outcome = run_grid(args.grid, out, store, progress=args.progress)
    print(
        f"grid {grid.name}: {len(outcome['ran'])} ran, {len(outcome['done'])} already stored, "
        f"{len(outcome['skip'])} skipped, {len(outcome['failed'])} failed; store {store}"
    )
    return 1 if outcome["failed"] else 0
