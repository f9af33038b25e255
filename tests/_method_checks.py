"""Checks shared by the method tests: dense export, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from advprune.checkpoint import save_checkpoint
from advprune.errors import ConfigError
from advprune.models import ModelSpec


def export_into_plain(model: nn.Module, folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Export ``model`` (eval mode), load the file with ``strict=True`` into a fresh model of
    the card's architecture, check both give identical outputs; return ``(plain, card)``."""
    model.eval()
    path = save_checkpoint(folder / "exported.safetensors", model, export=True)
    card = json.loads(path.with_suffix(".json").read_text())
    plain = ModelSpec.from_dict(card["architecture"]).build()
    plain.load_state_dict(load_file(str(path)), strict=True)
    plain.eval()
    x = torch.rand(16, *plain.spec.input_size)
    # exact by construction: the exported weight is the masked weight the model computes, so
    # both run the same layers on the same values
    assert torch.equal(plain(x), model(x))
    assert not card["masks"] and card["sparsity"]["exported"]
    return plain, card


def fails_in_one_line(make: Callable[[], Any], *words: str) -> str:
    """``make()`` raises a one-line :class:`ConfigError` naming every word; return it."""
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message
