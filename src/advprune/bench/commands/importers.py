"""``advprune import PATH --format hydra|harp|dense``: reference checkpoints as advprune ones."""

from __future__ import annotations

import argparse
from typing import Any

_DESCRIPTION = """\
Import a reference checkpoint (HYDRA / HARP subnet, or a plain dense state dict, bare or under
'state_dict' / 'net' / 'model', 'module.' prefixes removed) as an advprune checkpoint
OUT/model.safetensors + OUT/model.json that loads into the architecture with strict=True.
Torch files are read with torch.load(weights_only=True) only; .safetensors files are accepted.
Subnet masks are computed exactly as the references' GetSubnet does (top --k fraction of
|popup_scores| per layer; HARP: per-layer rate sigmoid(k_score) * (1 - k_min) + k_min with
k_min = k * alpha) and folded into the weights. Missing, unexpected or misshapen keys are an
error listing them; a file whose 'arch' field names another network than --arch is refused.

--format accepts:
  hydra  HYDRA's checkpoint.pth.tar / model_best.pth.tar (popup_scores on every conv / linear
         layer): --k is required (the k it was trained with; 1.0 for a pretrain file).
  harp   HARP's checkpoint.pth.tar / model_best.pth.tar (popup_scores + k_score): --k (and
         --alpha, if not HARP's 0.1) for a prune / finetune file, or --stage pretrain.
  dense  a plain state dict, e.g. HYDRA's checkpoint_dense.pth.tar (folded with its global k,
         which is HYDRA's mask). HARP's checkpoint_dense.pth.tar is refused: HARP folds it
         with the global k, not its per-layer rates; import checkpoint.pth.tar with harp.

--k is the KEPT fraction (1 - sparsity), as in the references' code: --k 0.1 = 90% sparsity.
Ties: advprune's sorts are stable (among equal |scores| the lower flat index is pruned first);
the references' order among ties is unspecified, so the output counts the scores tied at each
layer's cutoff (0 in practically every trained checkpoint).
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
        help="hydra: HYDRA subnet file (popup_scores); harp: HARP subnet file (popup_scores + "
        "k_score); dense: a plain state dict (see above)",
    )
    p.add_argument(
        "--arch",
        required=True,
        help="advprune architecture, e.g. resnet18, vgg16, wrn28_4 (HYDRA / HARP's vgg16_bn is "
        "advprune's vgg16, their BatchNorm-free vgg16 is vgg16_nobn, wrn_28_4 is wrn28_4)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--dataset", help="cifar10, cifar100, svhn or digits (sets the classes)")
    group.add_argument("--num-classes", dest="num_classes", type=int, help="default 10")
    p.add_argument(
        "--k",
        type=float,
        help="the KEPT fraction (1 - sparsity; 0.1 = 90%% sparse): HYDRA's global k, HARP's "
        "target kept fraction (k_min = k * alpha); required for hydra / harp unless --rates "
        "or --stage pretrain",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="harp only: HARP's --alpha, the floor of every layer's kept fraction as a share of "
        "the target, k_min = k * alpha (default 0.1, HARP's default); HARP does not store it, "
        "so give the value the model was trained with",
    )
    p.add_argument(
        "--stage",
        choices=("pretrain", "prune", "finetune"),
        help="harp only: the HARP stage that wrote the file. pretrain: HARP runs it with k = 1 "
        "(dense, k_score unused); prune / finetune: per-layer rates from k_score. Required "
        "where the file cannot tell (every k_score equal, e.g. HARP's initial 1.0)",
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


def _summary(source: dict[str, Any]) -> str:
    """What was imported: format, stage and the settings the masks came from."""
    parts = [source["format"]]
    if source.get("stage"):
        parts.append(f"stage {source['stage']}")
    if source.get("k") is not None:
        parts.append(f"k {source['k']:g}")
    if "alpha" in source:
        parts.append(f"alpha {source['alpha']:g}, k_min {source['k_min']:g}")
    if source.get("rates") is not None:
        parts.append("rates given")
    return ", ".join(parts)


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
        alpha=args.alpha,
        stage=args.stage,
        mean=_join(args.mean),
        std=_join(args.std),
    )
    card = read_card(path)
    source = card["imported_from"]
    print(
        f"imported {args.path} (sha256 {source['sha256'][:12]}, {_summary(source)}) -> {path}; "
        f"measured sparsity {card['sparsity']['measured']:.4f}"
    )
    ignored = source.get("ignored_keys")
    if ignored:
        print(f"ignored {ignored['count']} keys {ignored['prefix']}* ({ignored['why']})")
    if "layers" in source:
        ties = source["ties_at_cutoff"]
        if not ties:
            print(
                "ties at the pruning cutoff: none (every layer's cutoff is between distinct "
                "scores, so the mask is the references' whatever their sort order)"
            )
        else:
            listed = ", ".join(f"{n} {c}" for n, c in ties.items())
            print(
                f"ties at the pruning cutoff: {len(ties)} of {len(source['layers'])} layers "
                f"({listed} scores tied); advprune: lower flat index pruned first (stable "
                "sort), the references' order among ties is unspecified, so their mask of "
                "these layers may differ"
            )
    return 0
