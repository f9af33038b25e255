"""Saving and rebuilding masks, and loading dense state dicts into masked models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advprune.errors import ConfigError
from advprune.sparsity.masks import attach_mask, mask_kind, masked_modules

_ORIGINAL = ".parametrizations.weight.original"


def mask_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: spec}`` for every masked layer; JSON-able, recorded in checkpoint cards."""
    return {name: mask.spec() for name, (_, mask) in masked_modules(model).items()}


def restore_masks(model: nn.Module, specs: Mapping[str, Mapping[str, Any]]) -> None:
    """Attach empty masks described by :func:`mask_specs`; ``load_state_dict`` then fills them."""
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        if name not in modules:
            raise ConfigError(f"mask for layer {name!r}, which the model does not have")
        module = modules[name]
        attach_mask(module, mask_kind(spec["kind"]).from_spec(module.weight, dict(spec)))


def to_masked_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a dense state dict's ``layer.weight`` keys to the masked model's keys.

    The masks' own tensors (scores, mask buffers) are taken from the model as it is, so a dense
    checkpoint loads with ``strict=True`` into a model whose masks are already attached.
    """
    out = dict(state)
    current = model.state_dict()
    for name in masked_modules(model):
        prefix = f"{name}." if name else ""
        dense_key = f"{prefix}weight"
        if dense_key in out:
            out[f"{prefix}{_ORIGINAL[1:]}"] = out.pop(dense_key)
            for key, value in current.items():
                if key.startswith(f"{prefix}parametrizations.weight.") and key not in out:
                    out[key] = value
    return out


def load_dense_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True
) -> Any:
    """Load a plain (dense) state dict into ``model``, masked or not."""
    return model.load_state_dict(to_masked_keys(model, state), strict=strict)
