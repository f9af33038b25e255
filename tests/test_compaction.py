"""Physical structured pruning: compacted models compute what the masked models compute.

Every test model gets random BatchNorm statistics and affine parameters, so a filter its mask
removes still outputs a non-zero constant (the BatchNorm shift): a compaction that dropped
such a channel instead of folding its constant would fail these tests (planted below).
Logits are compared within :data:`LOGITS_RTOL` (1e-4 of the largest logit): removing channels
and folding constants only reorders float32 sums; the planted regressions show that one wrongly
removed channel or one skipped fold is far outside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from advprune.errors import CheckpointError
from advprune.models import create, list_models
from advprune.sparsity import FixedMask, attach_mask, compaction, is_masked
from advprune.sparsity.compaction import (
    LOGITS_RTOL,
    CompactionError,
    build_compacted,
    compact,
    logits_close,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# per architecture: create() keywords and the input side (smaller than the natural one where
# the architecture allows it, to keep the test fast)
SETTINGS: dict[str, tuple[dict, int | None]] = {
    "cnn7": ({"image_size": 8}, None),
    "vgg16_bn": ({"num_classes": 10}, 32),
    "wrn28_10": ({}, 16),
}


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Random BatchNorm statistics and affine parameters, and random biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _mask_all(model: nn.Module, granularity: str, gen: torch.Generator, keep: float = 0.5):
    for _, module in _layers(model):
        shape = module.weight.shape
        units = shape[0] if granularity == "filters" else shape[1]
        mask = (torch.rand(units, generator=gen) < keep).float()
        mask[0] = 1
        attach_mask(module, FixedMask(shape, granularity, mask))


def _model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    kwargs, side = SETTINGS.get(name, ({}, None))
    torch.manual_seed(seed)
    model = create(name, **kwargs).eval()
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    c, h, w = model.spec.input_size
    if side is not None:
        h = w = side
    return model, torch.rand(3, c, h, w, generator=torch.Generator().manual_seed(seed + 2))


def _check(model: nn.Module, thin: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ok, diff = logits_close(thin(x), model(x))
    assert ok, f"compacted logits differ by {diff}"
    return diff


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("granularity", ["filters", "channels"])
@pytest.mark.parametrize("name", list_models())
def test_compacted_equals_masked_on_every_architecture(name: str, granularity: str) -> None:
    model, x = _model(name)
    _mask_all(model, granularity, torch.Generator().manual_seed(3))
    probe = torch.rand(2, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    thin, record = compact(model, probe)
    # a batch the compaction never saw: folded constants do not depend on the inputs
    _check(model, thin, x)
    assert all(is_masked(m) for _, m in _layers(model)), "compact() changed the masked model"
    assert not any(is_masked(m) for _, m in _layers(thin))
    assert _params(thin) < _params(model)
    notes = " ".join(n for layer in record.layers for n in layer.notes)
    if granularity == "filters" and name in ("resnet50", "vgg16", "digits_cnn", "wrn28_4"):
        # constants reach linear layers and unpadded (1x1) convs: folded into their biases
        assert "folded into the bias" in notes
    if granularity == "filters" and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        # BatchNorm shifts read by padded convs: merged into carrier channels
        assert "merged into" in notes
    dim = "out" if granularity == "filters" else "in"
    for layer in record.layers:
        if layer.granularity is None:
            continue
        # every masked unit is either removed or reported as kept, with a reason
        removed = getattr(layer, f"{dim}_before") - getattr(layer, f"{dim}_after")
        assert removed == layer.masked - layer.kept_masked, layer
        assert sum(int(n.split(" ")[0]) for n in layer.notes if " masked " in n) == (
            layer.kept_masked
        )


@pytest.mark.parametrize(
    ("name", "variant"),
    [("resnet18", {"head": "conv-bn", "bn_affine": False}), ("vgg16", {"head": "conv"})],
)
@pytest.mark.parametrize("granularity", ["filters", "channels"])
def test_compacted_equals_masked_on_variants(name: str, variant: dict, granularity: str) -> None:
    torch.manual_seed(0)
    model = create(name, **variant).eval()
    gen = torch.Generator().manual_seed(1)
    _randomize_batchnorm(model, gen)
    _mask_all(model, granularity, gen)
    thin, _ = compact(model)
    _check(model, thin, torch.rand(3, 3, 32, 32, generator=gen))
    assert _params(thin) < _params(model)


def _stream_masks(model: nn.Module, masks: dict[str, range], granularity: str) -> None:
    modules = dict(model.named_modules())
    for name, removed in masks.items():
        module = modules[name]
        units = module.weight.shape[0 if granularity == "filters" else 1]
        mask = torch.ones(units)
        mask[list(removed)] = 0
        attach_mask(module, FixedMask(module.weight.shape, granularity, mask))


def test_residual_group_split_by_channel_masks_keeps_the_union() -> None:
    """The layer1 stream of ResNet-18 is read by four layers; only channels none reads go."""
    model, x = _model("resnet18")
    _stream_masks(
        model,
        {
            "layer1.0.conv1": range(0, 16),
            "layer1.1.conv1": range(8, 24),
            "layer2.0.conv1": range(0, 32),
            "layer2.0.shortcut.0": range(0, 32),
        },
        "channels",
    )
    thin, record = compact(model)
    _check(model, thin, x)
    rows = {r.name: r for r in record.layers}
    # channels 8..15 are read by nobody: removed from the stem, both blocks and their readers
    for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
        assert (rows[name].out_before, rows[name].out_after) == (64, 56)
    for name in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"):
        assert rows[name].in_after == 56
    first = rows["layer1.0.conv1"]
    assert (first.masked, first.kept_masked) == (16, 8)
    assert any("layer1.1.conv1" in note for note in first.notes), first.notes
    assert (rows["layer2.0.conv1"].masked, rows["layer2.0.conv1"].kept_masked) == (32, 24)


def test_residual_group_split_by_filter_masks_keeps_the_union() -> None:
    """Three layers write the layer1 stream; a channel goes only where all three drop it."""
    model, x = _model("resnet18")
    _stream_masks(
        model,
        {"conv1": range(0, 24), "layer1.0.conv2": range(0, 16), "layer1.1.conv2": range(8, 24)},
        "filters",
    )
    thin, record = compact(model)
    _check(model, thin, x)
    rows = {r.name: r for r in record.layers}
    stream = 64 - rows["conv1"].out_after
    # at most channels 8..15 are written by none of the three; constants that padded convs
    # read are merged into kept carrier channels, so at least one of the eight goes
    assert 1 <= stream <= 8
    assert rows["layer1.0.conv2"].out_after == rows["layer1.1.conv2"].out_after == 64 - stream
    conv1 = rows["conv1"]
    assert conv1.masked == 24 and conv1.kept_masked == 24 - stream
    assert any(
        "written by layer1.0.conv2" in n or "written by layer1.1.conv2" in n for n in conv1.notes
    ), conv1.notes


def test_round_to_keeps_multiples_and_stays_exact() -> None:
    model, x = _model("vgg16")
    _mask_all(model, "channels", torch.Generator().manual_seed(3), keep=0.3)
    thin, record = compact(model, round_to=8)
    _check(model, thin, x)
    for layer in record.layers:
        if layer.type == "Conv2d" and layer.out_after != layer.out_before:
            assert layer.out_after % 8 == 0, layer


# --- planted regressions: the tolerance is tight enough to see one channel's error ---------


def test_planted_one_wrongly_removed_channel_is_caught() -> None:
    model, x = _model("resnet18")
    _mask_all(model, "channels", torch.Generator().manual_seed(3))
    thin, _ = compact(model)
    _check(model, thin, x)
    with torch.no_grad():  # as if one input channel of one 3x3 conv had been removed
        thin.get_submodule("layer3.1.conv2").weight[:, 0] = 0
        ok, diff = logits_close(thin(x), model(x))
    assert not ok, f"zeroing one channel changed the logits by only {diff}"


def test_planted_skipped_constant_folding_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model("digits_cnn")
    _mask_all(model, "filters", torch.Generator().manual_seed(3))
    with pytest.raises(CompactionError, match="differs from the masked model"):
        monkeypatch.setattr(compaction, "_apply", lambda module, edit: None)
        compact(model)
    monkeypatch.undo()
    thin, _ = compact(model)
    _check(model, thin, x)


def test_tolerance_is_relative_to_the_logits() -> None:
    logits = torch.tensor([[100.0, -50.0]])
    assert logits_close(logits + 100.0 * LOGITS_RTOL * 0.9, logits)[0]
    assert not logits_close(logits + 100.0 * LOGITS_RTOL * 1.1, logits)[0]


# --- rebuilding from the widths record, without Torch-Pruning -------------------------------


LOADER = """
import json, sys
sys.modules["torch_pruning"] = None  # importing it now fails: loading must not need it
import torch
from safetensors.torch import load_file
from advprune.models import ModelSpec
from advprune.sparsity import build_compacted

folder = sys.argv[1]
meta = json.load(open(f"{folder}/card.json"))
model = build_compacted(ModelSpec.from_dict(meta["spec"]).build(), meta["widths"])
model.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)
model.eval()
x = load_file(f"{folder}/io.safetensors")
with torch.no_grad():
    diff = float((model(x["x"]) - x["y"]).abs().max())
print(json.dumps({"diff": diff, "tp": "torch_pruning" in sys.modules
                  and sys.modules["torch_pruning"] is not None}))
"""


@pytest.mark.parametrize("granularity", ["filters", "channels"])
def test_rebuilt_from_widths_without_torch_pruning(tmp_path: Path, granularity: str) -> None:
    model, x = _model("resnet18")
    _mask_all(model, granularity, torch.Generator().manual_seed(3))
    thin, record = compact(model)
    save_file(
        {k: v.contiguous() for k, v in thin.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    with torch.no_grad():
        save_file({"x": x, "y": thin(x)}, str(tmp_path / "io.safetensors"))
    card = {"spec": model.spec.to_dict(), "widths": record.widths()}
    (tmp_path / "card.json").write_text(json.dumps(card))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOADER), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the same modules in the same order on the same inputs: identical float operations
    assert result == {"diff": 0.0, "tp": False}


def test_build_compacted_refuses_widths_of_another_model() -> None:
    model, _ = _model("digits_cnn")
    _mask_all(model, "channels", torch.Generator().manual_seed(3))
    _, record = compact(model)
    widths = record.widths()
    with pytest.raises(CheckpointError, match=r"'features\.3' is recorded as 'Linear'"):
        build_compacted(create("digits_cnn"), {**widths, "features.3": widths["classifier.0"]})
    with pytest.raises(CheckpointError, match="'layer9' is not a conv"):
        build_compacted(create("digits_cnn"), {"layer9": {"type": "Conv2d"}})
    with pytest.raises(CheckpointError, match="malformed width"):
        build_compacted(create("digits_cnn"), {"features.0": {"type": "Conv2d", "in": 1}})
    rebuilt = build_compacted(create("digits_cnn"), widths)
    assert rebuilt.features[3].weight.shape == (
        widths["features.3"]["out"],
        widths["features.3"]["in"],
        3,
        3,
    )
    wrong = build_compacted(create("digits_cnn"), {})  # the dense architecture
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong.load_state_dict(rebuilt.state_dict(), strict=True)
