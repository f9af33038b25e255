"""``advprune import PATH --format hydra|harp|dense``: reference checkpoints as advprune ones."""

from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    from advprune._validation import parse_number

    return [parse_number(t, "mean/std") for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a HYDRA / HARP / dense reference checkpoint")
    p.add_argument(
        "path", help="checkpoint file (.pt / .pth / .tar read with weights_only, or .safetensors)"
    )
    p.add_argument("--format", dest="fmt", required=True, help="hydra, harp or dense")
    p.add_argument("--arch", required=True, help="advprune architecture, e.g. resnet18, vgg16")
    p.add_argument("--dataset", help="cifar10, cifar100, svhn, digits (sets the class count)")
    p.add_argument("--num-classes", dest="num_classes", type=int)
    p.add_argument(
        "--k", type=float,
        help="KEPT fraction (1 - sparsity): HYDRA's global k; HARP's target kept fraction",
    )  # fmt: skip
    p.add_argument("--rates", help="JSON file: layer name -> kept fraction (overrides --k)")
    p.add_argument(
        "--mean", type=_floats, help="input normalisation mean, e.g. 0.4914,0.4822,0.4465"
    )
    p.add_argument("--std", type=_floats, help="input normalisation std")
    p.add_argument("--out", required=True, help="output folder (gets model.safetensors + .json)")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from advprune.bench.importers import import_checkpoint
    from advprune.checkpoint import read_card

    path = import_checkpoint(
        args.path, args.fmt, args.arch, out=args.out, num_classes=args.num_classes,
        dataset=args.dataset, k=args.k, rates=args.rates, mean=args.mean, std=args.std,
    )  # fmt: skip
    card = read_card(path)
    print(f"imported {args.path} ({args.fmt}) -> {path}; measured sparsity "
          f"{card['sparsity']['measured']:.4f}")  # fmt: skip
    return 0
