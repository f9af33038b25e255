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
    with pytest.raises(CheckpointError, match=r"import it with --format hydra$"):
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
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a torch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors is not a readable"):
        read_state_dict(tmp_path / "junk.safetensors")
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


# --- issue 12: checkpoints laid out as HYDRA's / HARP's own code writes them -------------------
# HYDRA (inspire-group/hydra) and HARP (intellisec/harp) save
# {"epoch", "arch", "state_dict": model.state_dict(), "best_prec1", "optimizer"}
# (utils/logging.py save_checkpoint via train.py). Their SubnetConv / SubnetLinear hold
# X.weight, X.popup_scores (float32, the weight's shape) and, in HARP, X.k_score (a float32
# scalar Parameter, torch.Size([]); initialised to 1.0). HARP's rate_init_func turns the numpy
# float64 shortcut rates of parse_prune_stg (np.take) into float64 k_score on shortcut layers.


def cli_import(path, fmt: str, arch: str, out, *flags: str) -> int:
    """``advprune import PATH --format FMT --arch ARCH --out OUT FLAGS...``; its exit status."""
    return main(["import", str(path), "--format", fmt, "--arch", arch, "--out", str(out), *flags])


def reference_checkpoint(state, arch_field, prec=51.2):
    """The payload of the references' save_checkpoint (train.py)."""
    return {
        "epoch": 20,
        "arch": arch_field,
        "state_dict": state,
        "best_prec1": torch.tensor(prec),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
    }


def harp_layout(arch, k_scores, seed=0, **kwargs):
    """A HARP subnet state dict: distinct |popup_scores| per layer, one k_score per layer,
    float64 on shortcut layers (as HARP's rate initialisation leaves them)."""
    model, state, layers = subnet_state(arch, seed=seed, **kwargs)
    for layer, s in zip(layers, k_scores):
        dtype = torch.float64 if "shortcut" in layer else torch.float32
        state[f"{layer}.k_score"] = torch.tensor(s, dtype=dtype)
    return model, state, layers


def harp_kept(weight, k_score, k_min):
    """Kept weights of a HARP layer by hand: rate in k_score's dtype, int((1 - rate) * numel)
    pruned (HARP's rate_act_func and GetSubnet)."""
    rate = torch.sigmoid(k_score) * (1 - k_min) + k_min
    return weight.numel() - int((1 - rate) * weight.numel())


def test_harp_alpha_is_given_and_recorded(tmp_path, capsys):
    """Point 1: HARP's k_min = k * alpha, alpha a training flag the file does not store."""
    torch.manual_seed(7)
    model = create("resnet18")
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    k_scores = (torch.rand(len(layers)) * 4 - 3).tolist()  # trained rates in (0.05, 0.73)
    _, state, layers = harp_layout("resnet18", k_scores, seed=7)
    assert state["layer2.0.shortcut.0.k_score"].dtype == torch.float64
    torch.save(reference_checkpoint(state, "resnet18"), tmp_path / "checkpoint.pth.tar")
    path = import_checkpoint(
        tmp_path / "checkpoint.pth.tar", "harp", "resnet18", k=0.1, alpha=0.2, out=tmp_path / "o"
    )
    new, card = load_checkpoint(path)
    src = card["imported_from"]
    assert src["alpha"] == 0.2 and src["k_min"] == 0.1 * 0.2
    new_state = new.state_dict()
    for layer in layers:
        w = state[f"{layer}.weight"]
        kept = harp_kept(w, state[f"{layer}.k_score"], 0.1 * 0.2)
        assert src["layers"][layer]["kept"] == kept / w.numel(), layer
        mask = top_mask(state[f"{layer}.popup_scores"], kept)
        assert torch.equal(new_state[f"{layer}.weight"], w * mask), layer
    # HARP's default alpha (0.1) gives another model: the flag matters
    small, _ = harp_state(6, [-3.0, -2.0, -1.0, 0.0, 1.0])
    default = read_card(small_import(tmp_path, small, fmt="harp", k=0.1, name="a1.pt"))
    other = read_card(small_import(tmp_path, small, fmt="harp", k=0.1, alpha=0.2, name="a2.pt"))
    assert (
        default["imported_from"]["alpha"] == 0.1 and default["imported_from"]["k_min"] == 0.1 * 0.1
    )
    assert default["sparsity"]["measured"] != other["sparsity"]["measured"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"alpha .* in \[0, 1\]"):
            small_import(tmp_path, state, fmt="harp", k=0.1, alpha=bad)
    with pytest.raises(ConfigError, match="--alpha applies to --format harp"):
        small_import(tmp_path, subnet_state(width=4)[1], fmt="hydra", k=0.1, alpha=0.2)
    assert main(["import", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--alpha" in help_text and "k_min = k * alpha" in help_text
    assert "default 0.1, HARP's" in help_text


def harp_pretrain_state(seed=0):
    """HARP's pretrain stage: popup_scores and k_score frozen at their initial values
    (kaiming-uniform scores, k_score 1.0); its forward pass uses k = 1 (every weight)."""
    torch.manual_seed(seed)
    model = create("digits_cnn", width=4)
    state = model.state_dict()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        scores = torch.empty_like(state[f"{layer}.weight"])
        nn.init.kaiming_uniform_(scores, a=5**0.5)
        state[f"{layer}.popup_scores"] = scores
        state[f"{layer}.k_score"] = torch.tensor(1.0)
    return model.eval(), state, layers


def test_harp_pretrain_stage_is_said_never_guessed(tmp_path):
    """Point 2: a HARP pretrain file cannot say its stage; --stage pretrain imports it dense."""
    model, state, _ = harp_pretrain_state()
    torch.save(reference_checkpoint(state, "digits_cnn"), tmp_path / "pre.pt")
    with pytest.raises(CheckpointError, match="--stage pretrain") as info:
        import_checkpoint(
            tmp_path / "pre.pt", "harp", "digits_cnn", width=4, k=0.1, out=tmp_path / "x"
        )
    msg = str(info.value)
    assert "every k_score is 1.0" in msg and "--stage prune" in msg and "\n" not in msg
    path = import_checkpoint(
        tmp_path / "pre.pt", "harp", "digits_cnn", width=4, stage="pretrain", out=tmp_path / "o"
    )
    imported, card = load_checkpoint(path)
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(imported.eval()(x), model(x))  # the dense model HARP trained
    assert card["sparsity"]["measured"] == 0.0
    assert card["imported_from"]["stage"] == "pretrain"
    assert all(r["rate"] == 1.0 for r in card["imported_from"]["layers"].values())
    # a pretrain file's k_score are never trained: differing ones are not from that stage
    trained = {**state, "features.3.k_score": torch.tensor(-1.5)}
    with pytest.raises(CheckpointError, match="not from HARP's pretrain stage"):
        small_import(tmp_path, trained, fmt="harp", stage="pretrain", name="t.pt")
    with pytest.raises(ConfigError, match="--k does not apply to --stage pretrain"):
        small_import(tmp_path, state, fmt="harp", stage="pretrain", k=0.1, name="p.pt")
    # the user says the stage: a score-only prune run keeps k_score at 1.0 too
    card = read_card(small_import(tmp_path, state, fmt="harp", stage="prune", k=0.1, name="q.pt"))
    assert card["imported_from"]["stage"] == "prune"
    assert card["sparsity"]["measured"] > 0.2
    with pytest.raises(ConfigError, match="--stage applies to --format harp"):
        small_import(tmp_path, state, fmt="hydra", stage="pretrain", k=1.0, name="h.pt")
    # the other formats point at harp, never at each other
    for fmt in ("dense", "hydra"):
        with pytest.raises(CheckpointError) as info:
            small_import(tmp_path, state, fmt=fmt, k=0.1 if fmt == "hydra" else None)
        assert "--format harp" in str(info.value) and "hydra or harp" not in str(info.value)


def harp_dense_checkpoint(state, k):
    """HARP's save_checkpoint(save_dense=True) payload: subnet_to_dense(state_dict, args.k)
    drops popup_scores and folds every layer with the global k; k_score stays."""
    dense = {n: v for n, v in state.items() if not n.endswith("popup_scores")}
    for name, scores in state.items():
        if name.endswith("popup_scores"):
            layer = name[: -len(".popup_scores")]
            kept = scores.numel() - int((1 - k) * scores.numel())
            dense[f"{layer}.weight"] = state[f"{layer}.weight"] * top_mask(scores, kept)
    return reference_checkpoint(dense, "digits_cnn")


def test_harp_checkpoint_dense_is_refused_once_with_the_next_step(tmp_path):
    """Point 3: HARP's checkpoint_dense.pth.tar is folded with the global k, not the rates."""
    state, _ = harp_state(4, [0.0, -3.0, -1.0, 1.0, 3.0])
    torch.save(harp_dense_checkpoint(state, 0.1), tmp_path / "checkpoint_dense.pth.tar")
    messages = set()
    for fmt in ("dense", "hydra", "harp"):
        with pytest.raises(CheckpointError) as info:
            import_checkpoint(
                tmp_path / "checkpoint_dense.pth.tar",
                fmt,
                "digits_cnn",
                width=4,
                k=None if fmt == "dense" else 0.1,
                out=tmp_path / fmt,
            )
        messages.add(str(info.value))
    assert len(messages) == 1  # the same refusal whatever the format: no loop
    msg = messages.pop()
    assert "HARP's dense export" in msg and "global k" in msg and "per-layer" in msg
    assert msg.endswith(
        "import that run's checkpoint.pth.tar (or model_best.pth.tar) with --format harp"
    )
    assert not any(tmp_path.glob("dense*")) and not (tmp_path / "harp").exists()


def test_missing_popup_scores_are_named_before_unexpected_keys(tmp_path):
    """Point 4: a HARP layer without popup_scores is named as such, not as a stray k_score."""
    state, _ = harp_state(5, [0.0, -3.0, -1.0, 1.0, 3.0])
    del state["features.3.popup_scores"]
    with pytest.raises(CheckpointError) as info:
        small_import(tmp_path, reference_checkpoint(state, "digits_cnn"), fmt="harp", k=0.1)
    msg = str(info.value)
    assert "1 conv / linear layers have no popup_scores: features.3" in msg
    assert "unexpected" not in msg and "k_score" not in msg


ANSI = "\x1b["


def test_torch_load_errors_are_one_clean_line(tmp_path):
    """Point 5: what torch.load(weights_only=True) refuses is said in one whole line."""
    torch.manual_seed(0)
    model = create("digits_cnn", width=4)
    torch.save(model, tmp_path / "whole.pt")  # a pickled whole model
    torch.save({"epoch": 3, "model": model}, tmp_path / "inside.pt")
    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])  # an interrupted download
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy_trunc.pt").write_bytes(legacy[: len(legacy) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"this is a text file, not a checkpoint\n")
    pickled = (
        "pickles Python objects (the first: class advprune.models.small.DigitsCNN), e.g. a whole "
        "model saved with torch.save(model) instead of its state dict; advprune reads tensors "
        "only (torch.load weights_only=True) and never unpickles objects from outside: where the "
        "model's code is, save model.state_dict() with torch.save and import that file"
    )
    truncated = (
        "is truncated or corrupt (torch cannot read it to the end): copy or download the "
        "checkpoint again"
    )
    expect = {  # the whole message: nothing cut, no escape codes, one line
        "whole.pt": pickled,
        "inside.pt": pickled,
        "trunc.pt": truncated,
        "legacy_trunc.pt": truncated,
        "empty.pt": "is empty: copy or download the checkpoint again",
        "text.pt": "is not a torch checkpoint (neither torch.save's zip archive nor its legacy "
        "format): advprune expects a state dict saved with torch.save, or a .safetensors file",
    }
    for name, text in expect.items():
        with pytest.raises(CheckpointError) as info:
            read_state_dict(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name} {text}"
        assert ANSI not in str(info.value) and "\n" not in str(info.value)
    # the same through the CLI: one error line
    assert cli_import(tmp_path / "whole.pt", "dense", "digits_cnn", tmp_path / "o") == 2


def hydra_wrn_sub_block1(model, scores: bool):
    """The keys of HYDRA's unused ``sub_block1``: a NetworkBlock of block1's widths (16 -> 16k,
    stride 1) built in WideResNet.__init__ and never called in forward. Its own random values."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("block1."):
            fresh = torch.randn_like(tensor) if tensor.is_floating_point() else tensor.clone()
            out["sub_block1." + name[len("block1.") :]] = fresh
    if scores:
        for name, module in model.block1.named_modules():
            if isinstance(module, nn.Conv2d):
                out[f"sub_block1.{name}.popup_scores"] = torch.randn_like(module.weight)
    return out


def test_hydra_wrn_28_4_ignores_exactly_the_unused_sub_block1(tmp_path, capsys):
    """Point 6: HYDRA's README architecture wrn_28_4 (WideResNet with sub_block1)."""
    model, state, _ = subnet_state("wrn28_4", seed=6)
    unused = hydra_wrn_sub_block1(model, scores=True)
    assert sum(not n.endswith("popup_scores") for n in unused) == 49  # as the issue counted
    torch.save(reference_checkpoint({**state, **unused}, "wrn_28_4"), tmp_path / "wrn.pth.tar")
    flags = ("--k", "0.1", "--dataset", "cifar10")
    code = cli_import(tmp_path / "wrn.pth.tar", "hydra", "wrn28_4", tmp_path / "o", *flags)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ignored 58 keys sub_block1.* (HYDRA's WideResNet builds this block" in out
    new, card = load_checkpoint(tmp_path / "o" / "model.safetensors")
    assert card["imported_from"]["ignored_keys"]["count"] == 58
    for layer in ("conv1", "block1.layer.0.convShortcut", "block3.layer.3.conv2", "fc"):
        w = state[f"{layer}.weight"]
        mask = top_mask(state[f"{layer}.popup_scores"], w.numel() - int(0.9 * w.numel()))
        assert torch.equal(new.state_dict()[f"{layer}.weight"], w * mask), layer
    assert not any(n.startswith("sub_block1") for n in card["imported_from"]["layers"])
    # anything beyond HYDRA's exact block is not ignored
    extra = {**state, **unused, "sub_block1.layer.4.conv1.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(CheckpointError, match=r"sub_block1.* not the unused copy of block1"):
        import_checkpoint(
            _save(tmp_path, extra, "e.pt"), "hydra", "wrn28_4", k=0.1, out=tmp_path / "e"
        )
    other = {**state, **unused, "sub_block2.layer.0.bn1.weight": torch.zeros(16)}
    with pytest.raises(CheckpointError, match=r"1 unexpected: sub_block2\.layer\.0\.bn1\.weight"):
        import_checkpoint(
            _save(tmp_path, other, "f.pt"), "hydra", "wrn28_4", k=0.1, out=tmp_path / "f"
        )
    # HYDRA's checkpoint_dense of the same network (subnet_to_dense: scores gone, sub_block1 kept)
    full = {**state, **hydra_wrn_sub_block1(model, False)}
    dense = {n: v for n, v in full.items() if not n.endswith("popup_scores")}
    saved = _save(tmp_path, reference_checkpoint(dense, "wrn_28_4"), "d.pt")
    card = read_card(import_checkpoint(saved, "dense", "wrn28_4", out=tmp_path / "d"))
    assert card["imported_from"]["ignored_keys"]["count"] == 49


def _save(tmp_path, obj, name):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


# HYDRA's cfgs["16"]: no pool after the last block
VGG16_CFG_REF = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def hydra_vgg16_state(seed=0):
    """HYDRA's BatchNorm-free ``vgg16`` state dict, written from its layout: features of
    SubnetConv(3x3, pad 1, bias=False) + ReLU per number and MaxPool per "M" (so conv indices
    0, 2, 5, 7, ...), classifier Linear(2048, 256), ReLU, Linear(256, 256), ReLU, Linear(256, C)."""
    torch.manual_seed(seed)
    state, index, channels = {}, 0, 3
    for v in VGG16_CFG_REF:
        if v == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(v, channels, 3, 3) * (2 / (9 * v)) ** 0.5
        index, channels = index + 2, v
    for i, (fan_in, fan_out) in enumerate([(2048, 256), (256, 256), (256, 10)]):
        state[f"classifier.{2 * i}.weight"] = torch.randn(fan_out, fan_in) * 0.05
        state[f"classifier.{2 * i}.bias"] = torch.randn(fan_out) * 0.05
    for name in [n for n in state if n.endswith(".weight")]:
        state[name.replace(".weight", ".popup_scores")] = torch.randn_like(state[name])
    return state


def hydra_vgg16_forward(state, x):
    """HYDRA's VGG.forward for the BN-free vgg16, written from its layout (F ops only)."""
    import torch.nn.functional as F

    index = 0
    for v in VGG16_CFG_REF:
        if v == "M":
            x, index = F.max_pool2d(x, 2), index + 1
        else:
            x, index = F.relu(F.conv2d(x, state[f"features.{index}.weight"], padding=1)), index + 2
    x = torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
    for i in range(3):
        x = F.linear(x, state[f"classifier.{2 * i}.weight"], state[f"classifier.{2 * i}.bias"])
        x = F.relu(x) if i < 2 else x
    return x


def test_hydra_bn_free_vgg16_is_a_model(tmp_path):
    """Point 6: HYDRA's ``vgg16`` (no BatchNorm) imports as advprune's vgg16_nobn, exactly."""
    state = hydra_vgg16_state()
    torch.save(reference_checkpoint(state, "vgg16"), tmp_path / "vgg.pth.tar")
    path = import_checkpoint(
        tmp_path / "vgg.pth.tar",
        "hydra",
        "vgg16_nobn",
        k=0.5,
        dataset="cifar10",
        out=tmp_path / "o",
    )
    imported, card = load_checkpoint(path)
    masked = {}
    for name, scores in state.items():
        if name.endswith("popup_scores"):
            w = state[name.replace("popup_scores", "weight")]
            masked[name.replace("popup_scores", "weight")] = w * top_mask(
                scores, w.numel() - int(0.5 * w.numel())
            )
        elif name.endswith("bias"):
            masked[name] = state[name]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        # the same float ops in the same order: equal up to the convolution backend's rounding
        torch.testing.assert_close(
            imported.eval()(x), hydra_vgg16_forward(masked, x), rtol=1e-5, atol=1e-6
        )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in imported.modules())
    assert imported.spec.name == "vgg16_nobn" and card["imported_from"]["arch_field"] == "vgg16"
    # the file's arch field names HYDRA's BN-free vgg16: advprune's vgg16 (with BN) is refused
    with pytest.raises(CheckpointError, match="--arch vgg16_nobn"):
        import_checkpoint(tmp_path / "vgg.pth.tar", "hydra", "vgg16", k=0.5, out=tmp_path / "x")


def test_arch_field_is_compared_with_arch(tmp_path):
    """Point 7: the references save ``arch``; a file for another network is refused by name."""
    _, state, _ = subnet_state(width=4)
    for field, phrase in [
        ("resnet18", "holds HYDRA / HARP's 'resnet18' (advprune's resnet18), not --arch "
                     "digits_cnn: give --arch resnet18"),
        ("vgg16_bn", "holds HYDRA / HARP's 'vgg16_bn' (advprune's vgg16)"),
        ("wrn_34_10", "HYDRA / HARP's 'wrn_34_10' has no advprune model"),
        ("my_net", "arch field 'my_net' is neither a HYDRA / HARP model name"),
    ]:  # fmt: skip
        with pytest.raises(CheckpointError) as info:
            small_import(tmp_path, reference_checkpoint(state, field), k=0.5)
        assert phrase in str(info.value), (field, str(info.value))
    # HYDRA / HARP's vgg16_bn is advprune's vgg16 (with BatchNorm), not their BN-free vgg16
    torch.save(reference_checkpoint(state, "vgg16_bn"), tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match=r"not --arch vgg16_nobn: give --arch vgg16$"):
        import_checkpoint(tmp_path / "v.pt", "hydra", "vgg16_nobn", k=0.5, out=tmp_path / "v")
    card = read_card(small_import(tmp_path, reference_checkpoint(state, "digits_cnn"), k=0.5))
    assert card["imported_from"]["arch_field"] == "digits_cnn"


def test_ties_at_the_cutoff_are_counted_and_reported(tmp_path, capsys):
    """Point 8: the references' sort is not stable; advprune says where that could matter."""
    _, state, layers = subnet_state(seed=8)  # digits_cnn, default width
    state["features.0.popup_scores"] = torch.full_like(state["features.0.weight"], -0.5)
    scores = state["features.3.popup_scores"].flatten().clone()
    numel = scores.numel()
    j = int(0.5 * numel)
    order = scores.abs().argsort()
    scores[order[j - 2 : j + 3]] = -scores.abs()[order[j]]  # five equal |scores| at the cutoff
    state["features.3.popup_scores"] = scores.reshape(state["features.3.weight"].shape)
    torch.save({"net": state}, tmp_path / "t.pt")
    flags = ("--k", "0.5", "--dataset", "digits")
    code = cli_import(tmp_path / "t.pt", "hydra", "digits_cnn", tmp_path / "o", *flags)
    out = capsys.readouterr().out
    assert code == 0
    card = read_card(tmp_path / "o" / "model.safetensors")
    recorded = card["imported_from"]["layers"]
    assert recorded["features.0"]["tied_at_cutoff"] == state["features.0.weight"].numel()
    assert recorded["features.3"]["tied_at_cutoff"] == 5
    assert all(recorded[n]["tied_at_cutoff"] == 0 for n in layers[2:])
    assert card["imported_from"]["ties_at_cutoff"] == {"features.0": 288, "features.3": 5}
    assert "ties at the pruning cutoff: 2 of 5 layers (features.0 288, features.3 5 scores" in out
    assert "lower flat index pruned first" in out
    # the stable rule: among the tied, the lower flat indices are pruned
    new = load_checkpoint(tmp_path / "o" / "model.safetensors")[0].state_dict()
    first = (new["features.0.weight"].flatten() != 0).float()
    assert first.tolist() == [0.0] * 144 + [1.0] * 144
    _, clean, _ = subnet_state(seed=9)
    torch.save({"net": clean}, tmp_path / "c.pt")
    assert cli_import(tmp_path / "c.pt", "hydra", "digits_cnn", tmp_path / "c", "--k", "0.5") == 0
    assert "ties at the pruning cutoff: none" in capsys.readouterr().out
