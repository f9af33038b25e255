"""``advprune zoo list | get | add``: the model zoo (see advprune.bench.zoo)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="model zoo: hashed checkpoints by model key")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    q = zoo.add_parser("list", help="the registry's model keys")
    q.add_argument("--registry", help="registry file (default $ADVPRUNE_ZOO or the packaged one)")
    q.set_defaults(func=cmd_list)
    q = zoo.add_parser("get", help="download and verify a model; print its path")
    q.add_argument("key")
    q.add_argument("--registry")
    q.add_argument(
        "--cache", help="cache folder (default $ADVPRUNE_CACHE or ~/.cache/advprune/zoo)"
    )
    q.set_defaults(func=cmd_get)
    q = zoo.add_parser("add", help="add a local checkpoint served at URL to a registry file")
    q.add_argument("key")
    q.add_argument("checkpoint")
    q.add_argument("--url", required=True)
    q.add_argument("--registry", required=True)
    q.set_defaults(func=cmd_add)


def cmd_list(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import load_registry

    entries = load_registry(args.registry)
    for key, entry in entries.items():
        print(f"{key}  {entry.sha256[:12]}  {entry.url}")
    if not entries:
        print("the registry is empty")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import fetch

    print(fetch(args.key, registry=args.registry, cache=args.cache))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import add_to_registry

    entry = add_to_registry(args.registry, args.key, args.checkpoint, args.url)
    print(f"added {args.key} ({entry.sha256[:12]}) to {args.registry}")
    return 0
