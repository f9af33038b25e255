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
    check_tensor_file,
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
    CompactRecord,
    build_compacted,
    compact,
    export_dense,
    layer_densities,
    load_compressed,
    load_dense_state_dict,
    mask_specs,
    restore_masks,
    save_compressed,
    sparse_state_dict,
    sparsity_report,
)
from advprune.sparsity.compressed import FORMAT as COMPRESSED
from advprune.sparsity.profiling import Profile, count_params, profile_model, sparsity_vs_base

FORMAT_VERSION = 1
STRUCTURED = ("filters", "channels")  # mask granularities compaction removes physically


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint's card without loading tensors."""
    return read_card_file(tensor_path(path))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    card: Mapping[str, Any] | None = None,
    *,
    export: bool = False,
    compressed: bool = False,
) -> Path:
    """Save ``model`` as ``path`` (``.safetensors``) plus its JSON card; return the tensor path.

    ``model`` must come from :func:`advprune.models.create` (it carries ``model.spec``).
    ``card`` adds caller fields (dataset, method, objective, eps, training, ...). With
    ``export=True`` the masks are folded into a copy of the model first, so the file loads into
    the plain architecture with ``strict=True``; the card still records the per-layer density.
    ``compressed=True`` (implies ``export``) stores the folded weights compressed
    (:func:`advprune.sparsity.save_compressed`: per tensor dense, bitmask or CSR, exact); the
    card's ``tensors.encoding`` says so and its sha256 covers the compressed file.
    """
    export = export or compressed
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
    if compressed:
        write_tensor_files(
            path, sparse_state_dict(model), full, writer=save_compressed, encoding=COMPRESSED
        )
    else:
        write_tensor_files(path, to_save.state_dict(), full)
    return path


def _read_tensors(path: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, plain or compressed, after the card's sha256 check."""
    encoding = (card.get("tensors") or {}).get("encoding")
    if encoding is None:
        return read_tensor_file(path, card)
    if encoding != COMPRESSED:
        raise CheckpointError(
            f"{card_path(path)}: unknown tensor encoding {encoding!r}; a newer advprune wrote "
            "it: upgrade advprune"
        )
    check_tensor_file(path, card)
    return load_compressed(path)


def _architecture(card: Mapping[str, Any], path: Path) -> nn.Module:
    """A fresh model of the card's architecture, resized to its compacted widths if any."""
    model = ModelSpec.from_dict(card.get("architecture") or {}).build()
    compaction = card.get("compaction")
    if compaction is not None:
        if not isinstance(compaction, Mapping) or not isinstance(compaction.get("widths"), Mapping):
            raise CheckpointError(f"{card_path(path)}: malformed compaction record (no widths)")
        model = build_compacted(model, compaction["widths"])
    return model


def load_checkpoint(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    expect_arch: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint saved by :func:`save_checkpoint`; return ``(model, card)``.

    The tensor file's sha256 is checked against the card, the architecture is rebuilt from the
    card (a compacted model: resized to the widths its card records, see
    :func:`compact_checkpoint`; Torch-Pruning is not needed), masks are re-attached, and the
    state dict (plain or compressed) is loaded with ``strict=True``. Any mismatch is a
    :class:`CheckpointError`, never a partly random model.
    """
    path = tensor_path(path)
    card = read_card_file(path)
    arch = card.get("architecture") or {}
    if expect_arch is not None and arch.get("name") != expect_arch:
        raise CheckpointError(
            f"{path} holds a {arch.get('name')!r} model, not the expected {expect_arch!r}"
        )
    tensors = _read_tensors(path, card)
    try:
        model = _architecture(card, path)
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
    if card.get("compaction"):
        raise CheckpointError(
            f"{path} holds a compacted (thinner) model; load it with load_checkpoint"
        )
    tensors = _read_tensors(path, card)
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


def _derived_card(src: str | Path, card: Mapping[str, Any], field: str) -> dict[str, Any]:
    """``card`` without its tensors, masks and date, plus ``field``: where it came from."""
    keep = {k: v for k, v in card.items() if k not in ("tensors", "masks", "created")}
    keep[field] = {
        "path": str(tensor_path(src)),
        "sha256": (card.get("tensors") or {}).get("sha256"),
    }
    return keep


def export_checkpoint(src: str | Path, dst: str | Path, *, compressed: bool = False) -> Path:
    """Write a pruned checkpoint ``src`` as a plain dense checkpoint ``dst``; return its path.

    The masks are folded into the weights (:func:`advprune.sparsity.export_dense`), so ``dst``
    loads into the plain architecture of the card (``ModelSpec.build()``, variants included;
    a compacted model: resized to its recorded widths) with ``strict=True`` and computes what
    ``src`` computed. The card keeps ``src``'s fields (method and its options, dataset,
    objective, eps, per-layer targets, compaction) and records the measured per-layer density
    (``sparsity.masked_layers``) and ``exported_from``. ``compressed=True`` stores the weights
    compressed (see :func:`save_checkpoint`); :func:`load_checkpoint` reads them back exactly.
    """
    model, card = load_checkpoint(src)
    keep = _derived_card(src, card, "exported_from")
    return save_checkpoint(dst, model, keep, export=True, compressed=compressed)


def structured_card(card: Mapping[str, Any]) -> bool:
    """Whether a card's model has whole filters / channels pruned: filters / channels masks,
    or (an exported model, masks folded) a method of that structure."""
    masks = card.get("masks") or {}
    if any(isinstance(s, Mapping) and s.get("granularity") in STRUCTURED for s in masks.values()):
        return True
    method = card.get("method")
    return not masks and isinstance(method, Mapping) and method.get("structure") in STRUCTURED


def compact_checkpoint(
    src: str | Path, dst: str | Path, *, round_to: int | None = None
) -> tuple[Path, CompactRecord]:
    """Physically remove the pruned filters / channels of checkpoint ``src``; save ``dst``.

    :func:`advprune.sparsity.compact` (Torch-Pruning's dependency graph; the compacted logits
    are checked against the masked model's) builds the thinner model; its card keeps ``src``'s
    fields and adds ``compaction``: every layer's new width (``widths``, from which
    :func:`load_checkpoint` rebuilds the model without Torch-Pruning), the per-layer record of
    what was removed and which masked units were kept and why (``layers``), the parameter
    counts, and the masked parent it came from (``compacted_from``: path and sha256). A
    checkpoint without filters / channels masks (or, exported, of a filters / channels method)
    is a one-line :class:`CheckpointError` (nothing to remove physically; ``export
    --compressed`` shrinks unstructured models).
    """
    model, card = load_checkpoint(src)
    if card.get("compaction"):
        raise CheckpointError(f"{src} is already compacted")
    if not structured_card(card):
        what = "only unstructured masks" if card.get("masks") else "no filters / channels masks"
        raise CheckpointError(
            f"{src} has {what}: nothing to remove physically (compaction removes whole "
            "filters / channels); for a smaller file use `advprune export --compressed`"
        )
    thin, record = compact(model, round_to=round_to)
    keep = _derived_card(src, card, "compacted_from")
    base_params, kept_params = count_params(model)
    keep["compaction"] = {
        "widths": record.widths(),
        "layers": record.to_dict()["layers"],
        "round_to": round_to,
        "params": {
            "base": base_params,
            "kept_in_parent": kept_params,
            "compacted": count_params(thin)[0],
        },
        "sparsity_vs_base": sparsity_vs_base(thin),
    }
    path = save_checkpoint(dst, thin, keep)
    return path, record


def profile_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    card: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Profile:
    """:func:`advprune.sparsity.profile_model` of the checkpoint at ``path`` (loaded unless
    ``model`` and its ``card`` are given), with the checkpoint file's size on disk and, for a
    compacted checkpoint, the compacted model timed as it is. ``kwargs``: batch sizes,
    devices, threads, warm-up, repeats, channels-last."""
    path = tensor_path(path)
    if model is None or card is None:
        model, card = load_checkpoint(path)
    shape = tuple(card.get("input_shape") or model.spec.input_size)
    return profile_model(
        model,
        shape,
        compacted=bool(card.get("compaction")),
        structured=structured_card(card),
        files={"checkpoint": path.stat().st_size},
        **kwargs,
    )
