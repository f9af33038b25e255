"""Every registered pruning method on digits with one training budget (CPU, a few minutes).

One dense digits_cnn is PGD-trained once (eps 3/16, PGD-5, 15 epochs, as
configs/digits_pgd.yaml). Every method in ``advprune.methods.list_methods()`` then prunes it
to 90 / 95 / 99 % unstructured and, where the method supports filters / channels, to
50 / 75 / 90 % structured, each with the SAME number of PGD training epochs after the dense
model (``--budget``, default 6):

- one-shot LWM: prune (no training) + ``budget`` finetune epochs;
- methods that train while pruning and then finetune (HYDRA, HARP): ``--prune-epochs``
  (default budget / 2) + the rest as finetune epochs;
- iterative LWM: ``--prune-epochs`` rounds of one epoch each + the rest as finetune epochs;
- filter (output-unit) pruning keeps the classifier dense for every method: its filters are
  the classes;
- methods without a finetune stage (binary) start from a FRESH network, not the dense one
  (they prune at initialisation) and get all ``budget`` epochs in their prune stage.

All training uses PGD-5 at 3/16; prune-stage lr ``--prune-lr`` (0.05), finetune lr
``--finetune-lr`` (0.01), SGD momentum 0.9, wd 5e-4, cosine, batch 64, seed 0, for every
method. Method options are the method defaults except HARP's gamma0 = 0.2, the digits value
of configs/harp/digits_prune.yaml. Evaluation: clean and PGD-20 (3/16, random start) accuracy
on the 360 test digits; measured sparsity of the conv + linear weights; wall time of the
method's stages (without evaluation).

    .venv/bin/python benchmarks/methods_digits.py [--methods hydra,lwm] [--unstructured 0.99]
        [--structured 0.5] [--budget 6] [--out runs/methods_digits]

Writes OUT/results.json and OUT/results.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from advprune.checkpoint import load_checkpoint
from advprune.config import RunConfig
from advprune.methods import list_methods, method_class
from advprune.pipeline import (
    MODEL_FILE,
    build_model,
    evaluate,
    finetune_stage,
    prepare_data,
    prune_stage,
    train_stage,
)
from advprune.quickstart import QUICKSTART

# the quickstart's digits settings (PGD-5 at 3/16, batch 64, lr 0.05, wd 5e-4), cosine schedule
BASE: dict[str, Any] = {
    **{k: v for k, v in QUICKSTART.items() if k != "method"},
    "schedule": "cosine",
    "seed": 0,
    "progress": False,
    "device": "cpu",
}
DENSE_EPOCHS = 15
UNSTRUCTURED = (0.9, 0.95, 0.99)
STRUCTURED = (0.5, 0.75, 0.9)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"harp": {"gamma0": 0.2}}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def plan(method: str, budget: int, prune_epochs: int) -> dict[str, Any]:
    """How ``method`` spends the ``budget`` epochs: prune-stage epochs (per round), rounds,
    finetune epochs, and whether it starts from the dense model."""
    cls = method_class(method)
    trains_prune = bool(cls.trains.get("prune"))
    has_finetune = "finetune" in cls.stages
    if not has_finetune:
        return {"prune": budget, "rounds": 1, "finetune": 0, "from_dense": "pretrain" in cls.stages}
    if not trains_prune:
        return {"prune": 0, "rounds": 1, "finetune": budget, "from_dense": True}
    if "rounds" in cls.options:  # iterative: one epoch per round
        return {"prune": 1, "rounds": prune_epochs, "finetune": budget - prune_epochs,
                "from_dense": True}  # fmt: skip
    return {"prune": prune_epochs, "rounds": 1, "finetune": budget - prune_epochs,
            "from_dense": True}  # fmt: skip


def run_one(
    data, dense, method: str, structure: str, sparsity: float, p: dict[str, Any], args, out: Path
) -> dict[str, Any]:
    """Prune (+ finetune) one model; return its result row."""
    options = dict(METHOD_OPTIONS.get(method, {}))
    if p["rounds"] > 1:
        options["rounds"] = p["rounds"]
    # filter pruning of the classifier would delete whole classes: it stays dense for filters
    common = dict(BASE, method=method, sparsity=sparsity, structure=structure,
                  method_options=options, keep_last=structure == "filters")  # fmt: skip
    pcfg = RunConfig(**{**common, "epochs": p["prune"], "lr": args.prune_lr})
    if p["from_dense"]:
        start = dense
    else:
        start, _ = build_model(pcfg, data)  # a fresh network (seeded)
    t0 = time.perf_counter()
    model, card = prune_stage(pcfg, data, start, out=out / "pruned")
    if p["finetune"]:
        fcfg = RunConfig(**{**common, "epochs": p["finetune"], "lr": args.finetune_lr})
        model, _ = finetune_stage(fcfg, data, model, card, out=out / "final")
    seconds = time.perf_counter() - t0
    metrics = evaluate(pcfg, data, model)
    return {
        "method": method,
        "structure": structure,
        "sparsity": sparsity,
        "measured_sparsity": round(metrics["measured_sparsity"], 6),
        "clean_accuracy": metrics["clean_accuracy"],
        "robust_accuracy": metrics["robust_accuracy"],
        "prune_epochs": p["prune"] * p["rounds"],
        "finetune_epochs": p["finetune"],
        "from": "dense" if p["from_dense"] else "fresh",
        "wall_s": round(seconds, 1),
        "attack": metrics["attack"],
        "eps": metrics["eps"],
        "n": metrics["n"],
    }


def merge_previous(path: Path, rows: list[dict[str, Any]], header: str) -> list[dict[str, Any]]:
    """Rows of an earlier run in ``path`` with the same header (same dense model and budget)
    that this run did not redo, followed by this run's rows, in method order."""
    if not path.exists():
        return rows
    before = json.loads(path.read_text())
    if before.get("header") != header:
        return rows
    key = lambda r: (r["method"], r["structure"], r["sparsity"])  # noqa: E731
    done = {key(r) for r in rows}
    merged = [r for r in before.get("rows", []) if key(r) not in done] + rows
    order = {"unstructured": 0, "filters": 1, "channels": 2}
    return sorted(merged, key=lambda r: (r["method"], order[r["structure"]], r["sparsity"]))


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """Markdown table of result rows."""
    lines = [
        header,
        "",
        "| method | structure | target | measured | clean % | PGD-20 robust % | epochs "
        "(prune+finetune) | from | wall s |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['structure']} | {r['sparsity']:.2f} | "
            f"{r['measured_sparsity']:.4f} | {100 * r['clean_accuracy']:.1f} | "
            f"{100 * r['robust_accuracy']:.1f} | {r['prune_epochs']}+{r['finetune_epochs']} | "
            f"{r['from']} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(list_methods()))
    parser.add_argument("--unstructured", type=_floats, default=UNSTRUCTURED)
    parser.add_argument("--structured", type=_floats, default=STRUCTURED)
    parser.add_argument(
        "--structures", default="unstructured,filters,channels", help="granularities to run"
    )
    parser.add_argument("--budget", type=int, default=6, help="epochs after the dense model")
    parser.add_argument("--prune-epochs", dest="prune_epochs", type=int, default=None)
    parser.add_argument("--prune-lr", dest="prune_lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", dest="finetune_lr", type=float, default=0.01)
    parser.add_argument("--dense-epochs", dest="dense_epochs", type=int, default=DENSE_EPOCHS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="runs/methods_digits")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_class(m)  # unknown names fail before any training
    prune_epochs = args.prune_epochs if args.prune_epochs is not None else args.budget // 2
    if not 1 <= prune_epochs < args.budget:
        parser.error("--prune-epochs must be in [1, budget)")
    out = Path(args.out)

    cfg = RunConfig(**{**BASE, "epochs": args.dense_epochs})
    data = prepare_data(cfg)
    t0 = time.perf_counter()
    if (out / "dense" / MODEL_FILE).exists():
        dense, _ = load_checkpoint(out / "dense" / MODEL_FILE)
    else:
        fresh, _ = build_model(cfg, data)
        dense, _ = train_stage(cfg, data, fresh, out=out / "dense")
    dense_s = time.perf_counter() - t0
    dm = evaluate(cfg, data, dense)
    header = (
        f"digits, eps 3/16 (Linf), PGD-5 training, PGD-20 evaluation on {dm['n']} test digits. "
        f"Dense PGD-trained digits_cnn ({args.dense_epochs} epochs, {dense_s:.0f} s): clean "
        f"{100 * dm['clean_accuracy']:.1f} %, robust {100 * dm['robust_accuracy']:.1f} %. "
        f"SAME budget for every method: {args.budget} PGD training epochs after the dense model "
        f"(prune-stage epochs + finetune epochs; {prune_epochs}+{args.budget - prune_epochs} "
        f"where a method trains in both stages, one epoch per round for iterative LWM, "
        f"0+{args.budget} for one-shot LWM, {args.budget}+0 from a fresh network for methods "
        f"that prune at initialisation); prune lr {args.prune_lr}, finetune lr "
        f"{args.finetune_lr}. Filter pruning keeps the classifier dense (its filters are the "
        f"classes)."
    )
    print(header, flush=True)
    rows: list[dict[str, Any]] = []
    for method in methods:
        p = plan(method, args.budget, prune_epochs)
        structures = method_class(method).structures
        wanted = [st for st in args.structures.split(",") if st in structures]
        jobs = [("unstructured", s) for s in args.unstructured if "unstructured" in wanted]
        jobs += [(st, s) for st in ("filters", "channels") if st in wanted
                 for s in args.structured]  # fmt: skip
        for structure, sparsity in jobs:
            folder = out / f"{method}-{structure}-{round(sparsity * 100)}"
            row = run_one(data, dense, method, structure, sparsity, p, args, folder)
            rows.append(row)
            print(
                f"{method:<14} {structure:<12} {sparsity:.2f} "
                f"measured {row['measured_sparsity']:.4f}  "
                f"clean {100 * row['clean_accuracy']:5.1f}%  "
                f"robust {100 * row['robust_accuracy']:5.1f}%  {row['wall_s']:.0f} s",
                flush=True,
            )
    dense_row = {"clean_accuracy": dm["clean_accuracy"], "robust_accuracy": dm["robust_accuracy"],
                 "epochs": args.dense_epochs, "wall_s": round(dense_s, 1)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rows = merge_previous(out / "results.json", rows, header)
    (out / "results.json").write_text(
        json.dumps({"header": header, "dense": dense_row, "rows": rows}, indent=2) + "\n"
    )
    table = markdown(rows, header)
    (out / "results.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} "
          f"({time.perf_counter() - t0:.0f} s in all)")  # fmt: skip


if __name__ == "__main__":
    main()
