"""Certified robustness on digits: dense and 90 %-pruned HYDRA models trained with each
certified objective (smooth, ibp, crown-ibp, mixtrain), on a CPU.

For every objective: dense training with ``configs/certified/digits_<objective>.yaml``, then,
when a ``hydra`` method is registered, HYDRA's prune (scores) and finetune (weights) stages
with ``digits_<objective>_prune.yaml`` / ``_finetune.yaml`` -- the configs of the CLI commands
written in those files. Every model is then measured on the digits test split:

* clean accuracy and PGD-20 robust accuracy at L∞ eps 3/16 (the digits eps);
* verified accuracy at 3/16 with IBP, CROWN-IBP (all points) and full CROWN (the first
  ``--crown-n`` points, with their IBP/CROWN-IBP figures on the same points);
* randomized-smoothing certified accuracy (sigma 0.25, n0 100, n ``--smoothing-samples``,
  alpha 0.001) at L2 radii 0, 0.25, 0.5, 0.75 on the first ``--smoothing-points`` points,
  and the abstention rate; the certified-accuracy curves go to ``OUT/smoothing_curve.png/.svg``.

The models are ``digits_cnn`` of width ``--width`` (16 by default, to keep the run near half
an hour on one core; the CLI configs build the default width 32). Finished stages are reused
(``OUT/<objective>/<stage>/model.safetensors``), so an interrupted run resumes.

    python benchmarks/certified_digits.py --out runs/certified_digits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from advprune import pipeline as wf
from advprune.certify import certify_dataset, plot_certified_accuracy, verified_accuracy
from advprune.checkpoint import load_checkpoint, write_json_atomic
from advprune.config import load_config
from advprune.data import make_loader
from advprune.methods import list_methods
from advprune.models import create
from advprune.sparsity import sparsity_report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "certified"
OBJECTIVES = {"smooth": "smooth", "ibp": "ibp", "crown-ibp": "crown_ibp", "mixtrain": "mixtrain"}
RADII = (0.0, 0.25, 0.5, 0.75)
SIGMA = 0.25


def _config(name: str, out: Path, seed: int) -> Any:
    return load_config(CONFIGS / name, {"out": str(out), "progress": False, "seed": seed})


def _stage(out: Path, run: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``out/model.safetensors`` if a previous run finished this stage, else run it."""
    path = out / wf.MODEL_FILE
    if path.exists():
        return load_checkpoint(path)
    t0 = time.perf_counter()
    model, card = run()
    print(f"  {out}: {time.perf_counter() - t0:.0f} s", flush=True)
    return model, card


def _subset(data: wf.Data, n: int) -> torch.utils.data.DataLoader:
    test = data.test.dataset
    return make_loader(torch.utils.data.Subset(test, range(min(n, len(test)))), 120)


def evaluate(
    model: torch.nn.Module, cfg: Any, data: wf.Data, args: argparse.Namespace
) -> tuple[dict[str, Any], Any]:
    """Every figure of one model (see the module docstring)."""
    model.eval()
    eps = cfg.eps_text()  # 3/16, the digits eps, for every objective
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    m = wf.evaluate(cfg, data, model)
    row.update(clean=m["clean_accuracy"], pgd=m["robust_accuracy"], n=m["n"], eps=eps)
    row["sparsity"] = sparsity_report(model, tuple(data.splits.info.input_shape)).sparsity
    for method in ("ibp", "crown-ibp"):
        row[method] = verified_accuracy(model, data.test, eps, method).verified_accuracy
    few = _subset(data, args.crown_n)
    row["crown_n"] = min(args.crown_n, m["n"])
    for method in ("ibp", "crown-ibp", "crown"):
        row[f"{method}@crown_n"] = verified_accuracy(model, few, eps, method).verified_accuracy
    smooth = certify_dataset(
        model,
        _subset(data, args.smoothing_points),
        data.splits.info.num_classes,
        SIGMA,
        n0=100,
        n=args.smoothing_samples,
        alpha=0.001,
        batch_size=2000,
        seed=args.seed,
    )
    row["smoothing"] = smooth.to_dict(RADII)
    row["seconds_eval"] = time.perf_counter() - t0
    return row, smooth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/certified_digits")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crown-n", dest="crown_n", type=int, default=100)
    p.add_argument("--smoothing-points", dest="smoothing_points", type=int, default=200)
    p.add_argument("--smoothing-samples", dest="smoothing_samples", type=int, default=10_000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    hydra = "hydra" in list_methods()
    rows: list[dict[str, Any]] = []
    curves = {}
    for objective in args.objectives.split(","):
        key = OBJECTIVES[objective]
        cfg = _config(f"digits_{key}.yaml", out / objective / "dense", args.seed)
        data = wf.prepare_data(cfg)
        info = data.splits.info

        def dense(cfg=cfg, data=data, info=info):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = create("digits_cnn", info.num_classes, info.input_shape[0],
                               mean=info.mean, std=info.std, width=args.width)  # fmt: skip
            return wf.train_stage(cfg, data, model, out=Path(cfg.out))

        model, _ = _stage(out / objective / "dense", dense)
        row, smooth = evaluate(model, cfg, data, args)
        rows.append({"objective": objective, "model": "dense", **row})
        curves[f"{objective} dense"] = smooth
        if not hydra:
            rows.append({"objective": objective, "model": "hydra-90", "pending": True})
            continue
        pcfg = _config(f"digits_{key}_prune.yaml", out / objective / "pruned", args.seed)
        pruned, pcard = _stage(
            out / objective / "pruned",
            lambda pcfg=pcfg, data=data, model=model: wf.prune_stage(
                pcfg, data, model, out=Path(pcfg.out)
            ),
        )
        fcfg = _config(f"digits_{key}_finetune.yaml", out / objective / "hydra90", args.seed)
        final, _ = _stage(
            out / objective / "hydra90",
            lambda fcfg=fcfg, data=data, pruned=pruned, pcard=pcard: wf.finetune_stage(
                fcfg, data, pruned, pcard, out=Path(fcfg.out)
            ),
        )
        row, smooth = evaluate(final, fcfg, data, args)
        rows.append({"objective": objective, "model": "hydra-90", **row})
        curves[f"{objective} HYDRA 90%"] = smooth
        write_json_atomic(out / "results.json", rows)
    write_json_atomic(out / "results.json", rows)
    plot_certified_accuracy(curves, out / "smoothing_curve", title="digits, sigma = 0.25")
    print(format_table(rows, args))
    return 0


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """A Markdown table of the results (accuracies in %)."""
    radii = " | ".join(f"r={r:g}" for r in RADII[1:])
    head = (
        f"| objective | model | sparsity | clean | PGD-20 | IBP | CROWN-IBP | IBP / CROWN-IBP / "
        f"CROWN (first {args.crown_n}) | smoothed acc | {radii} | abstain |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("pending"):
            lines.append(f"| {r['objective']} | {r['model']} | pending: no hydra method |")
            continue
        s = r["smoothing"]["certified_accuracy"]
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        crown = " / ".join(pct(r[f"{m}@crown_n"]) for m in ("ibp", "crown-ibp", "crown"))
        cert = " | ".join(pct(s[f"{x:g}"]) for x in RADII[1:])
        lines.append(
            f"| {r['objective']} | {r['model']} | {r['sparsity']:.3f} | {pct(r['clean'])} | "
            f"{pct(r['pgd'])} | {pct(r['ibp'])} | {pct(r['crown-ibp'])} | {crown} | "
            f"{pct(s['0'])} | {cert} | {pct(r['smoothing']['abstention_rate'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
