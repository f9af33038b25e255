"""Importers: HYDRA / HARP subnet checkpoints give exactly the reference masks; no unpickling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from advprune.bench.importers import import_checkpoint, read_state_dict, subnet_mask
from advprune.checkpoint import load_checkpoint, read_card, sha256_file
from advprune.cli import main
from advprune.errors import CheckpointError, ConfigError, UnknownNameError
from advprune.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"arch": "digits_cnn", "width": 4}


def subnet_state(arch: str = "digits_cnn", seed: int = 0, **kwargs):
    """A HYDRA-format state dict of an advprune model: every conv / linear layer gets
    popup_scores holding a random permutation of 1..numel with random signs (distinct |scores|,
    so the kept set is known)."""
    torch.manual_seed(seed)
    model = create(arch, **kwargs)
    state = model.state_dict()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        w = state[f"{layer}.weight"]
        perm = torch.randperm(w.numel()).float() + 1
        sign = torch.where(torch.rand(w.numel()) < 0.5, -1.0, 1.0)  # the references rank |s|
        state[f"{layer}.popup_scores"] = (perm * sign).reshape(w.shape)
    return model, state, layers


def top_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """1 at the ``kept`` largest |scores| (written independently of the importer's sort)."""
    mask = torch.zeros(scores.numel())
    mask[torch.topk(scores.abs().flatten(), kept).indices] = 1
    return mask.reshape(scores.shape)


def small_import(tmp_path, obj, fmt="hydra", name="src.pt", **kwargs):
    torch.save(obj, tmp_path / name)
    out = tmp_path / f"out_{name}"
    return import_checkpoint(tmp_path / name, fmt, SMALL["arch"], width=4, out=out, **kwargs)


@pytest.mark.parametrize("k", [0.1, 0.37, 1.0])
def test_hydra_known_scores_give_the_exact_mask(tmp_path, k):
    _, state, layers = subnet_state(width=4)
    path = small_import(tmp_path, {"state_dict": state}, k=k)
    imported, card = load_checkpoint(path)
    new = imported.state_dict()
    assert not any(n.endswith("popup_scores") for n in new)
    for layer in layers:
        w, scores = state[f"{layer}.weight"], state[f"{layer}.popup_scores"]
        kept = w.numel() - int((1 - k) * w.numel())
        mask = top_mask(scores, kept)
        assert torch.equal((new[f"{layer}.weight"] != 0).float(), mask), layer
        assert torch.equal(new[f"{layer}.weight"], w * mask), layer
        assert card["imported_from"]["layers"][layer]["kept"] == kept / w.numel()
    assert card["imported_from"]["format"] == "hydra" and card["imported_from"]["k"] == k
    assert card["imported_from"]["sha256"] == sha256_file(tmp_path / "src.pt")
    assert card["masks"] == {} and card["sparsity"]["exported"] is True
    # the file is a plain checkpoint: it loads into a fresh architecture with strict=True
    from safetensors.torch import load_file

    create("digits_cnn", width=4).load_state_dict(load_file(str(path)), strict=True)


def test_hydra_resnet18_layout_as_hydra_saves_it(tmp_path):
    _, state, layers = subnet_state("resnet18", seed=4)
    assert "layer2.0.shortcut.0" in layers and "linear" in layers
    saved = {  # HYDRA's utils/logging.py save_checkpoint payload
        "epoch": 20,
        "arch": "resnet18",
        "state_dict": state,
        "best_prec1": 51.2,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    torch.save(saved, tmp_path / "checkpoint.pth.tar")
    out = tmp_path / "o"
    path = import_checkpoint(
        tmp_path / "checkpoint.pth.tar", "hydra", "resnet18", k=0.05, dataset="cifar10", out=out
    )
    new, card = load_checkpoint(path)
    new_state = new.state_dict()
    for layer in layers:
        w = state[f"{layer}.weight"]
        kept = w.numel() - int(0.95 * w.numel())
        mask = top_mask(state[f"{layer}.popup_scores"], kept)
        assert torch.equal(new_state[f"{layer}.weight"], w * mask), layer
    assert card["sparsity"]["measured"] == pytest.approx(0.95, abs=1e-3)
    assert card["dataset"] == {"name": "cifar10", "num_classes": 10}


def test_ties_are_broken_by_a_stable_sort():
    mask = subnet_mask(torch.zeros(2, 5), 0.3)  # j = int(0.7 * 10) = 7 first indices pruned
    assert mask.flatten().tolist() == [0.0] * 7 + [1.0] * 3
    scores = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0])
    assert subnet_mask(scores, 0.4).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]  # j = 3
    assert subnet_mask(scores, 0.6).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]  # j = 2: 1, 2 first
    # float truncation as in the reference: int((1 - 0.8) * 5) = int(0.9999999999999998) = 0
    assert subnet_mask(scores, 0.8).tolist() == [1.0] * 5


WRAPS = {
    "state_dict": lambda s: {"state_dict": s, "epoch": 3, "arch": "digits_cnn"},
    "net": lambda s: {"net": s, "acc": 0.5},
    "model": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "nested": lambda s: {"model": {"state_dict": s}},
    "bare": lambda s: s,
    "module": lambda s: {f"module.{k}": v for k, v in s.items()},
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_wrappers_and_dense_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    model = create("digits_cnn", width=4).eval()
    path = small_import(tmp_path, WRAPS[wrap](model.state_dict()), fmt="dense")
    loaded, card = load_checkpoint(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))
    assert card["imported_from"]["format"] == "dense" and "layers" not in card["imported_from"]


def test_safetensors_state_dict(tmp_path):
    torch.manual_seed(2)
    model = create("digits_cnn", width=4).eval()
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    out = import_checkpoint(
        tmp_path / "m.safetensors", "dense", "digits_cnn", width=4, out=tmp_path / "o"
    )
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(load_checkpoint(out)[0].eval()(x), model(x))


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path):
    state = create("digits_cnn", width=4).state_dict()
    broken = dict(state)
    del broken["features.0.weight"]
    broken["extra.weight"] = torch.zeros(3)
    broken["classifier.2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as info:
        small_import(tmp_path, broken, fmt="dense")
    msg = str(info.value)
    assert "1 missing: features.0.weight" in msg and "1 unexpected: extra.weight" in msg
    assert "1 wrong shape: classifier.2.bias (7,) vs (10,)" in msg and "\n" not in msg
    # another architecture: many keys, listed as the first few plus a count
    with pytest.raises(CheckpointError, match=r"\d+ missing: conv1.weight, .*\(\+\d+ more\)"):
        import_checkpoint(tmp_path / "src.pt", "dense", "resnet18", out=tmp_path / "r")
    with pytest.raises(CheckpointError, match="wrong shape"):
        small_import(tmp_path, state, fmt="dense", name="w8.pt", num_classes=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt", "w8.pt"]  # nothing written


def test_subnet_errors(tmp_path):
    _, state, layers = subnet_state(width=4)
    with pytest.raises(ConfigError, match="KEPT fraction"):
        small_import(tmp_path, state)
    for bad_k in (0.0, 1.5, 90):
        with pytest.raises(ConfigError, match=r"KEPT fraction .* in \(0, 1\]"):
            small_import(tmp_path, state, k=bad_k)
    with pytest.raises(CheckpointError, match="--format hydra or harp"):
        small_import(tmp_path, state, fmt="dense")
    no_scores = {k: v for k, v in state.items() if k != "classifier.2.popup_scores"}
    with pytest.raises(CheckpointError, match="1 conv / linear layers have no popup_scores: class"):
        small_import(tmp_path, no_scores, k=0.5)
    with pytest.raises(CheckpointError, match="no popup_scores found"):
        small_import(tmp_path, create("digits_cnn", width=4).state_dict(), k=0.5)
    odd = {**state, "features.0.popup_scores": torch.ones(4)}
    with pytest.raises(CheckpointError, match=r"features.0.popup_scores has shape \(4,\)"):
        small_import(tmp_path, odd, k=0.5)
    stray = {**state, "features.0.mask": torch.ones(4, 1, 3, 3)}
    with pytest.raises(CheckpointError, match="neither weight, bias, popup_scores nor HARP's"):
        small_import(tmp_path, stray, k=0.5)
    harp = {**state, **{f"{layer}.k_score": torch.tensor(1.0) for layer in layers}}
    with pytest.raises(CheckpointError, match="--format harp"):
        small_import(tmp_path, harp, k=0.5)
    with pytest.raises(ConfigError, match="not dense"):
        small_import(tmp_path, create("digits_cnn", width=4).state_dict(), fmt="dense", k=0.5)
    with pytest.raises(ConfigError, match="unknown checkpoint format 'tf'"):
        small_import(tmp_path, state, fmt="tf", k=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]  # nothing written


def test_unknown_formats(tmp_path):
    for name, obj in [("list.pt", [1, 2, 3]), ("empty.pt", {}), ("mixed.pt", {"a": 1})]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="unknown checkpoint format") as info:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(info.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{]")
    for name in ("junk.pt", "junk.safetensors"):
        with pytest.raises(CheckpointError, match="unknown checkpoint format"):
            read_state_dict(tmp_path / name)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_state_dict(tmp_path / "absent.pt")


class Boom:
    """Unpickling this creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["inside", "top"])
def test_malicious_pickle_is_never_unpickled(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = Boom(str(marker))
    state = create("digits_cnn", width=4).state_dict()
    torch.save(
        {"state_dict": state, "evil": evil} if where == "inside" else evil, tmp_path / "x.pt"
    )
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_checkpoint(tmp_path / "x.pt", "dense", "digits_cnn", width=4, out=tmp_path / "o")
    assert not marker.exists() and not (tmp_path / "o").exists()
    # the marker works: an unrestricted load of the same file creates it
    loaded = torch.load(tmp_path / "x.pt", weights_only=False)
    (loaded["evil"] if where == "inside" else loaded).close()
    assert marker.exists()


def harp_state(seed: int, k_scores: list[float]):
    _, state, layers = subnet_state(width=4, seed=seed)
    assert len(layers) == 5
    for layer, s in zip(layers, k_scores):
        state[f"{layer}.k_score"] = torch.tensor(s)  # HARP: Parameter(torch.Size([]))
    return state, layers


def test_harp_rates_from_k_score(tmp_path):
    k_scores = [0.0, -3.0, -1.0, 1.0, 3.0]
    state, layers = harp_state(2, k_scores)
    path = small_import(tmp_path, {"state_dict": state}, fmt="harp", k=0.1)
    new, card = load_checkpoint(path)
    recorded = card["imported_from"]["layers"]
    assert card["imported_from"]["k_min"] == pytest.approx(0.01)
    # by hand: k_score 0 -> rate 0.5 * 0.99 + 0.01 = 0.505; features.0 has 36 weights,
    # int(0.495 * 36) = 17 pruned, 19 kept
    assert layers[0] == "features.0" and recorded["features.0"]["rate"] == pytest.approx(0.505)
    assert recorded["features.0"]["kept"] == 19 / 36
    for layer, s in zip(layers, k_scores):
        rate = torch.sigmoid(torch.tensor(s)) * (1 - 0.01) + 0.01  # float32, as in HARP
        w = state[f"{layer}.weight"]
        kept = w.numel() - int((1 - rate) * w.numel())
        assert recorded[layer]["kept"] == kept / w.numel()
        assert recorded[layer]["rate"] == pytest.approx(float(rate))
        mask = top_mask(state[f"{layer}.popup_scores"], kept)
        assert torch.equal(new.state_dict()[f"{layer}.weight"], w * mask), layer
    kept_fracs = [recorded[layer]["kept"] for layer in layers]
    assert len(set(kept_fracs)) == 5  # per-layer densities, not one global k


def test_harp_explicit_rates(tmp_path):
    state, layers = harp_state(3, [1.0] * 5)
    rates = dict(zip(layers, [0.5, 0.25, 0.125, 1.0, 0.75]))
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    out = small_import(tmp_path, state, fmt="harp", rates=tmp_path / "rates.json")
    recorded = read_card(out)["imported_from"]["layers"]
    for layer, rate in rates.items():
        numel = state[f"{layer}.weight"].numel()
        assert recorded[layer]["kept"] == (numel - int((1 - rate) * numel)) / numel
    with pytest.raises(ConfigError, match=r"1 missing: classifier\.2"):
        small_import(tmp_path, state, fmt="harp", rates={k: 0.5 for k in layers[:4]})
    with pytest.raises(ConfigError, match="1 unknown: conv9"):
        small_import(tmp_path, state, fmt="harp", rates={**rates, "conv9": 0.5})
    with pytest.raises(ConfigError, match="kept fraction in"):
        small_import(tmp_path, state, fmt="harp", rates={**rates, "features.0": 0})
    with pytest.raises(ConfigError, match="not both"):
        small_import(tmp_path, state, fmt="harp", rates=rates, k=0.1)
    no_rate = {k: v for k, v in state.items() if k != "features.3.k_score"}
    with pytest.raises(CheckpointError, match=r"1 HARP layers have no k_score: features\.3"):
        small_import(tmp_path, no_rate, fmt="harp", k=0.1)


def test_harp_channel_scores(tmp_path):
    torch.manual_seed(5)
    state = create("digits_cnn", width=4).state_dict()
    layers = ["features.0", "features.3", "features.7", "classifier.0", "classifier.2"]
    for layer in layers:
        w = state[f"{layer}.weight"]
        shape = (1, w.shape[1], *([1] * (w.dim() - 2)))  # HARP's finetune channel layout
        state[f"{layer}.popup_scores"] = (torch.randperm(w.shape[1]).float() + 1).reshape(shape)
        state[f"{layer}.k_score"] = torch.tensor(0.0)  # rate 0.505 at k = 0.1
    new = load_checkpoint(small_import(tmp_path, state, fmt="harp", k=0.1))[0].state_dict()
    for layer in layers:
        w, scores = state[f"{layer}.weight"], state[f"{layer}.popup_scores"].flatten()
        n_keep = round(0.505 * w.shape[1])
        kept = set(torch.topk(scores, n_keep).indices.tolist())
        alive = {c for c in range(w.shape[1]) if new[f"{layer}.weight"][:, c].abs().sum() > 0}
        assert alive == kept, layer
    bad = dict(state)
    bad["features.3.popup_scores"] = torch.ones(8, 1, 1, 1)  # HARP's prune-stage layout
    with pytest.raises(CheckpointError, match=r"shape \(8, 1, 1, 1\).*\(1, C_in, 1, 1\)"):
        small_import(tmp_path, bad, fmt="harp", k=0.1)


def test_classes_dataset_and_normalisation(tmp_path):
    _, state, _ = subnet_state(width=4, num_classes=100, in_channels=3)
    path = small_import(
        tmp_path, state, k=0.5, dataset="cifar100", mean=[0.5], std=[0.25], name="a.pt"
    )
    model, card = load_checkpoint(path)
    assert model.spec.num_classes == 100 and model.spec.in_channels == 3
    assert card["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert card["imported_from"]["normalization"] == "given"
    with pytest.raises(ConfigError, match="100 classes, not num_classes=10"):
        small_import(tmp_path, state, k=0.5, dataset="cifar100", num_classes=10, name="b.pt")
    with pytest.raises(UnknownNameError, match="unknown dataset 'mnist'"):
        small_import(tmp_path, state, k=0.5, dataset="mnist", name="c.pt")
    with pytest.raises(ConfigError, match="both mean and std"):
        small_import(tmp_path, state, k=0.5, mean=[0.5], name="d.pt")
    _, state10, _ = subnet_state(width=4)
    card = read_card(small_import(tmp_path, state10, k=0.5, name="e.pt"))
    assert card["normalization"] == {"mean": [0.0], "std": [1.0]}
    assert card["imported_from"]["normalization"].startswith("none (identity")


def test_cli(tmp_path, capsys):
    _, state, _ = subnet_state(seed=3)  # digits_cnn at its default width
    torch.save({"net": state}, tmp_path / "h.pt")
    code = main(["import", str(tmp_path / "h.pt"), "--format", "hydra", "--arch", "digits_cnn",
                 "--k", "0.05", "--dataset", "digits", "--mean", "0.3", "--std", "0.4",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "measured sparsity 0.95" in out
    model, card = load_checkpoint(tmp_path / "o" / "model.safetensors")
    assert card["imported_from"]["k"] == 0.05 and model.spec.mean == (0.3,)
    w = state["features.0.weight"]
    assert int((model.state_dict()["features.0.weight"] != 0).sum()) == w.numel() - int(
        0.95 * w.numel()
    )
    assert main(["import", "--help"]) == 0
    assert "KEPT fraction (1 - sparsity" in " ".join(capsys.readouterr().out.split())
    assert main(["import", str(tmp_path / "h.pt"), "--format", "zip", "--arch", "digits_cnn",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert "invalid choice: 'zip'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "h.pt"), "--format", "hydra", "--arch", "digits_cnn",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: --k (the KEPT fraction") and err.count("\n") == 1
    assert main(["import", str(tmp_path / "h.pt"), "--format", "hydra", "--arch", "digits_cnn",
                 "--dataset", "digits", "--num-classes", "10", "--out", "p"]) == 2  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
