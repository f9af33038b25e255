"""``advprune bench add | list | show``: the results store from the command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from advprune.errors import ConfigError


def store_path(args: argparse.Namespace, default: str | Path | None = None) -> Path:
    """``--store``, else ``$ADVPRUNE_STORE``, else ``default`` (``./results.sqlite``)."""
    from advprune.bench.store import DEFAULT_STORE

    return Path(args.store or os.environ.get("ADVPRUNE_STORE") or default or DEFAULT_STORE)


def add_store_flag(p: argparse.ArgumentParser, default: str = "./results.sqlite") -> None:
    """The ``--store FILE`` flag shared by the benchmark commands."""
    p.add_argument("--store", help=f"results store (default $ADVPRUNE_STORE or {default})")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("add", help="add an evaluation report to the results store")
    p.add_argument("report", help="report.json, or the folder holding it")
    p.add_argument("--key", help="model key (default: the report's model key)")
    add_store_flag(p)
    p.set_defaults(func=cmd_add)

    p = bench.add_parser("list", help="one line per stored model and protocol")
    p.add_argument("--dataset", help="dataset code, e.g. CIFAR10")
    p.add_argument("--method", help="method part of the key, e.g. HYDRA_Sehwag2020Hydra")
    p.add_argument("--json", dest="as_json", action="store_true")
    add_store_flag(p)
    p.set_defaults(func=cmd_list)

    p = bench.add_parser("show", help="every stored row of one model key")
    p.add_argument("key")
    p.add_argument("--json", dest="as_json", action="store_true")
    add_store_flag(p)
    p.set_defaults(func=cmd_show)


def cmd_add(args: argparse.Namespace) -> int:
    from advprune.bench.store import ResultsStore

    path = Path(args.report)
    if not (path / "report.json" if path.is_dir() else path).is_file():
        raise ConfigError(f"no report at {path}")
    rows = ResultsStore(store_path(args)).add_report(path, args.key)
    worst = rows[-1]
    print(
        f"stored {worst.key} [{worst.protocol}]: {len(rows)} rows in {store_path(args)} "
        f"(clean {_pct(worst.clean_accuracy)}, worst case {_pct(worst.robust_accuracy)})"
    )
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _method_matches(method: str, wanted: str) -> bool:
    """``wanted`` is the key's method part or its name before the citation key (any case)."""
    method = method.lower()
    return wanted in (method, method.split("_")[0])


def _grouped(rows: list[Any]) -> dict[tuple[str, str], list[Any]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        groups.setdefault((r.key, r.protocol), []).append(r)
    return groups


def cmd_list(args: argparse.Namespace) -> int:
    from advprune.bench.keys import dataset_code
    from advprune.bench.store import ResultsStore

    dataset = None if args.dataset is None else dataset_code(args.dataset)
    method = None if args.method is None else args.method.strip().lower()
    rows = [
        r
        for r in ResultsStore(store_path(args)).results()
        if (dataset is None or r.model_key.dataset == dataset)
        and (method is None or _method_matches(r.model_key.method, method))
    ]
    if args.as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2, allow_nan=False))
        return 0
    for (key, protocol), group in _grouped(rows).items():
        attacks = "  ".join(f"{r.attack} {_pct(r.robust_accuracy)}" for r in group)
        state = "reliable" if group[0].reliable else "UNRELIABLE"
        print(f"{key}  [{protocol}]  clean {_pct(group[0].clean_accuracy)}  {attacks}  {state}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from advprune.bench.keys import parse_key
    from advprune.bench.store import ResultsStore

    key = str(parse_key(args.key))
    rows = ResultsStore(store_path(args)).results(key=key)
    if not rows:
        raise ConfigError(f"no results of {key} in {store_path(args)}")
    if args.as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2, allow_nan=False))
        return 0
    for (_, protocol), group in _grouped(rows).items():
        first = group[0]
        print(f"{key}  protocol {protocol}  n={first.n}  eps {first.eps} ({first.eps_value:.6g})")
        print(f"  clean accuracy  {_pct(first.clean_accuracy)}")
        for r in group:
            print(
                f"  {r.attack:<12} {r.kind:<10} {_pct(r.robust_accuracy):>9}"
                f"  {r.seconds or 0:.1f} s"
            )
            for f in r.flags if r.kind != "worst-case" else []:
                print(f"      FLAG {f['name']}: {f['message']}")
        print(f"  per-sample file {first.per_sample_path}  sha256 {first.per_sample_sha256}")
        print(f"  added {first.added}  {'reliable' if first.reliable else 'UNRELIABLE'}")
    return 0
