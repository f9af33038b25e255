"""Checkpoints: a safetensors file of tensors plus a JSON card.

``save_checkpoint("runs/x/model.safetensors", model, card)`` writes ``model.safetensors`` and
``model.json`` beside it. The card records the architecture (to rebuild the model), the input
shape and normalisation, the masks (to rebuild masked layers), the measured sparsity per
layer, whatever the caller adds (dataset, method, objective, eps, training config), the
advprune version, and the sha256 of the tensor file. Both files are written atomically
(temporary file, fsync, rename); nothing is ever unpickled.

Training state for resuming (optimizer buffers, RNG state) uses the same two-file format via
:func:`save_state` / :func:`load_state`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.errors import AdvpruneError, CheckpointError, ConfigError
from advprune.io import (  # noqa: F401  (atomic_path, write_json_atomic, ...: re-exported)
    FORMAT,
    atomic_path,
    card_path,
    load_state,
    package_version,
    read_card_file,
    read_tensor_file,
    save_state,
    sha256_file,
    tensor_path,
    write_json_atomic,
    write_tensor_files,
)
from advprune.models import ModelSpec, default_input_size
from advprune.sparsity import (
    export_dense,
    layer_densities,
    load_dense_state_dict,
    mask_specs,
    restore_masks,
    sparsity_report,
)

FORMAT_VERSION = 1


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint's card without loading tensors."""
    return read_card_file(tensor_path(path))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    card: Mapping[str, Any] | None = None,
    *,
    export: bool = False,
) -> Path:
    """Save ``model`` as ``path`` (``.safetensors``) plus its JSON card; return the tensor path.

    ``model`` must come from :func:`advprune.models.create` (it carries ``model.spec``).
    ``card`` adds caller fields (dataset, method, objective, eps, training, ...). With
    ``export=True`` the masks are folded into a copy of the model first, so the file loads into
    the plain architecture with ``strict=True``; the card still records the per-layer density.
    """
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("model has no `spec`; build models with advprune.models.create")
    path = tensor_path(path)
    densities = layer_densities(model)
    masks = mask_specs(model)
    to_save = model
    if export and masks:
        to_save = export_dense(copy.deepcopy(model))
        masks = {}
    input_shape = list(default_input_size(spec.name, spec.in_channels))
    if card and card.get("input_shape"):
        input_shape = list(card["input_shape"])
    report = sparsity_report(to_save, tuple(input_shape))
    full: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "advprune_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": spec.to_dict(),
        "input_shape": input_shape,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
    }
    full.update(dict(card or {}))
    full["input_shape"] = input_shape
    full["sparsity"] = {
        **dict(full.get("sparsity") or {}),
        "measured": report.sparsity,
        "layers": {r.name: r.density for r in report.layers},
        "masked_layers": densities,
        "exported": bool(export),
    }
    full["masks"] = masks
    write_tensor_files(path, to_save.state_dict(), full)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    expect_arch: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint saved by :func:`save_checkpoint`; return ``(model, card)``.

    The tensor file's sha256 is checked against the card, the architecture is rebuilt from the
    card, masks are re-attached, and the state dict is loaded with ``strict=True``. Any
    mismatch is a :class:`CheckpointError`, never a partly random model.
    """
    path = tensor_path(path)
    card = read_card_file(path)
    arch = card.get("architecture") or {}
    if expect_arch is not None and arch.get("name") != expect_arch:
        raise CheckpointError(
            f"{path} holds a {arch.get('name')!r} model, not the expected {expect_arch!r}"
        )
    tensors = read_tensor_file(path, card)
    try:
        model = ModelSpec.from_dict(arch).build()
        restore_masks(model, card.get("masks") or {})
    except (KeyError, TypeError, AdvpruneError) as exc:
        raise CheckpointError(f"{card_path(path)}: bad architecture or masks ({exc})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"{path} does not match architecture {arch.get('name')!r}: {detail[:300]}"
        ) from None
    return model.to(map_location), card


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into an existing ``model`` (masked or not); return its card.

    A dense checkpoint loads into a model whose masks are already attached. Raises
    :class:`CheckpointError` when the architectures differ.
    """
    path = tensor_path(path)
    card = read_card_file(path)
    spec = getattr(model, "spec", None)
    arch = card.get("architecture") or {}
    if spec is not None and arch.get("name") not in (None, spec.name):
        raise CheckpointError(f"{path} holds a {arch.get('name')!r} model, not {spec.name!r}")
    tensors = read_tensor_file(path, card)
    if card.get("masks"):
        raise CheckpointError(
            f"{path} holds a masked model; load it with load_checkpoint or export it first"
        )
    try:
        load_dense_state_dict(model, tensors, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:3])
        raise CheckpointError(f"{path} does not fit this model: {detail[:300]}") from None
    return card


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write a pruned checkpoint ``src`` as a plain dense checkpoint ``dst``; return its path.

    The masks are folded into the weights (:func:`advprune.sparsity.export_dense`), so ``dst``
    loads into the plain architecture of the card (``ModelSpec.build()``, variants included)
    with ``strict=True`` and computes what ``src`` computed. The card keeps ``src``'s fields
    (method and its options, dataset, objective, eps, per-layer targets) and records the
    measured per-layer density (``sparsity.masked_layers``) and ``exported_from``.
    """
    model, card = load_checkpoint(src)
    keep = {k: v for k, v in card.items() if k not in ("tensors", "masks", "created")}
    keep["exported_from"] = {
        "path": str(tensor_path(src)),
        "sha256": (card.get("tensors") or {}).get("sha256"),
    }
    return save_checkpoint(dst, model, keep, export=True)
