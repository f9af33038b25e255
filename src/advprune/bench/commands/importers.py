"""``advprune import PATH --format hydra|harp|dense``: reference checkpoints as advprune ones."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Import a reference checkpoint (HYDRA / HARP subnet, or a plain dense state dict, bare or under
'state_dict' / 'net' / 'model', 'module.' prefixes removed) as an advprune checkpoint
OUT/model.safetensors + OUT/model.json that loads into the architecture with strict=True.
Torch files are read with torch.load(weights_only=True) only; .safetensors files are accepted.
Subnet masks are computed exactly as the references' GetSubnet does (top --k fraction of
|popup_scores| per layer; HARP: per-layer rate sigmoid(k_score) * (1 - k_min) + k_min with
k_min = 0.1 * k) and folded into the weights. Missing, unexpected or misshapen keys are an
error listing them.

--k is the KEPT fraction (1 - sparsity), as in the references' code: --k 0.1 = 90% sparsity.
"""


def _floats(text: str) -> list[float]:
    from advprune._validation import parse_number
    from advprune.errors import ConfigError

    try:
        return [parse_number(t, "mean/std") for t in text.split(",") if t.strip()]
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _join(values: list[list[float]] | None) -> list[float] | None:
    return None if values is None else [v for group in values for v in group]


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a HYDRA / HARP / dense reference checkpoint",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="checkpoint file (.pt / .pth / .tar, or .safetensors)")
    p.add_argument(
        "--format",
        dest="fmt",
        required=True,
        choices=("hydra", "harp", "dense"),
        help="HYDRA / HARP subnet checkpoint (popup_scores), or a plain dense state dict",
    )
    p.add_argument("--arch", required=True, help="advprune architecture, e.g. resnet18, vgg16")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--dataset", help="cifar10, cifar100, svhn or digits (sets the classes)")
    group.add_argument("--num-classes", dest="num_classes", type=int, help="default 10")
    p.add_argument(
        "--k",
        type=float,
        help="the KEPT fraction (1 - sparsity; 0.1 = 90%% sparse): HYDRA's global k, HARP's "
        "target kept fraction (k_min = 0.1 k); required for hydra / harp unless --rates",
    )
    p.add_argument(
        "--rates", help="JSON file {layer: KEPT fraction} for every subnet layer (instead of --k)"
    )
    p.add_argument(
        "--mean",
        type=_floats,
        nargs="+",
        help="input normalisation mean the model expects, e.g. 0.4914 0.4822 0.4465 "
        "(default none: inputs in [0, 1])",
    )
    p.add_argument("--std", type=_floats, nargs="+", help="input normalisation std")
    p.add_argument("--out", required=True, help="output folder (gets model.safetensors + .json)")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from advprune.bench.importers import import_checkpoint
    from advprune.checkpoint import read_card

    path = import_checkpoint(
        args.path,
        args.fmt,
        args.arch,
        out=args.out,
        num_classes=args.num_classes,
        dataset=args.dataset,
        k=args.k,
        rates=args.rates,
        mean=_join(args.mean),
        std=_join(args.std),
    )
    card = read_card(path)
    sha = card["imported_from"]["sha256"]
    print(
        f"imported {args.path} (sha256 {sha[:12]}, {args.fmt}) -> {path}; "
        f"measured sparsity {card['sparsity']['measured']:.4f}"
    )
    return 0
