"""``advprune benchmark CHECKPOINT --key KEY``: the contribution flow (see bench.contribute)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advprune.bench.commands.store import add_store_flag, store_path
from advprune.evaluation.attacks import attacks_help
from advprune.progress import add_progress_flag


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="evaluate a checkpoint under the benchmark protocol, store, submit"
    )
    p.add_argument("checkpoint", help="advprune checkpoint (.safetensors; import others first)")
    p.add_argument(
        "--key", required=True, help="model key, e.g. MYAP_Me2026Method_R18_CIFAR10_US_90"
    )
    p.add_argument("--out", required=True, help="output folder (report, distances, submission)")
    p.add_argument("--attacks", help=attacks_help())
    p.add_argument("--eps", help="exact eps, e.g. 8/255 (default: the dataset's)")
    p.add_argument("--norm", default="linf")
    p.add_argument("--n", type=int, help="first N test points only (default: all)")
    p.add_argument("--data-root", dest="data_root", help="folder holding the dataset files")
    p.add_argument(
        "--allow-noncompliant",
        action="store_true",
        help="evaluate even if the model does not load into the base architecture",
    )
    add_progress_flag(p)
    add_store_flag(p, "OUT/results.sqlite")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from advprune.bench.contribute import benchmark
    from advprune.bench.keys import parse_key
    from advprune.checkpoint import load_checkpoint, tensor_path
    from advprune.data import load_dataset

    key = parse_key(args.key)
    model, _ = load_checkpoint(args.checkpoint)
    data = load_dataset(key.dataset_name, args.data_root)
    result = benchmark(
        model,
        str(key),
        data,
        out=args.out,
        eps=args.eps,
        norm=args.norm,
        attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
        store=store_path(args, Path(args.out) / "results.sqlite"),
        n=args.n,
        progress=args.progress,
        require_compliance=not args.allow_noncompliant,
        checkpoint=tensor_path(args.checkpoint),
    )
    print(result.report.format())
    print(f"submission entry: {result.submission_path}")
    print(json.dumps({k: result.submission[k] for k in ("model_key", "reliable")}))
    return 0
