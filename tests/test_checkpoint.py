"""Checkpoints: safetensors + JSON card, hashes, strict loading, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import advprune.io as ckpt  # save_file and sha256_file live in the io layer
from advprune.checkpoint import (
    card_path,
    load_checkpoint,
    load_state,
    load_weights,
    read_card,
    save_checkpoint,
    save_state,
)
from advprune.errors import CheckpointError
from advprune.models import create
from advprune.sparsity import attach_scores, prunable_layers, prune_magnitude

X = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def digits_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("digits_cnn", num_classes=10, mean=(0.3,), std=(0.4,), width=8).eval()


def test_masked_round_trip_identical_outputs_and_card(tmp_path) -> None:
    model = digits_model()
    prune_magnitude(model, 0.9)
    path = save_checkpoint(tmp_path / "m", model, {"dataset": {"name": "digits"}, "eps": "3/16"})
    assert path.name == "m.safetensors" and card_path(path).exists()
    loaded, card = load_checkpoint(path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert card["architecture"]["name"] == "digits_cnn"
    assert card["normalization"] == {"mean": [0.3], "std": [0.4]}
    assert card["input_shape"] == [1, 8, 8]
    assert card["eps"] == "3/16" and card["dataset"] == {"name": "digits"}
    assert card["tensors"]["sha256"] == ckpt.sha256_file(path)
    assert card["sparsity"]["measured"] == pytest.approx(0.9, abs=1e-3)
    assert all(d == pytest.approx(0.1, abs=1e-2) for d in card["sparsity"]["layers"].values())
    assert set(card["masks"]) == set(prunable_layers(model))
    assert card["advprune_version"]


def test_score_masks_survive_round_trip(tmp_path) -> None:
    model = digits_model()
    attach_scores(model, dict.fromkeys(prunable_layers(model), 0.3), init="uniform")
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s", model))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert any(n.endswith(".scores") for n, _ in loaded.named_parameters())


def test_export_loads_into_plain_architecture_strict(tmp_path) -> None:
    model = digits_model()
    prune_magnitude(model, 0.95, scope="global")
    path = save_checkpoint(tmp_path / "e", model, export=True)
    card = read_card(path)
    assert card["masks"] == {} and card["sparsity"]["exported"] is True
    # the per-layer densities are those of the pruned model (global: they differ per layer)
    densities = card["sparsity"]["layers"]
    assert len({round(v, 4) for v in densities.values()}) > 1
    from safetensors.torch import load_file

    plain = digits_model(seed=1)
    plain.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(X), model(X))
    # the model we saved from still has its masks
    assert card["sparsity"]["measured"] == pytest.approx(0.95, abs=1e-3)


def test_dense_checkpoint_loads_into_masked_model(tmp_path) -> None:
    dense = digits_model(seed=3)
    path = save_checkpoint(tmp_path / "d", dense)
    target = digits_model(seed=4)
    prune_magnitude(target, 0.5)
    load_weights(target, path)
    for name, module in prunable_layers(target).items():
        original = dict(dense.named_modules())[name].weight
        assert torch.equal(module.parametrizations.weight.original, original)


def corrupt(path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hash_mismatch_is_an_error(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c", digits_model())
    corrupt(path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_truncated_file_with_matching_card_hash_is_an_error(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "t", digits_model())
    path.write_bytes(path.read_bytes()[:100])
    card = json.loads(card_path(path).read_text())
    card["tensors"]["sha256"] = ckpt.sha256_file(path)
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "card .* is missing"),
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "not an advprune"),
    ],
)
def test_bad_cards(tmp_path, content, match) -> None:
    path = save_checkpoint(tmp_path / "b", digits_model())
    if content is None:
        card_path(path).unlink()
    else:
        card_path(path).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_tensor_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m", digits_model())
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_architecture_mismatch(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "a", digits_model())
    with pytest.raises(CheckpointError, match="not the expected 'resnet18'"):
        load_checkpoint(path, expect_arch="resnet18")
    card = json.loads(card_path(path).read_text())
    card["architecture"]["num_classes"] = 7  # tensors are for 10 classes
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="does not match architecture"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not 'resnet18'"):
        load_weights(create("resnet18"), path)


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch) -> None:
    model = digits_model()
    path = save_checkpoint(tmp_path / "keep", model)
    before = path.read_bytes(), card_path(path).read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "keep", digits_model(seed=9))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new", model)
    assert (path.read_bytes(), card_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "keep.safetensors"]


def test_training_state_round_trip(tmp_path) -> None:
    model = digits_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()
    state = {"epoch": 3, "optimizer": opt.state_dict(), "best": None, "hist": [1.5, "x"]}
    loaded = load_state(save_state(tmp_path / "last", state))
    assert loaded["epoch"] == 3 and loaded["best"] is None and loaded["hist"] == [1.5, "x"]
    assert set(loaded["optimizer"]["state"]) == set(opt.state_dict()["state"])  # int keys
    opt2 = torch.optim.SGD(digits_model().parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_card_without_hash_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "h", digits_model())
    card = json.loads(card_path(path).read_text())
    del card["tensors"]["sha256"]
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="records no sha256"):
        load_checkpoint(path)


def test_masks_for_unknown_layers_name_the_checkpoint(tmp_path) -> None:
    model = digits_model()
    prune_magnitude(model, 0.5)
    path = save_checkpoint(tmp_path / "u", model)
    card = json.loads(card_path(path).read_text())
    card["masks"]["no.such.layer"] = {"kind": "fixed", "granularity": "unstructured"}
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"u\.json.*no\.such\.layer"):
        load_checkpoint(path)


def test_method_mask_kinds_load_without_importing_the_methods(tmp_path) -> None:
    """A checkpoint with a plug-in's mask kind (HYDRA's) loads in a fresh process that only
    imports advprune.checkpoint (as `advprune export` / `info` do)."""
    import subprocess
    import sys

    from advprune.methods import create_method

    model = create("digits_cnn", width=4)
    create_method("hydra", 0.9).prune(model)
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    code = (
        "import sys; from advprune.checkpoint import load_checkpoint; "
        "m, card = load_checkpoint(sys.argv[1]); "
        "print(sorted({s['kind'] for s in card['masks'].values()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['hydra']"
