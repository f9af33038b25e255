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
    p = bench.add_parser(
        "add",
        help="add an evaluation report to the results store",
        description="The model key is derived from the evaluated checkpoint's card (method, "
        "architecture, dataset, structure, sparsity); give only what the card cannot tell, or "
        "--key. An unpruned model is stored as the dense baseline of its (architecture, "
        "dataset): Dense_ARCH_DATASET_US_0.",
    )
    p.add_argument("report", help="report.json, or the folder holding it")
    p.add_argument("--key", help="model key (default: derived from the checkpoint's card)")
    g = p.add_argument_group("key parts the card cannot tell (each overrides the card's)")
    g.add_argument(
        "--method", help="AP key (HYDRA_Sehwag2020Hydra), an advprune method (hydra), or dense"
    )
    g.add_argument("--arch", help="architecture: code (R18) or model name (resnet18)")
    g.add_argument("--dataset", help="dataset: code (CIFAR10) or name (cifar10)")
    g.add_argument("--structure", help="US / unstructured, or S / filters / channels")
    g.add_argument(
        "--sparsity", type=_sparsity, help="removed percent (90, 99.5) or fraction below 1 (0.9)"
    )
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


def _sparsity(text: str) -> str | float:
    """``--sparsity``: percent text (``90``), or a fraction below 1 (``0.9``) as a float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return value if 0 < value < 1 else text.strip()


def _report_key_parts(report: Any, path: Path) -> dict[str, Any]:
    """What the report tells about its model's key: the card's parts recorded by ``advprune
    eval``, else (older reports) the card of the evaluated checkpoint if it is unchanged, else
    the architecture, dataset and method the report names."""
    from advprune.bench.keys import DENSE, KEY_PARTS, card_key_parts, parse_key
    from advprune.checkpoint import read_card, tensor_path

    model = report.model or {}
    if model.get("key"):  # e.g. written by `bench run`: its parts
        key = parse_key(str(model["key"]))
        return {name: getattr(key, name) for name in KEY_PARTS}
    if model.get("key_parts"):
        return dict(model["key_parts"])
    parts: dict[str, Any] = dict.fromkeys(KEY_PARTS)
    parts.update(arch=model.get("name"), dataset=report.dataset, method=model.get("method"))
    if model.get("method") is None and model.get("measured_sparsity") == 0:
        parts.update(method=DENSE)
    checkpoint = model.get("checkpoint")
    if checkpoint and tensor_path(checkpoint).is_file():
        card = read_card(checkpoint)
        if (card.get("tensors") or {}).get("sha256") != model.get("checkpoint_sha256"):
            raise ConfigError(
                f"the checkpoint {checkpoint} changed since {path} was evaluated (sha256 "
                "differs): its card may not describe the evaluated model; give --key KEY"
            )
        parts.update({k: v for k, v in card_key_parts(card).items() if v is not None})
    return parts


def cmd_add(args: argparse.Namespace) -> int:
    from advprune.bench.keys import KEY_PARTS, derive_key
    from advprune.bench.store import ResultsStore
    from advprune.evaluation import load_report

    path = Path(args.report)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no report at {path}")
    given = {name: getattr(args, name) for name in KEY_PARTS if getattr(args, name) is not None}
    key = args.key
    if key is not None and given:
        raise ConfigError(f"give --key or the key parts ({', '.join(given)}), not both")
    if key is None:
        key, source = derive_key(_report_key_parts(load_report(file), file), given)
        from_card = [name for name in KEY_PARTS if source[name] == "card"]
        said = [f"from the checkpoint card: {', '.join(from_card)}"] if from_card else []
        said += [f"given: {', '.join(given)}"] if given else []
        print(f"key {key} ({'; '.join(said)})")
    rows = ResultsStore(store_path(args)).add_report(file, key)
    worst = rows[-1]
    what = " (the dense baseline)" if worst.model_key.is_dense else ""
    print(
        f"stored {worst.key}{what} [{worst.protocol}]: {len(rows)} rows in {store_path(args)} "
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
