"""``advprune zoo list | get | add``: the model zoo (see advprune.bench.zoo)."""

from __future__ import annotations

import argparse

from advprune.progress import add_progress_flag

_REGISTRY_HELP = "registry file (default $ADVPRUNE_ZOO, else the packaged one)"


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo",
        help="model zoo: hashed checkpoints by model key",
        description="Registry of model key -> URL, sha256 and checkpoint card. Downloads are "
        "verified (length, sha256) before they enter the cache; files are safetensors only.",
    )
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="{list,get,add}")
    q = zoo.add_parser("list", help="the registry's model keys")
    q.add_argument("--registry", help=_REGISTRY_HELP)
    q.set_defaults(func=cmd_list)
    q = zoo.add_parser("get", help="download (if not cached) and verify a model; print its path")
    q.add_argument("key", help="model key, e.g. HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90")
    q.add_argument("--registry", help=_REGISTRY_HELP)
    q.add_argument(
        "--cache", help="cache folder (default $ADVPRUNE_CACHE, else ~/.cache/advprune/zoo)"
    )
    add_progress_flag(q)
    q.set_defaults(func=cmd_get)
    q = zoo.add_parser("add", help="add a local advprune checkpoint, served at URL, to a registry")
    q.add_argument("key", help="model key of the checkpoint")
    q.add_argument("checkpoint", help="advprune checkpoint (NAME.safetensors + NAME.json)")
    q.add_argument("--url", required=True, help="where the .safetensors file is served")
    q.add_argument("--registry", required=True, help="registry file to write (created if absent)")
    q.set_defaults(func=cmd_add)


def cmd_list(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import load_registry, registry_path

    entries = load_registry(args.registry)
    for key, entry in entries.items():
        arch = entry.card["architecture"]["name"]
        print(f"{key}  {arch}  sha256 {entry.sha256[:12]}  {entry.url}")
    if not entries:
        print(f"no models in {registry_path(args.registry)}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import fetch

    print(fetch(args.key, registry=args.registry, cache_dir=args.cache, progress=args.progress))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from advprune.bench.zoo import add_to_registry

    entry = add_to_registry(args.registry, args.key, args.checkpoint, args.url)
    print(f"added {args.key} (sha256 {entry.sha256[:12]}) to {args.registry}")
    return 0
