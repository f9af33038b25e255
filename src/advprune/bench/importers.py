"""Importers for the reference repositories' checkpoint formats.

- ``dense``: a plain state dict, bare or wrapped under ``state_dict`` / ``net`` / ``model``
  (a ``module.`` prefix of DataParallel is removed); it must match the advprune architecture
  key for key and shape.
- ``hydra``: HYDRA subnet layers (``X.weight`` + ``X.popup_scores``, one global ``k`` = the
  KEPT fraction, given by the user since HYDRA does not store it). The mask is HYDRA's
  ``GetSubnet`` on ``popup_scores.abs()``: sort the flattened scores ascending, zero the
  ``j = int((1 - k) * numel)`` smallest, keep the rest. Ties are broken by a stable sort
  (``torch.sort(stable=True)``: equal scores keep the lower index pruned first).
- ``harp``: HARP subnet layers (intellisec/harp, ``models/layers.py``: ``SubnetConv`` /
  ``SubnetLinear``) add a scalar ``X.k_score`` per layer; the kept fraction is
  ``rate_act_func(k_score, k_min) = sigmoid(k_score) * (1 - k_min) + k_min`` (``utils/utils.py``)
  with ``k_min = global_k * alpha`` (``set_prune_rate``; alpha 0.1, ``global_k`` = the target
  kept fraction, ``--k``), computed in float32 as the reference does, and the mask is the same
  ``GetSubnet`` as HYDRA's. Per-layer kept fractions may also be given explicitly (``rates``).
  Only weight-shaped (unstructured) scores are supported.

The mask is folded into the weights and the result is saved as a plain advprune checkpoint
whose card records the source file's sha256, the format and ``k`` / the rates. Torch files are
read with ``torch.load(..., weights_only=True)`` only: nothing else is ever unpickled. Missing,
unexpected or misshapen keys are an error that lists them, never a silently random model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from advprune.errors import CheckpointError, ConfigError

__all__ = ["FORMATS", "hydra_mask", "import_checkpoint", "read_state_dict"]

FORMATS = ("dense", "hydra", "harp")
_WRAPPERS = ("state_dict", "net", "model")
HARP_ALPHA = 0.1


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch file (``weights_only=True``) or a safetensors file, unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses any non-tensor pickle content
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc)
            raise CheckpointError(
                f"{path}: unknown checkpoint format or unsafe pickle (read with "
                f"weights_only=True: {first})"
            ) from None
    if isinstance(obj, Mapping):
        for name in _WRAPPERS:
            if isinstance(obj.get(name), Mapping):
                obj = obj[name]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: unknown checkpoint format (no state dict of tensors)")
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: unknown checkpoint format (entry {k!r} is a {type(v).__name__}, "
                "not a tensor)"
            )
        state[k[len("module.") :] if k.startswith("module.") else k] = v
    return state


def hydra_mask(scores: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """HYDRA's / HARP's ``GetSubnet`` mask: keep the top ``k`` (kept fraction) of ``scores``."""
    out = torch.ones_like(scores)
    _, idx = scores.flatten().sort(stable=True)
    j = int((1 - k) * scores.numel())
    out.view(-1)[idx[:j]] = 0
    return out


def _harp_rate(k_score: torch.Tensor, k_target: float) -> torch.Tensor:
    k_min = k_target * HARP_ALPHA
    return torch.sigmoid(k_score.float()) * (1 - k_min) + k_min


def _fold(
    state: dict[str, torch.Tensor], fmt: str, k: float | None, rates: Mapping[str, float] | None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fold the subnet masks into the weights; return the plain state and kept fractions."""
    layers = sorted(n[: -len(".popup_scores")] for n in state if n.endswith(".popup_scores"))
    if not layers:
        raise CheckpointError(f"a {fmt} checkpoint has popup_scores in its layers; found none")
    if fmt == "hydra" and k is None:
        raise ConfigError("--k (the KEPT fraction of HYDRA's global k, e.g. 0.1) is required")
    if fmt == "harp" and k is None and rates is None:
        raise ConfigError("--k (HARP's target kept fraction, for k_min) or --rates is required")
    if rates is not None:
        unknown = sorted(set(rates) - set(layers))
        if unknown:
            raise ConfigError(f"rates name layers without popup_scores: {', '.join(unknown)}")
    plain = dict(state)
    kept: dict[str, float] = {}
    for layer in layers:
        weight, scores = state.get(f"{layer}.weight"), plain.pop(f"{layer}.popup_scores")
        if weight is None or scores.shape != weight.shape:
            raise CheckpointError(
                f"{layer}.popup_scores must have its weight's shape "
                f"{None if weight is None else tuple(weight.shape)}; got {tuple(scores.shape)} "
                "(HARP channel scores are not supported)"
            )
        score_key = f"{layer}.k_score"
        if rates is not None and layer in rates:
            rate: float | torch.Tensor = float(rates[layer])
        elif fmt == "harp":
            if score_key not in state:
                raise CheckpointError(f"HARP layer {layer} has no k_score (and no --rates entry)")
            assert k is not None
            rate = _harp_rate(state[score_key], k)
        else:
            assert k is not None
            rate = k
        plain.pop(score_key, None)
        mask = hydra_mask(scores.abs(), rate)
        plain[f"{layer}.weight"] = weight * mask.to(weight.dtype)
        kept[layer] = float(mask.mean())
    return plain, kept


def _check_keys(state: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}"
        for n in set(state) & set(expected)
        if state[n].shape != expected[n].shape
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            problems.append(f"{len(names)} {label}: {', '.join(names[:5])}{more}")
    if problems:
        raise CheckpointError(f"{path} does not match {model.spec.name}: " + "; ".join(problems))


def import_checkpoint(
    path: str | Path,
    fmt: str,
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
    """Import a reference checkpoint as an advprune checkpoint ``OUT/model.safetensors``.

    ``num_classes`` defaults to the ``dataset``'s (10; 100 for cifar100).
    ``k`` is the KEPT fraction (HYDRA's global ``k``; HARP's target for ``k_min``); ``rates``
    maps layer names to kept fractions (or names a JSON file of them). ``mean`` / ``std``
    record the normalisation the model expects (default none: inputs in [0, 1]).
    """
    from advprune.checkpoint import save_checkpoint, sha256_file
    from advprune.models import create

    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; valid: {', '.join(FORMATS)}")
    if k is not None and not 0 < k <= 1:
        raise ConfigError(f"k is the kept fraction, in (0, 1]; got {k}")
    if isinstance(rates, (str, Path)):
        try:
            rates = json.loads(Path(rates).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read rates file {rates} ({exc})") from None
    path = Path(path)
    state = read_state_dict(path)
    kept: dict[str, float] = {}
    if fmt == "dense":
        stray = sorted(n for n in state if n.endswith((".popup_scores", ".k_score")))
        if stray:
            raise CheckpointError(
                f"{path} holds subnet scores ({stray[0]}, ...): import it with --format hydra|harp"
            )
    else:
        state, kept = _fold(state, fmt, k, rates)  # type: ignore[arg-type]
    if num_classes is None:
        num_classes = 100 if dataset == "cifar100" else 10
    model = create(arch, num_classes=num_classes, mean=mean, std=std, **model_kwargs)
    _check_keys(state, model, path)
    model.load_state_dict(state, strict=True)
    card: dict[str, Any] = {
        "imported_from": {
            "path": str(path.resolve()),
            "sha256": sha256_file(path),
            "format": fmt,
            "k": k,
            "rates": dict(rates) if rates else None,
            "kept_fractions": kept,
            "dataset": dataset,
        },
    }
    return save_checkpoint(Path(out) / "model.safetensors", model, card)
