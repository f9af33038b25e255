"""Importers for the reference repositories' checkpoint formats.

``import_checkpoint(path, format, arch, out=DIR)`` turns a reference checkpoint into a plain
advprune checkpoint ``DIR/model.safetensors`` (+ card) that loads into the advprune architecture
with ``strict=True``. Formats:

- ``dense``: a plain state dict. It must match the architecture key for key and shape.
- ``hydra`` (inspire-group/hydra, ``models/layers.py``): every conv / linear layer is a
  ``SubnetConv`` / ``SubnetLinear`` with ``X.weight`` and ``X.popup_scores`` (same shape). HYDRA
  does not store its ``k`` (``set_prune_rate(k)``, the KEPT fraction, 1 - sparsity), so ``k`` is
  required. The mask is ``GetSubnet.forward`` on ``popup_scores.abs()``: sort the flattened
  scores ascending, zero the ``j = int((1 - k) * numel)`` smallest, keep the rest
  (:func:`subnet_mask`).
- ``harp`` (intellisec/harp): the same layers plus a learnable scalar per layer, ``X.k_score``
  (``models/layers.py``, ``SubnetConv.__init__`` / ``SubnetLinear.__init__``). Their ``forward``
  takes the layer's kept fraction as ``k = rate_act_func(self.k_score, self.k_min)``
  (``utils/utils.py``: ``sigmoid(k_score) * (1 - k_min) + k_min``) with
  ``k_min = global_k * alpha`` (``set_prune_rate(k, global_k, alpha, device)`` called by
  ``utils/model.py: set_prune_rate_model`` with ``args.k`` = the target kept fraction and
  ``args.alpha`` = 0.1 by default, ``args.py``), so ``k`` (the target) is required here too.
  The rate is a float32 tensor, and so is ``(1 - k) * numel`` before ``int()``, exactly as in
  the reference (computed on the CPU). ``GetSubnet`` (``prune_reg='weight'``) is HYDRA's.
  HARP's channel pruning (``prune_reg='channel'``, scores of shape ``(1, C_in, 1, 1)`` /
  ``(1, C_in)``) keeps the ``int(torch.round(k * C_in))`` input channels of largest |score|
  (``torch.topk`` along dim 1, :func:`harp_channel_mask`); the ``(C_out, 1, 1, 1)`` score layout
  its prune stage creates is refused (the reference's mask of it is all ones or all zeros).

Instead of ``k``, ``rates`` (a mapping or a JSON file, layer -> kept fraction, every subnet
layer) gives explicit per-layer kept fractions for either subnet format.

Ties: the references call ``Tensor.sort()``, whose order among equal scores is unspecified; here
the sort is ``torch.sort(stable=True)``, so among equal scores the lower flat index is pruned
first. Scores without ties (as trained float scores practically always are) give exactly the
reference's mask.

The mask is folded into the weights (``weight * mask``), the scores and rates are dropped, and
the result is saved with export semantics (plain architecture, no masks). The card records
``imported_from`` (source path and sha256, format, ``k`` / rates, the rate and kept fraction of
every layer, the tie rule) and the input normalisation (``mean`` / ``std`` as given, else
identity: the model takes [0, 1] inputs). Torch files are read with
``torch.load(path, map_location="cpu", weights_only=True)`` only; ``.safetensors`` files with
safetensors; nothing else is ever unpickled. Missing, unexpected or misshapen keys are an error
that lists them, never a silently random model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.errors import CheckpointError, ConfigError, UnknownNameError

__all__ = [
    "FORMATS",
    "HARP_ALPHA",
    "harp_channel_mask",
    "harp_rate",
    "import_checkpoint",
    "read_state_dict",
    "subnet_mask",
]

FORMATS = ("dense", "hydra", "harp")
WRAPPERS = ("state_dict", "net", "model")  # HYDRA / HARP save {"state_dict": ...}; others "net"
HARP_ALPHA = 0.1  # HARP's args.alpha default: k_min = alpha * target kept fraction
TIE_RULE = "torch.sort(stable=True): among equal |scores| the lower flat index is pruned first"
SUBNET_KEYS = ("weight", "bias", "popup_scores", "k_score")
# classes and input channels of the datasets a reference checkpoint can be for
DATASETS = {"cifar10": (10, 3), "cifar100": (100, 3), "svhn": (10, 3), "digits": (10, 1)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``state_dict`` / ``net`` / ``model``.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(..., weights_only=True)``. A ``module.`` prefix on every key (DataParallel)
    is removed. No tensors, or a non-mapping, is a one-line :class:`CheckpointError`.
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
                f"{path}: unknown checkpoint format (not a readable safetensors file: "
                f"{_first_line(exc)})"
            ) from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses any pickle that is not plain data
            raise CheckpointError(
                f"{path}: unknown checkpoint format or unsafe pickle (read with "
                f"torch.load(weights_only=True): {_first_line(exc)})"
            ) from None
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
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
    return state


def subnet_mask(scores: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """HYDRA's / HARP's ``GetSubnet`` mask (``prune_reg='weight'``) of ``scores``.

    ``k`` is the KEPT fraction (a float, or a tensor as HARP's rate is). The flattened scores are
    sorted ascending (stably, see the module docstring); the ``j = int((1 - k) * numel)`` first
    are 0, the rest 1. The caller passes ``popup_scores.abs()``, as the references do.
    """
    out = scores.clone()
    _, idx = scores.flatten().sort(stable=True)
    j = int((1 - k) * scores.numel())
    flat = out.view(-1)
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    return out


def harp_channel_mask(scores: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """HARP's ``GetSubnet`` mask for ``prune_reg='channel'`` (scores ``(1, C_in, ...)``).

    Keeps the ``int(torch.round(k * C_in))`` input channels of largest score (``torch.topk``
    along dim 1); the mask has the scores' shape and broadcasts over the weight.
    """
    rate = k if isinstance(k, torch.Tensor) else torch.tensor(float(k))
    kept = torch.topk(scores, k=int(torch.round(rate * scores.shape[1])), dim=1).indices
    out = torch.zeros_like(scores)
    out.view(-1)[kept.flatten()] = 1  # (1, C_in, 1, 1): flat index = channel index
    return out


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
            raise ConfigError(f"cannot read rates file {rates} ({_first_line(exc)})") from None
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


def _fold(
    state: dict[str, torch.Tensor],
    fmt: str,
    k: float | None,
    rates: dict[str, float] | None,
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold the subnet masks into the weights; return the plain state and per-layer records."""
    layers = [n[: -len(".popup_scores")] for n in state if n.endswith(".popup_scores")]
    if not layers:
        raise CheckpointError(
            f"{path}: no popup_scores found, so it is not a {fmt} subnet checkpoint "
            "(a plain state dict imports with --format dense)"
        )
    with_rate = [n[: -len(".k_score")] for n in state if n.endswith(".k_score")]
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
    k_min = None if k is None else k * HARP_ALPHA  # HARP: k_min = global_k * alpha
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
        elif fmt == "harp":
            assert k_score is not None and k_min is not None
            if k_score.numel() != 1 or not k_score.is_floating_point():
                raise CheckpointError(
                    f"{path}: {layer}.k_score must be one float, got shape {tuple(k_score.shape)}"
                )
            rate = harp_rate(k_score.reshape(()), k_min)
        else:
            assert k is not None
            rate = k
        channel = scores.shape != weight.shape
        if not channel:
            mask = subnet_mask(scores.abs(), rate)
        elif (
            fmt == "harp"
            and scores.dim() == weight.dim()
            and scores.shape[0] == 1
            and scores.shape[1] == weight.shape[1]
            and all(s == 1 for s in scores.shape[2:])
        ):
            mask = harp_channel_mask(scores.abs(), rate)
        else:
            raise CheckpointError(
                f"{path}: {layer}.popup_scores has shape {tuple(scores.shape)}; expected the "
                f"weight's {tuple(weight.shape)}"
                + (
                    " or HARP's input-channel layout (1, C_in, 1, 1) / (1, C_in)"
                    if fmt == "harp"
                    else ""
                )
            )
        plain[f"{layer}.weight"] = weight * mask
        records[layer] = {
            "rate": float(rate),
            "kept": int(mask.expand_as(weight).count_nonzero()) / weight.numel(),
            "structure": "channels" if channel else "weights",
        }
    return plain, records


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
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **model_kwargs: Any,
) -> Path:
    """Import a reference checkpoint as the advprune checkpoint ``OUT/model.safetensors``.

    Args:
        path: ``.pt`` / ``.pth`` / ``.tar`` (read with ``weights_only=True``) or ``.safetensors``.
        format: ``dense``, ``hydra`` or ``harp`` (see the module docstring).
        arch: advprune architecture (``resnet18``, ``vgg16``, ...); ``model_kwargs`` go to
            :func:`advprune.models.create` (e.g. ``width`` of ``digits_cnn``).
        num_classes: classes of the model (default the ``dataset``'s, else 10).
        dataset: ``cifar10``, ``cifar100``, ``svhn`` or ``digits``; sets the classes and input
            channels and is recorded in the card.
        k: the KEPT fraction (1 - sparsity): HYDRA's global ``k``; HARP's target kept fraction
            (``k_min = 0.1 * k``). Required for ``hydra`` / ``harp`` unless ``rates`` is given.
        rates: explicit kept fraction of every subnet layer (a mapping or a JSON file).
        mean, std: the input normalisation the model expects (default none: [0, 1] inputs).

    Returns the tensor path. Nothing is written unless the import succeeds.
    """
    from advprune.checkpoint import save_checkpoint, sha256_file
    from advprune.models import create

    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; valid: {', '.join(FORMATS)}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise ConfigError(f"k is the KEPT fraction (1 - sparsity), in (0, 1]; got {k!r}")
        k = float(k)
    rate_map = None if rates is None else _read_rates(rates)
    if format == "dense" and (k is not None or rate_map is not None):
        raise ConfigError("--k / --rates apply to --format hydra or harp, not dense")
    if format != "dense":
        if k is not None and rate_map is not None:
            raise ConfigError("give --k or --rates, not both")
        if k is None and rate_map is None:
            what = "HYDRA's global k" if format == "hydra" else "HARP's target, for k_min"
            raise ConfigError(
                f"--k (the KEPT fraction, 1 - sparsity: {what}; e.g. 0.1 for 90% sparsity) "
                "or --rates is required"
            )
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
    state = read_state_dict(path)
    records: dict[str, Any] = {}
    if format == "dense":
        stray = [n for n in state if n.endswith((".popup_scores", ".k_score"))]
        if stray:
            raise CheckpointError(
                f"{path} holds subnet scores ({_listing(stray, 2)}): import it with "
                "--format hydra or harp"
            )
    else:
        state, records = _fold(state, format, k, rate_map, path)
    _check_keys(state, model, path)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
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
    if format == "harp" and rate_map is None:
        source["k_min"] = k * HARP_ALPHA  # type: ignore[operator]
    if records:
        source["tie_rule"] = TIE_RULE
        source["layers"] = records
    card: dict[str, Any] = {"imported_from": source}
    if dataset is not None:
        card["dataset"] = {"name": dataset, "num_classes": num_classes}
    return save_checkpoint(Path(out) / "model.safetensors", model, card, export=True)
