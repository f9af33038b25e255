"""Wall time and robust accuracy of AutoAttack (standard) and HO-FMN on a digits model.

Trains (or loads, when OUT/model/model.safetensors exists) the quickstart's dense model: a
digits_cnn adversarially trained with PGD at eps 3/16 (the digits default), then evaluates it
on the 360 test digits with the full protocol at default settings (AutoAttack standard;
HO-FMN: 32 trials x 100 steps on fresh tuning batches, then 200 steps) plus PGD-20 for
reference. Prints a table and writes OUT/benchmark.json; the evaluation itself (report.json,
per_sample.npz, security_curve.png/svg) is in OUT/eval and resumes if interrupted.

.venv/bin/python benchmarks/eval_digits.py [--out runs/eval_digits] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from advprune.checkpoint import load_checkpoint, write_json_atomic
from advprune.config import RunConfig
from advprune.evaluation import evaluate
from advprune.pipeline import MODEL_FILE, build_model, prepare_data, train_stage
from advprune.progress import ProgressSetting, add_progress_flag
from advprune.quickstart import PRETRAIN_EPOCHS, QUICKSTART


def train_or_load(
    out: Path, checkpoint: str | None, progress: ProgressSetting
) -> tuple[torch.nn.Module, str]:
    if checkpoint:
        return load_checkpoint(checkpoint)[0], checkpoint
    folder = out / "model"
    path = folder / MODEL_FILE
    if path.exists():
        return load_checkpoint(path)[0], str(path)
    cfg = RunConfig(
        **QUICKSTART, epochs=PRETRAIN_EPOCHS, out=str(folder), progress=progress, device="cpu"
    )
    data = prepare_data(cfg)
    model, _ = build_model(cfg, data)
    model, _ = train_stage(cfg, data, model, out=folder)
    return model, str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/eval_digits")
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead")
    parser.add_argument("--attacks", default="autoattack,hofmn,pgd")
    add_progress_flag(parser)
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    model, source = train_or_load(out, args.checkpoint, args.progress)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate(
        model,
        "digits",
        eps=QUICKSTART["eps"],
        attacks=args.attacks,
        out=out / "eval",
        progress=args.progress,
        model_info={"name": "digits_cnn", "checkpoint": source},
    )
    eval_seconds = time.perf_counter() - t0
    print(report.format())
    rows = [
        {"attack": e.name, "robust_accuracy": e.robust_accuracy, "seconds": e.seconds}
        for e in report.entries
    ]
    print(f"\n{'attack':<12} {'robust acc':>10} {'wall time':>10}")
    for r in rows:
        print(f"{r['attack']:<12} {100 * r['robust_accuracy']:>9.2f}% {r['seconds']:>9.1f}s")
    print(
        f"clean {100 * report.clean_accuracy:.2f}%, "
        f"worst case {100 * report.robust_accuracy:.2f}%, "
        f"curve at eps {100 * (report.curve_at() or 0):.2f}%, n={report.n}, "
        f"threads {torch.get_num_threads()}, evaluation {eval_seconds:.1f}s"
    )
    write_json_atomic(
        out / "benchmark.json",
        {
            "model": source,
            "training_seconds": train_seconds,
            "evaluation_seconds": eval_seconds,
            "threads": torch.get_num_threads(),
            "n": report.n,
            "eps": report.eps,
            "clean_accuracy": report.clean_accuracy,
            "robust_accuracy_worst_case": report.robust_accuracy,
            "attacks": rows,
            "hofmn_tuned": report.entry("hofmn").config if "hofmn" in args.attacks else None,
            "flags": [str(f) for f in report.all_flags()],
        },
    )
    print(f"wrote {out / 'benchmark.json'} and {out / 'eval'}")
    print(json.dumps({r["attack"]: round(r["robust_accuracy"], 4) for r in rows}))


if __name__ == "__main__":
    main()
