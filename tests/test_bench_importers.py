"""Importers: HYDRA / HARP subnet checkpoints give exactly the reference masks; no unpickling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advprune.bench.importers import import_checkpoint, read_state_dict
from advprune.checkpoint import load_checkpoint, read_card, sha256_file
from advprune.cli import main
from advprune.errors import CheckpointError, ConfigError
from advprune.models import create

pytestmark = pytest.mark.usefixtures("one_thread")


def subnet_state(seed: int = 0):
    """A HYDRA-format resnet18 state dict: every conv / linear gets popup_scores holding a
    random permutation of 1..numel (distinct, so the kept set is known)."""
    torch.manual_seed(seed)
    model = create("resnet18")
    state = model.state_dict()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        w = state[f"{layer}.weight"]
        perm = torch.randperm(w.numel()).float() + 1
        sign = torch.where(torch.rand(w.numel()) < 0.5, -1.0, 1.0)  # HYDRA ranks |scores|
        state[f"{layer}.popup_scores"] = (perm * sign).reshape(w.shape)
    return model, state, layers


def expected_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the numel - int((1 - k) numel) largest |scores| (written independently)."""
    drop = int((1 - k) * scores.numel())
    ranks = scores.abs().flatten().argsort().argsort()  # rank 0 = smallest
    return (ranks >= drop).reshape(scores.shape).float()


def test_hydra_known_scores_give_the_exact_mask(tmp_path):
    _model, state, layers = subnet_state()
    src = tmp_path / "hydra.pth.tar"
    torch.save({"epoch": 100, "state_dict": state, "best_prec1": torch.tensor(0.5)}, src)
    path = import_checkpoint(src, "hydra", "resnet18", k=0.1, dataset="cifar10", out=tmp_path / "o")
    imported, card = load_checkpoint(path)
    new = imported.state_dict()
    for layer in layers:
        w, scores = state[f"{layer}.weight"], state[f"{layer}.popup_scores"]
        mask = expected_mask(scores, 0.1)
        assert torch.equal(new[f"{layer}.weight"], w * mask), layer
        assert int(mask.sum()) == w.numel() - int(0.9 * w.numel())
    assert card["imported_from"]["sha256"] == sha256_file(src)
    assert card["imported_from"]["format"] == "hydra" and card["imported_from"]["k"] == 0.1
    assert card["sparsity"]["measured"] == pytest.approx(0.9, abs=0.001)


@pytest.mark.parametrize("wrap", ["state_dict", "net", "model", "bare", "module"])
def test_wrappers_and_dense_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    model = create("digits_cnn", width=4).eval()
    state = model.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = state if wrap == "bare" else {wrap: state, "epoch": torch.tensor(3)}
    torch.save(obj, tmp_path / "dense.pt")
    path = import_checkpoint(tmp_path / "dense.pt", "dense", "digits_cnn", width=4, out=tmp_path)
    loaded, _ = load_checkpoint(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))


def test_key_and_shape_errors_list_the_keys(tmp_path):
    state = create("digits_cnn", width=4).state_dict()
    broken = dict(state)
    first = next(iter(broken))
    del broken[first]
    broken["extra.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=rf"1 missing: {first}; 1 unexpected: extra.weight"):
        import_checkpoint(tmp_path / "a.pt", "dense", "digits_cnn", width=4, out=tmp_path / "o")
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="shape"):
        import_checkpoint(tmp_path / "b.pt", "dense", "digits_cnn", width=8, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="unknown checkpoint format 'tf'"):
        import_checkpoint(tmp_path / "b.pt", "tf", "digits_cnn", out=tmp_path / "o")
    torch.save([1, 2, 3], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "c.pt")
    _, sub, _ = subnet_state()
    torch.save(sub, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="--format hydra"):
        import_checkpoint(tmp_path / "d.pt", "dense", "resnet18", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="KEPT fraction"):
        import_checkpoint(tmp_path / "d.pt", "hydra", "resnet18", out=tmp_path / "o")


class Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Boom(str(marker))}, tmp_path / "x.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        import_checkpoint(tmp_path / "x.pt", "dense", "digits_cnn", out=tmp_path / "o")
    assert not marker.exists()


def test_harp_rates_from_k_score(tmp_path):
    _model, state, layers = subnet_state(2)
    k_target = 0.05
    scores = {layer: torch.tensor(float(i % 5) - 2.0) for i, layer in enumerate(layers)}
    for layer, s in scores.items():
        state[f"{layer}.k_score"] = s
    torch.save({"state_dict": state}, tmp_path / "harp.pt")
    path = import_checkpoint(tmp_path / "harp.pt", "harp", "resnet18", k=k_target, out=tmp_path)
    card = read_card(path)
    kept = card["imported_from"]["kept_fractions"]
    new = load_checkpoint(path)[0].state_dict()
    for layer, s in scores.items():
        k_min = k_target * 0.1
        rate = torch.sigmoid(s) * (1 - k_min) + k_min  # HARP's rate_act_func, float32
        w = state[f"{layer}.weight"]
        drop = int((1 - rate) * w.numel())
        assert kept[layer] == pytest.approx((w.numel() - drop) / w.numel())
        mask = expected_mask(state[f"{layer}.popup_scores"], 1 - drop / w.numel())
        assert torch.equal(new[f"{layer}.weight"], w * mask), layer
    # explicit per-layer kept fractions
    rates = {layer: 0.25 for layer in layers}
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    out = import_checkpoint(tmp_path / "harp.pt", "harp", "resnet18", rates=tmp_path / "rates.json",
                            out=tmp_path / "r")  # fmt: skip
    assert read_card(out)["sparsity"]["measured"] == pytest.approx(0.75, abs=0.001)


def test_cli(tmp_path, capsys):
    _, state, _ = subnet_state(3)
    torch.save({"net": state}, tmp_path / "h.pt")
    code = main(["import", str(tmp_path / "h.pt"), "--format", "hydra", "--arch", "resnet18",
                 "--k", "0.05", "--dataset", "cifar10", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 0 and "measured sparsity 0.95" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "h.pt"), "--format", "zip", "--arch", "resnet18",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert capsys.readouterr().err.startswith("error: unknown checkpoint format")
