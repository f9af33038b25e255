"""``advprune leaderboard``: Markdown and offline HTML leaderboards of the results store."""

from __future__ import annotations

import argparse
import os

from advprune.bench.commands.store import add_store_flag, store_path


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="write leaderboard.md and leaderboard.html")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--protocol", help="e.g. linf-8/255 (required if the store holds several)")
    add_store_flag(p)
    p.set_defaults(func=cmd_leaderboard)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from advprune.bench.leaderboard import leaderboard

    store = store_path(args)
    named = args.store or os.environ.get("ADVPRUNE_STORE")
    if not named and not store.exists():  # a new user: show the benchmark's reported results
        paths = leaderboard(None, args.out, args.protocol)
        print(
            f"no results store at {store}: nothing measured yet; wrote the reported leaderboard "
            f"to {paths['markdown']} and {paths['html']}"
        )
        return 0
    paths = leaderboard(store, args.out, args.protocol)
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return 0
