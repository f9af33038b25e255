"""``advprune taxonomy``: the Adversarial Pruning Benchmark's taxonomy, filtered."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("taxonomy", help="the benchmark's taxonomy of adversarial pruning methods")
    p.add_argument("--pipeline", action="append", help="after, before or during (repeatable)")
    p.add_argument("--structure", action="append", help="S or US (repeatable)")
    p.add_argument("--criterion", action="append", help="LWM, SOLWM, RELWM, LIS, HGM, BCS")
    p.add_argument("--scope", action="append", help="L or G (repeatable)")
    p.add_argument("--schedule", action="append", help="1S or IT (repeatable)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_taxonomy)


def _codes(values: tuple[str, ...] | None) -> str:
    return ", ".join(values) if values else "-"


def cmd_taxonomy(args: argparse.Namespace) -> int:
    from advprune.bench.taxonomy import filter_taxonomy, legend

    entries = filter_taxonomy(
        pipeline=args.pipeline,
        structure=args.structure,
        criterion=args.criterion,
        scope=args.scope,
        schedule=args.schedule,
    )
    if args.as_json:
        print(json.dumps([e.model_dump() for e in entries], indent=2, ensure_ascii=False))
        return 0
    head = f"{'name':<12} {'pipeline':<8} {'train (pre / prune)':<22} {'train (post)':<14} "
    print(head + f"{'1S/IT':<7} {'S/US':<6} {'L/G':<6} criterion  ap_key")
    used: set[str] = set()
    for e in entries:
        first = e.pretraining or e.pruning_step or e.training_step
        second = e.finetuning or (e.training_step if e.pipeline == "before" else None)
        codes = [*(first or ()), *(second or ()), *(e.schedule or ()), *e.structures, *e.scopes]
        used.update([*codes, e.criterion])
        name = e.name + ("*" if e.source == "advprune" else "")
        print(
            f"{name:<12} {e.pipeline:<8} {_codes(first):<22} {_codes(second):<14} "
            f"{_codes(e.schedule):<7} {_codes(e.structures):<6} {_codes(e.scopes):<6} "
            f"{e.criterion:<10} {e.ap_key}"
        )
    print(f"{len(entries)} methods (source: the benchmark's taxonomy, arXiv 2409.01249).")
    if any(e.source == "advprune" for e in entries):
        print("* advprune's own method, classified with the benchmark's codes (not in its tables)")
    print("legend: " + "; ".join(f"{k}: {v}" for k, v in legend().items() if k in used))
    return 0
