"""Importers for the reference repositories' checkpoint formats.

``import_checkpoint(path, format, arch, out=DIR)`` turns a reference checkpoint into a plain
advprune checkpoint ``DIR/model.safetensors`` (+ card) that loads into the advprune architecture
with ``strict=True``. Formats:

- ``dense``: a plain state dict (also HYDRA's ``checkpoint_dense.pth.tar``). It must match the
  architecture key for key and shape.
- ``hydra`` (inspire-group/hydra, ``models/layers.py``): every conv / linear layer is a
  ``SubnetConv`` / ``SubnetLinear`` with ``X.weight`` and ``X.popup_scores`` (same shape). HYDRA
  does not store its ``k`` (``set_prune_rate(k)``, the KEPT fraction, 1 - sparsity), so ``k`` is
  required (1.0 for a pretrain file: HYDRA's forward pass uses ``k`` in every stage). The mask is
  ``GetSubnet.forward`` on ``popup_scores.abs()``: sort the flattened scores ascending, zero the
  ``j = int((1 - k) * numel)`` smallest, keep the rest (:func:`subnet_mask`).
- ``harp`` (intellisec/harp): the same layers plus a learnable scalar per layer, ``X.k_score``
  (``models/layers.py``; float32, or float64 where HARP's rate initialisation assigned a numpy
  float64, as on its shortcut layers). In HARP's pruning and finetuning stages the ``forward``
  takes the layer's kept fraction as ``k = rate_act_func(self.k_score, self.k_min)``
  (``utils/utils.py``: ``sigmoid(k_score) * (1 - k_min) + k_min``) with
  ``k_min = global_k * alpha`` (``set_prune_rate(k, global_k, alpha, device)``, called with
  ``args.k`` = the target kept fraction and ``args.alpha``, 0.1 by default, ``args.py``). Neither
  is stored, so ``k`` is required and ``alpha`` defaults to HARP's 0.1. The rate keeps
  ``k_score``'s dtype, and so does ``(1 - k) * numel`` before ``int()``, exactly as in the
  reference (computed on the CPU). ``GetSubnet`` (``prune_reg='weight'``) is HYDRA's.
  In HARP's pretrain stage (``task_mode == 'pretrain'``) the forward pass ignores ``k_score`` and
  uses ``k = 1``: the model is dense. The stage is not stored either, so ``stage`` says it; where
  it is not given, a file whose ``k_score`` are all equal (HARP's initial 1.0 in a pretrain file)
  is refused, since it cannot tell the stage.
  HARP's channel pruning (``prune_reg='channel'``, scores of shape ``(1, C_in, 1, 1)`` /
  ``(1, C_in)``) keeps the ``int(torch.round(k * C_in))`` input channels of largest |score|
  (:func:`harp_channel_mask`); the ``(C_out, 1, 1, 1)`` score layout its prune stage creates is
  refused (the reference's mask of it is all ones or all zeros).
  HARP's ``checkpoint_dense.pth.tar`` (``k_score`` without ``popup_scores``) is refused: HARP
  folds it with the global ``k`` for every layer, not with the per-layer rates its forward pass
  uses.

Instead of ``k``, ``rates`` (a mapping or a JSON file, layer -> kept fraction, every subnet
layer) gives explicit per-layer kept fractions for either subnet format.

Architecture: the references save their model name as ``arch``; :data:`REFERENCE_ARCHS` maps it
to advprune's model, and a file for another model than ``arch`` is refused. HYDRA's WideResNet
builds ``sub_block1`` (block1's layout) and never runs it: exactly those keys are ignored (and
counted in the card); any other key is an error.

Ties: the references call ``Tensor.sort()`` / ``torch.topk``, whose order among equal scores is
unspecified; here the sorts are stable (:data:`TIE_RULE`): among equal |scores| the lower flat
index is pruned first (channels: the lower channel index is kept first). Where the cutoff falls
inside a group of equal scores the two may keep different weights; every layer records how many
scores are tied at its cutoff (``tied_at_cutoff``, 0 for scores without ties, as trained float
scores practically always are), and the CLI prints them.

The mask is folded into the weights (``weight * mask``), the scores and rates are dropped, and
the result is saved with export semantics (plain architecture, no masks). The card records
``imported_from`` (source path and sha256, format, stage, ``k`` / ``alpha`` / ``k_min`` / rates,
the rate, kept fraction and ties of every layer, the tie rule, the ``arch`` field and ignored
keys) and the input normalisation (``mean`` / ``std`` as given, else identity: the model takes
[0, 1] inputs). Torch files are read with ``torch.load(path, map_location="cpu",
weights_only=True)`` only; ``.safetensors`` files with safetensors; nothing else is ever
unpickled, and what torch refuses is said in one line. Missing, unexpected or misshapen keys are
an error that lists them, never a silently random model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.errors import CheckpointError, ConfigError, UnknownNameError

__all__ = [
    "FORMATS",
    "HARP_ALPHA",
    "REFERENCE_ARCHS",
    "STAGES",
    "harp_channel_mask",
    "harp_rate",
    "import_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "subnet_mask",
]

FORMATS = ("dense", "hydra", "harp")
STAGES = ("pretrain", "prune", "finetune")  # HARP's stages (its exp-mode names end in these)
WRAPPERS = ("state_dict", "net", "model")  # HYDRA / HARP save {"state_dict": ...}; others "net"
HARP_ALPHA = 0.1  # HARP's args.alpha default: k_min = target kept fraction * alpha
HARP_K_SCORE_INIT = 1.0  # HARP's SubnetConv / SubnetLinear: nn.init.constant_(k_score, 1.0)
TIE_RULE = (
    "stable sorts: among equal |scores| the lower flat index is pruned first (channels: the "
    "lower channel index is kept first); the references' sort order among ties is unspecified"
)
SUBNET_KEYS = ("weight", "bias", "popup_scores", "k_score")
# classes and input channels of the datasets a reference checkpoint can be for
DATASETS = {"cifar10": (10, 3), "cifar100": (100, 3), "svhn": (10, 3), "digits": (10, 1)}
# HYDRA's / HARP's model names (their models/__init__.py, saved as "arch") -> advprune's model.
# Note the shift: their vgg16_bn is advprune's vgg16, their BatchNorm-free vgg16 is vgg16_nobn.
REFERENCE_ARCHS = {
    "vgg16_bn": "vgg16",
    "vgg16": "vgg16_nobn",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "wrn_28_4": "wrn28_4",
    "wrn_28_10": "wrn28_10",
}
# their other model names: networks advprune has no model for
REFERENCE_ONLY_ARCHS = (
    *(f"vgg{n}{bn}" for n in (2, 4, 6, 8, 11, 13) for bn in ("", "_bn")),
    "resnet101", "resnet152", "wrn_28_1", "wrn_34_10", "wrn_40_2", "lin_1", "lin_2", "lin_3",
    "lin_4", "mnist_model", "mnist_model_large", "cifar_model", "cifar_model_large",
    "cifar_model_resnet", "vgg4_without_maxpool", "ResNet18", "ResNet34", "ResNet50",
)  # fmt: skip
# HYDRA's WideResNet builds sub_block1 (block1's layout) in __init__ and never calls it
UNUSED_BLOCK, UNUSED_BLOCK_OF = "sub_block1", "block1"
UNUSED_WHY = "HYDRA's WideResNet builds this block in __init__ but never runs it"
HARP_DENSE = (
    "{path} is HARP's dense export (checkpoint_dense / model_best_dense: k_score but no "
    "popup_scores): HARP folds it with the global k for every layer, not with the per-layer "
    "rates sigmoid(k_score) that its own forward pass uses, so it is not the model HARP trained "
    "and evaluated; import that run's checkpoint.pth.tar (or model_best.pth.tar) with --format harp"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(text: str) -> str:
    """``text`` without ANSI escape codes, on one line, runs of white space collapsed."""
    return " ".join(_ANSI.sub("", text).split())


def _first_sentence(exc: BaseException) -> str:
    """The first whole sentence of an exception's message (never cut mid-sentence)."""
    text = _clean(str(exc))
    if not text:
        return type(exc).__name__
    end = re.search(r"[.!?](\s|$)", text)
    return text[: end.start()] if end else text


def _torch_load_error(path: Path, exc: BaseException) -> CheckpointError:
    """One clean line for what ``torch.load(weights_only=True)`` raised: what the file is and
    what advprune expects (torch's own message has ANSI codes and runs over several lines).
    The file's first bytes tell torch.save's zip archive and legacy pickle from anything else."""
    import zipfile

    text = _clean(str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointError(
            f"{path} pickles Python objects (the first: class {found.group(1)}), e.g. a whole "
            "model saved with torch.save(model) instead of its state dict; advprune reads "
            "tensors only (torch.load weights_only=True) and never unpickles objects from "
            "outside: where the model's code is, save model.state_dict() with torch.save and "
            "import that file"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return CheckpointError(f"{path} is empty: copy or download the checkpoint again")
    zipped = head == b"PK\x03\x04"  # torch.save's archive (torch >= 1.6)
    legacy = head == b"\x80\x02\x8a\x0a"  # legacy torch.save: pickled magic number first
    if (zipped and not zipfile.is_zipfile(path)) or (
        legacy and (isinstance(exc, EOFError) or "EOF" in text)
    ):
        return CheckpointError(
            f"{path} is truncated or corrupt (torch cannot read it to the end): copy or download "
            "the checkpoint again"
        )
    if not zipped and not legacy:
        return CheckpointError(
            f"{path} is not a torch checkpoint (neither torch.save's zip archive nor its legacy "
            "format): advprune expects a state dict saved with torch.save, or a .safetensors file"
        )
    return CheckpointError(
        f"{path}: torch.load(weights_only=True) cannot read it ({_first_sentence(exc)}); "
        "advprune expects a state dict saved with torch.save, or a .safetensors file"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint file and its metadata (the references' ``arch`` field).

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(..., weights_only=True)``. The state dict is unwrapped from ``state_dict`` /
    ``net`` / ``model``; a ``module.`` prefix on every key (DataParallel) is removed. A string
    ``arch`` next to the state dict (HYDRA and HARP save one) is returned as ``{"arch": ...}``.
    Anything unreadable is a one-line :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_first_sentence(exc)}): copy or "
                "download it again, or give a torch.save state dict"
            ) from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses any pickle that is not plain data
            raise _torch_load_error(path, exc) from None
    meta: dict[str, Any] = {}
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        if isinstance(obj.get("arch"), str):
            meta.setdefault("arch", obj["arch"])
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: unknown checkpoint format (a {type(obj).__name__}, not a state dict)"
        )
    if not obj:
        raise CheckpointError(f"{path}: unknown checkpoint format (no tensors found)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        first = bad[0]
        raise CheckpointError(
            f"{path}: unknown checkpoint format ({len(bad)} entries are not named tensors, e.g. "
            f"{first!r}: {type(obj[first]).__name__}; expected a state dict, bare or under "
            f"{' / '.join(WRAPPERS)})"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, meta


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (:func:`read_checkpoint` without the metadata)."""
    return read_checkpoint(path)[0]


def _subnet_mask_and_ties(
    scores: torch.Tensor, k: float | torch.Tensor
) -> tuple[torch.Tensor, int]:
    """:func:`subnet_mask` and the number of scores tied at the cutoff (0 where the cutoff
    falls between two different scores)."""
    out = scores.clone()
    ordered, idx = scores.flatten().sort(stable=True)
    j = int((1 - k) * scores.numel())
    flat = out.view(-1)
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    ties = 0
    if 0 < j < scores.numel() and ordered[j - 1] == ordered[j]:
        ties = int((ordered == ordered[j]).sum())
    return out, ties


def subnet_mask(scores: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """HYDRA's / HARP's ``GetSubnet`` mask (``prune_reg='weight'``) of ``scores``.

    ``k`` is the KEPT fraction (a float, or a tensor as HARP's rate is). The flattened scores are
    sorted ascending (stably, see the module docstring); the ``j = int((1 - k) * numel)`` first
    are 0, the rest 1. The caller passes ``popup_scores.abs()``, as the references do.
    """
    return _subnet_mask_and_ties(scores, k)[0]


def _channel_mask_and_ties(
    scores: torch.Tensor, k: float | torch.Tensor
) -> tuple[torch.Tensor, int]:
    rate = k if isinstance(k, torch.Tensor) else torch.tensor(float(k))
    n_keep = int(torch.round(rate * scores.shape[1]))
    ordered, idx = scores.flatten().sort(descending=True, stable=True)  # (1, C_in, 1, 1): by C
    out = torch.zeros_like(scores)
    out.view(-1)[idx[:n_keep]] = 1
    ties = 0
    if 0 < n_keep < ordered.numel() and ordered[n_keep - 1] == ordered[n_keep]:
        ties = int((ordered == ordered[n_keep]).sum())
    return out, ties


def harp_channel_mask(scores: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """HARP's ``GetSubnet`` mask for ``prune_reg='channel'`` (scores ``(1, C_in, ...)``).

    Keeps the ``int(torch.round(k * C_in))`` input channels of largest score (HARP:
    ``torch.topk`` along dim 1; here a stable sort, the same set unless scores tie at the
    cutoff); the mask has the scores' shape and broadcasts over the weight.
    """
    return _channel_mask_and_ties(scores, k)[0]


def harp_rate(k_score: torch.Tensor, k_min: float) -> torch.Tensor:
    """HARP's ``rate_act_func``: the kept fraction ``sigmoid(k_score) * (1 - k_min) + k_min``."""
    k = torch.sigmoid(k_score)
    k = k * (1 - k_min)
    return k + k_min


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_rates(rates: Mapping[str, Any] | str | Path) -> dict[str, float]:
    if isinstance(rates, (str, Path)):
        try:
            rates = json.loads(Path(rates).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read rates file {rates} ({_first_sentence(exc)})") from None
    if not isinstance(rates, Mapping) or not rates:
        raise ConfigError('rates must map layer names to kept fractions, e.g. {"conv1": 0.2}')
    out = {}
    for layer, value in rates.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        if not ok:
            raise ConfigError(
                f"rate of layer {layer!r} must be a kept fraction in (0, 1], got {value!r}"
            )
        out[str(layer)] = float(value)
    return out


def _check_arch_field(field: str | None, arch: str, path: Path) -> None:
    """Refuse a file whose ``arch`` field names another network than ``arch``."""
    if field is None:
        return
    from advprune.models import list_models

    known = ", ".join(f"{ref} ({ours})" for ref, ours in REFERENCE_ARCHS.items())
    if field in REFERENCE_ONLY_ARCHS:
        raise CheckpointError(
            f"{path}: HYDRA / HARP's {field!r} has no advprune model; advprune imports their "
            f"{known}"
        )
    if field in REFERENCE_ARCHS:
        ours = REFERENCE_ARCHS[field]
        if ours != arch:
            raise CheckpointError(
                f"{path} holds HYDRA / HARP's {field!r} (advprune's {ours}), not --arch {arch}: "
                f"give --arch {ours}"
            )
    elif field in list_models():
        if field != arch:
            raise CheckpointError(
                f"{path} holds advprune's {field}, not --arch {arch}: give --arch {field}"
            )
    else:
        raise CheckpointError(
            f"{path}: its arch field {field!r} is neither a HYDRA / HARP model name ({known}) nor "
            "an advprune model, so advprune cannot check that --arch "
            f"{arch} is the same network"
        )


def _drop_unused_block(
    state: dict[str, torch.Tensor], model: nn.Module, fmt: str, path: Path
) -> list[str]:
    """Remove HYDRA's never-run WideResNet ``sub_block1`` from ``state`` if its keys are exactly
    the copy of ``block1`` HYDRA builds (plus the format's scores); return the removed keys."""
    from advprune.models import WideResNet

    prefix = f"{UNUSED_BLOCK}."
    found = [n for n in state if n.startswith(prefix)]
    if not found or not isinstance(model, WideResNet):
        return []
    of = f"{UNUSED_BLOCK_OF}."
    block = {n[len(of) :]: t for n, t in model.state_dict().items() if n.startswith(of)}
    expected = {prefix + n: tuple(t.shape) for n, t in block.items()}
    scored = any(n.endswith(".popup_scores") for n in state)  # else: no scores to expect
    extras = {"hydra": ("popup_scores",), "harp": ("popup_scores", "k_score")}.get(fmt, ())
    extras = extras if scored else ()
    for name, module in getattr(model, UNUSED_BLOCK_OF).named_modules():
        if isinstance(module, nn.Conv2d):
            for extra in extras:
                shape = () if extra == "k_score" else tuple(module.weight.shape)
                expected[f"{prefix}{name}.{extra}"] = shape
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in found if n not in expected]

    def fits(name: str) -> bool:
        shape, want = tuple(state[name].shape), expected[name]
        if name.endswith(".popup_scores") and fmt == "harp":  # or HARP's channel layout
            return shape == want or shape == (1, want[1], 1, 1)
        return shape == want or (name.endswith(".k_score") and state[name].numel() == 1)

    shapes = [f"{n} {tuple(state[n].shape)}" for n in found if n in expected and not fits(n)]
    if missing or unexpected or shapes:
        listed = (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        problems = [f"{len(names)} {label}: {_listing(names)}" for label, names in listed if names]
        raise CheckpointError(
            f"{path}: its {UNUSED_BLOCK}.* keys are not the unused copy of {UNUSED_BLOCK_OF} that "
            f"HYDRA's WideResNet builds ({'; '.join(problems)}); advprune ignores only that "
            "exact block"
        )
    for name in found:
        del state[name]
    return found


def _is_channel_layout(scores: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """HARP's input-channel score layout ``(1, C_in, 1, 1)`` / ``(1, C_in)`` (its finetune
    stage's; the weight-pruning and pretrain layouts have the weight's shape)."""
    return (
        weight is not None
        and scores.shape != weight.shape
        and scores.dim() == weight.dim()
        and scores.shape[0] == 1
        and scores.shape[1] == weight.shape[1]
        and all(s == 1 for s in scores.shape[2:])
    )


def _harp_stage(
    state: Mapping[str, torch.Tensor], layers: list[str], stage: str | None, path: Path
) -> str:
    """The HARP stage of the file: ``stage`` if given (checked against the file), else what the
    file shows (channel-score layout: finetune; k_score trained per layer: prune or finetune);
    where it shows neither, an error asking for ``--stage``."""
    values = sorted({float(state[f"{n}.k_score"].reshape(())) for n in layers})
    channel = any(
        _is_channel_layout(state[f"{n}.popup_scores"], state.get(f"{n}.weight")) for n in layers
    )
    if stage == "pretrain" and channel:
        raise CheckpointError(
            f"{path}: its popup_scores have HARP's input-channel layout (1, C_in, 1, 1), which "
            "only HARP's finetune stage writes: import it with --stage finetune"
        )
    if stage == "pretrain":
        if len(values) > 1:
            raise CheckpointError(
                f"{path}: its k_score differ between layers ({values[0]:g} to {values[-1]:g}), "
                "so it is not from HARP's pretrain stage (which never trains them): import it "
                "with --stage prune or --stage finetune"
            )
        return stage
    if stage is not None:
        return stage
    if channel:
        return "finetune (HARP's input-channel score layout)"
    if len(values) == 1:
        which = (
            f"is {HARP_K_SCORE_INIT}, HARP's initial value"
            if values[0] == HARP_K_SCORE_INIT
            else f"is {values[0]:g}"
        )
        raise CheckpointError(
            f"{path}: every k_score {which}, so the file does not say which HARP stage wrote it: "
            "give --stage pretrain for a pretrain file (HARP runs it with k = 1, every weight "
            "kept) or --stage prune / --stage finetune for a pruned one (rates from k_score)"
        )
    return "prune or finetune (k_score trained per layer)"


def _fold(
    state: dict[str, torch.Tensor],
    fmt: str,
    k: float | None,
    rates: dict[str, float] | None,
    path: Path,
    *,
    alpha: float = HARP_ALPHA,
    stage: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """Fold the subnet masks into the weights; return the plain state, per-layer records and,
    for HARP, the stage."""
    layers = [n[: -len(".popup_scores")] for n in state if n.endswith(".popup_scores")]
    with_rate = [n[: -len(".k_score")] for n in state if n.endswith(".k_score")]
    if not layers:
        if with_rate:
            raise CheckpointError(HARP_DENSE.format(path=path))
        raise CheckpointError(
            f"{path}: no popup_scores found, so it is not a {fmt} subnet checkpoint "
            "(a plain state dict imports with --format dense)"
        )
    if fmt == "hydra" and with_rate and rates is None:
        raise CheckpointError(
            f"{path} holds HARP per-layer rates ({with_rate[0]}.k_score, ...): import it with "
            "--format harp"
        )
    if rates is not None:
        unknown = sorted(set(rates) - set(layers))
        missing = [n for n in layers if n not in rates]
        if unknown or missing:
            listed = [(unknown, "unknown"), (missing, "missing")]
            raise ConfigError(
                "rates must name every subnet layer (those with popup_scores): "
                + "; ".join(f"{len(n)} {what}: {_listing(n)}" for n, what in listed if n)
            )
    elif fmt == "harp":
        no_rate = [n for n in layers if n not in with_rate]
        if no_rate:
            raise CheckpointError(
                f"{path}: {len(no_rate)} HARP layers have no k_score: {_listing(no_rate)} "
                "(give --rates, or import a HYDRA checkpoint with --format hydra)"
            )
    # per-layer keys the references' subnet layers do not have: a layout not known here
    stray = [
        f"{layer}.{name}"
        for layer in layers
        for name in (n[len(layer) + 1 :] for n in state if n.startswith(f"{layer}."))
        if "." not in name and name not in SUBNET_KEYS
    ]
    if stray:
        raise CheckpointError(
            f"{path}: {len(stray)} per-layer keys of subnet layers are neither weight, bias, "
            f"popup_scores nor HARP's k_score: {_listing(stray)}"
        )
    for layer in layers if fmt == "harp" and rates is None else ():
        k_score = state[f"{layer}.k_score"]
        if k_score.numel() != 1 or not k_score.is_floating_point():
            raise CheckpointError(
                f"{path}: {layer}.k_score must be one float, got shape {tuple(k_score.shape)}"
            )
    harp_stage = None
    if fmt == "harp" and rates is None:
        harp_stage = _harp_stage(state, layers, stage, path)
    elif fmt == "harp":
        harp_stage = stage
    k_min = None if k is None else k * alpha  # HARP: k_min = global_k * alpha
    plain = dict(state)
    records: dict[str, Any] = {}
    for layer in layers:
        weight = state.get(f"{layer}.weight")
        scores = plain.pop(f"{layer}.popup_scores")
        k_score = plain.pop(f"{layer}.k_score", None)
        if weight is None:
            raise CheckpointError(f"{path}: {layer}.popup_scores has no {layer}.weight")
        if rates is not None:
            rate: float | torch.Tensor = rates[layer]
        elif harp_stage == "pretrain":
            rate = 1.0  # HARP's forward in task_mode 'pretrain': k = 1.0, k_score unused
        elif fmt == "harp":
            assert k_score is not None and k_min is not None
            rate = harp_rate(k_score.reshape(()), k_min)
        else:
            assert k is not None
            rate = k
        channel = scores.shape != weight.shape
        if not channel:
            mask, ties = _subnet_mask_and_ties(scores.abs(), rate)
        elif fmt == "harp" and harp_stage != "pretrain" and _is_channel_layout(scores, weight):
            mask, ties = _channel_mask_and_ties(scores.abs(), rate)
        else:
            raise CheckpointError(
                f"{path}: {layer}.popup_scores has shape {tuple(scores.shape)}; expected the "
                f"weight's {tuple(weight.shape)}"
                + (
                    " or HARP's input-channel layout (1, C_in, 1, 1) / (1, C_in)"
                    if fmt == "harp" and harp_stage != "pretrain"
                    else ""
                )
            )
        plain[f"{layer}.weight"] = weight * mask
        records[layer] = {
            "rate": float(rate),
            "kept": int(mask.expand_as(weight).count_nonzero()) / weight.numel(),
            "structure": "channels" if channel else "weights",
            "tied_at_cutoff": ties,
        }
    return plain, records, harp_stage


def _check_keys(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Missing, unexpected or misshapen keys: one error listing them (first few + counts)."""
    expected = model.state_dict()
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    shapes = [
        f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}"
        for n in expected
        if n in state and state[n].shape != expected[n].shape
    ]
    problems = [
        f"{len(names)} {label}: {_listing(names)}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{path} does not match advprune's {model.spec.name}: " + "; ".join(problems)
        )


def _check_options(
    format: str, k: float | None, rates: Any, alpha: float | None, stage: str | None
) -> tuple[float | None, float | None]:
    """Validate the format's options; return ``k`` and ``alpha`` as floats (or None)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; valid: {', '.join(FORMATS)}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise ConfigError(f"k is the KEPT fraction (1 - sparsity), in (0, 1]; got {k!r}")
        k = float(k)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"alpha (HARP's k_min = k * alpha) must be in [0, 1]; got {alpha!r}")
        alpha = float(alpha)
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    if stage is not None and format != "harp":
        raise ConfigError(
            "--stage applies to --format harp (HYDRA's forward pass uses --k in every stage: "
            "give the k the file was trained with, 1.0 for a pretrain file)"
        )
    if alpha is not None and format != "harp":
        raise ConfigError("--alpha applies to --format harp (it sets HARP's k_min = k * alpha)")
    if format == "dense":
        if k is not None or rates is not None:
            raise ConfigError("--k / --rates apply to --format hydra or harp, not dense")
        return k, alpha
    if stage == "pretrain":
        for flag, value in (("--k", k), ("--rates", rates), ("--alpha", alpha)):
            if value is not None:
                raise ConfigError(
                    f"{flag} does not apply to --stage pretrain: HARP's pretrain forward pass "
                    "keeps every weight (k = 1, k_score unused)"
                )
        return k, alpha
    if k is not None and rates is not None:
        raise ConfigError("give --k or --rates, not both")
    if alpha is not None and rates is not None:
        raise ConfigError("--alpha sets k_min for rates from k_score; --rates gives the rates")
    if k is None and rates is None:
        what = "HYDRA's global k" if format == "hydra" else "HARP's target, for k_min"
        raise ConfigError(
            f"--k (the KEPT fraction, 1 - sparsity: {what}; e.g. 0.1 for 90% sparsity) "
            "or --rates is required"
            + (" (or --stage pretrain for a HARP pretrain file)" if format == "harp" else "")
        )
    return k, alpha


def import_checkpoint(
    path: str | Path,
    format: str,
    arch: str,
    *,
    out: str | Path,
    num_classes: int | None = None,
    dataset: str | None = None,
    k: float | None = None,
    rates: Mapping[str, float] | str | Path | None = None,
    alpha: float | None = None,
    stage: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **model_kwargs: Any,
) -> Path:
    """Import a reference checkpoint as the advprune checkpoint ``OUT/model.safetensors``.

    Args:
        path: ``.pt`` / ``.pth`` / ``.tar`` (read with ``weights_only=True``) or ``.safetensors``.
        format: ``dense``, ``hydra`` or ``harp`` (see the module docstring).
        arch: advprune architecture (``resnet18``, ``vgg16``, ...); ``model_kwargs`` go to
            :func:`advprune.models.create` (e.g. ``width`` of ``digits_cnn``). A reference
            file's ``arch`` field must name the same network (:data:`REFERENCE_ARCHS`).
        num_classes: classes of the model (default the ``dataset``'s, else 10).
        dataset: ``cifar10``, ``cifar100``, ``svhn`` or ``digits``; sets the classes and input
            channels and is recorded in the card.
        k: the KEPT fraction (1 - sparsity): HYDRA's global ``k``; HARP's target kept fraction
            (``k_min = alpha * k``). Required for ``hydra`` / ``harp`` unless ``rates`` is given
            (or, for ``harp``, ``stage="pretrain"``).
        rates: explicit kept fraction of every subnet layer (a mapping or a JSON file).
        alpha: HARP's ``alpha`` (``k_min = k * alpha``; default :data:`HARP_ALPHA`, HARP's).
        stage: the HARP stage that wrote the file: ``pretrain`` (dense: k = 1, ``k_score``
            unused), ``prune`` or ``finetune`` (rates from ``k_score``); required where the file
            cannot tell (every ``k_score`` equal).
        mean, std: the input normalisation the model expects (default none: [0, 1] inputs).

    Returns the tensor path. Nothing is written unless the import succeeds.
    """
    from advprune.checkpoint import save_checkpoint, sha256_file
    from advprune.models import create

    k, alpha = _check_options(format, k, rates, alpha, stage)
    rate_map = None if rates is None else _read_rates(rates)
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither (identity: inputs in [0, 1])")
    in_channels = None
    if dataset is not None:
        if dataset not in DATASETS:
            raise UnknownNameError("dataset", dataset, list(DATASETS))
        classes, in_channels = DATASETS[dataset]
        if num_classes is not None and num_classes != classes:
            raise ConfigError(f"{dataset} has {classes} classes, not num_classes={num_classes}")
        num_classes = classes
    if in_channels is not None and "in_channels" not in model_kwargs:
        model_kwargs["in_channels"] = in_channels
    model = create(
        arch, num_classes=10 if num_classes is None else num_classes, mean=mean, std=std,
        **model_kwargs,
    )  # fmt: skip
    path = Path(path)
    state, meta = read_checkpoint(path)
    _check_arch_field(meta.get("arch"), arch, path)
    has_scores = any(n.endswith(".popup_scores") for n in state)
    if not has_scores and any(n.endswith(".k_score") for n in state):
        raise CheckpointError(HARP_DENSE.format(path=path))
    if format == "dense" and has_scores:
        which = "harp" if any(n.endswith(".k_score") for n in state) else "hydra"
        stray = [n for n in state if n.endswith((".popup_scores", ".k_score"))]
        raise CheckpointError(
            f"{path} holds subnet scores ({_listing(stray, 2)}): import it with --format {which}"
        )
    ignored = _drop_unused_block(state, model, format, path)
    records: dict[str, Any] = {}
    harp_stage = None
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if format != "dense":
        # a layer of the file without scores is named as such (before any key listing)
        unscored = [
            n for n in layers if f"{n}.weight" in state and f"{n}.popup_scores" not in state
        ]
        if unscored and has_scores:
            raise CheckpointError(
                f"{path}: {len(unscored)} conv / linear layers have no popup_scores: "
                f"{_listing(unscored)} (every layer of a {format} subnet has them)"
            )
        alpha_used = HARP_ALPHA if alpha is None else alpha
        state, records, harp_stage = _fold(
            state, format, k, rate_map, path, alpha=alpha_used, stage=stage
        )
    _check_keys(state, model, path)
    unscored = [n for n in layers if n not in records]
    if format != "dense" and unscored:
        raise CheckpointError(
            f"{path}: {len(unscored)} conv / linear layers have no popup_scores: "
            f"{_listing(unscored)} (every layer of a {format} subnet has them)"
        )
    model.load_state_dict(state, strict=True)
    source: dict[str, Any] = {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "format": format,
        "k": k,
        "rates": rate_map,
        "normalization": "given" if mean is not None else "none (identity: inputs in [0, 1])",
    }
    if format == "harp":
        source["stage"] = harp_stage
        if rate_map is None and harp_stage != "pretrain":
            source["alpha"] = HARP_ALPHA if alpha is None else alpha
            source["k_min"] = k * source["alpha"]  # type: ignore[operator]
    if "arch" in meta:
        source["arch_field"] = meta["arch"]
    if ignored:
        source["ignored_keys"] = {
            "prefix": f"{UNUSED_BLOCK}.",
            "count": len(ignored),
            "why": UNUSED_WHY,
        }
    if records:
        source["tie_rule"] = TIE_RULE
        source["ties_at_cutoff"] = {
            n: r["tied_at_cutoff"] for n, r in records.items() if r["tied_at_cutoff"]
        }
        source["layers"] = records
    card: dict[str, Any] = {"imported_from": source}
    if dataset is not None:
        card["dataset"] = {"name": dataset, "num_classes": num_classes}
    return save_checkpoint(Path(out) / "model.safetensors", model, card, export=True)
