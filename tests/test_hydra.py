"""HYDRA: scaled init equals the LWM mask, frozen parameters stay bit-identical per stage,
structured masks remove whole units, and the CLI trains scores end to end on digits."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from advprune.checkpoint import load_checkpoint
from advprune.cli import main
from advprune.errors import ConfigError
from advprune.methods import HydraMask, create_method
from advprune.methods.hydra import scaled_scores
from advprune.models import create
from advprune.sparsity import dense_weight, masked_modules, sparsity_report
from advprune.training import list_objectives

TINY = ["--attack-steps", "1", "--eval-steps", "2", "--n", "40", "--no-progress"]


def _pair(width: int = 8) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = create("digits_cnn", width=width)
    b = create("digits_cnn", width=width)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize(
    "structure,sparsity,allocation",
    [
        ("unstructured", 0.5, "uniform"),
        ("unstructured", 0.9, "uniform"),
        ("unstructured", 0.99, "uniform"),
        ("unstructured", 0.95, "erk"),
        ("unstructured", 0.95, "lamp"),
        ("filters", 0.5, "uniform"),
        ("filters", 0.75, "np"),
        ("channels", 0.5, "uniform"),
        ("channels", 0.75, "uniform"),
    ],
)
def test_scaled_init_gives_exactly_the_lwm_mask(structure, sparsity, allocation) -> None:
    lwm_model, hydra_model = _pair(width=16)
    kw = {"structure": structure, "allocation": allocation}
    d_lwm = create_method("lwm", sparsity, **kw).prune(lwm_model)
    d_hydra = create_method("hydra", sparsity, **kw).prune(hydra_model)
    assert d_lwm == d_hydra
    lwm_masks, hydra_masks = masked_modules(lwm_model), masked_modules(hydra_model)
    assert list(lwm_masks) == list(hydra_masks)
    for name, (_, mask) in hydra_masks.items():
        assert isinstance(mask, HydraMask)
        assert torch.equal(mask.full_mask(), lwm_masks[name][1].full_mask()), name


def test_scaled_init_formula() -> None:
    w = torch.tensor([[[[0.5, -2.0], [1.0, 0.0]]], [[[4.0, 1.0], [-1.0, 3.0]]]])  # (2, 1, 2, 2)
    s = scaled_scores(w)
    assert torch.allclose(s, math.sqrt(6 / 4) * w / 4.0)
    assert torch.equal(scaled_scores(torch.zeros(3, 3)), torch.zeros(3, 3))


def test_structured_masks_remove_whole_units_and_scores_get_gradients() -> None:
    torch.manual_seed(1)
    for structure, dim in (("filters", 0), ("channels", 1)):
        model = create("digits_cnn", width=8)
        create_method("hydra", 0.75, structure=structure).prune(model)
        with torch.no_grad():  # scores that no longer follow the weights
            for _, mask in masked_modules(model).values():
                mask.scores.normal_()
        model(torch.rand(4, 1, 8, 8)).square().sum().backward()
        for name, (_, mask) in masked_modules(model).items():
            full = mask.full_mask()
            per_unit = full.transpose(0, dim).flatten(1)
            assert bool(((per_unit == 0).all(1) | (per_unit == 1).all(1)).all()), name
            n = per_unit.shape[0]
            kept = int(per_unit[:, 0].sum())
            assert kept == round(float(mask.target_density) * n) and abs(kept - n / 4) <= 1, name
            assert mask.scores.grad is not None and mask.scores.grad.abs().sum() > 0


def test_freeze_bn_and_bad_options() -> None:
    assert create_method("hydra", 0.9).trainable("prune") == ("scores", "bn")
    assert create_method("hydra", 0.9, freeze_bn=True).trainable("prune") == ("scores",)
    assert create_method("hydra", 0.9).trainable("finetune") == ("weights", "bn")
    assert create_method("hydra", 0.9).needs_pretrained
    with pytest.raises(ConfigError, match="freeze_bn must be true or false"):
        create_method("hydra", 0.9, freeze_bn="yes")
    with pytest.raises(ConfigError, match="score_init must be one of"):
        create_method("hydra", 0.9, score_init="zeros")
    with pytest.raises(ConfigError, match="does not support scope 'global'"):
        create_method("hydra", 0.9, scope="global")


def _run(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue() + err.getvalue()


def _params(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters by kind: conv/linear weights and biases, BatchNorm affine, mask scores."""
    kinds: dict[str, dict[str, torch.Tensor]] = {"weights": {}, "bn": {}, "scores": {}}
    for name, p in model.named_parameters():
        if name.endswith("scores"):
            kind = "scores"
        elif ".bn" in name or name.split(".")[-2] in ("1", "4", "8"):  # digits_cnn BN indices
            kind = "bn"
        else:
            kind = "weights"
        key = name.replace(".parametrizations.weight.original", ".weight").replace(
            ".parametrizations.weight.0.scores", ".scores"
        )
        kinds[kind][key] = p.detach().clone()
    return kinds


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_cli_stages_train_only_their_parameters(tmp_path: Path, freeze_bn: bool) -> None:
    dense = tmp_path / "dense"
    rc, log = _run(["train", "--epochs", "1", "--objective", "natural", "--out", dense, *TINY])
    assert rc == 0, log
    rc, log = _run(
        ["prune", "--method", "hydra", "--checkpoint", dense / "model.safetensors",
         "--sparsity", "0.95", "--epochs", "1", "--lr", "0.1", "--option",
         f"freeze_bn={str(freeze_bn).lower()}", "--out", tmp_path / "pruned", *TINY]
    )  # fmt: skip
    assert rc == 0, log
    before, _ = load_checkpoint(dense / "model.safetensors")
    pruned, card = load_checkpoint(tmp_path / "pruned" / "model.safetensors")
    p0, p1 = _params(before), _params(pruned)
    assert _same(p0["weights"], p1["weights"])  # prune stage: weights and biases frozen
    assert _same(p0["bn"], p1["bn"]) == freeze_bn
    # the scores trained: they no longer equal the scaled init of the (unchanged) weights
    scaled = {f"{n}.scores": scaled_scores(dense_weight(m)) for n, (m, _) in
              masked_modules(pruned).items()}  # fmt: skip
    assert set(scaled) == set(p1["scores"])
    assert not all(torch.equal(scaled[k], p1["scores"][k]) for k in scaled)
    assert card["method"]["options"]["freeze_bn"] is freeze_bn
    assert sparsity_report(pruned).sparsity == pytest.approx(0.95, abs=1e-5)
    if freeze_bn:
        return
    rc, log = _run(
        ["finetune", "--checkpoint", tmp_path / "pruned" / "model.safetensors", "--epochs",
         "1", "--lr", "0.01", "--out", tmp_path / "tuned", *TINY]
    )  # fmt: skip
    assert rc == 0, log
    tuned, _ = load_checkpoint(tmp_path / "tuned" / "model.safetensors")
    p2 = _params(tuned)
    assert _same(p1["scores"], p2["scores"])  # finetune: scores (hence masks) frozen
    assert not _same(p1["weights"], p2["weights"])
    for name, (_, mask) in masked_modules(tuned).items():
        assert torch.equal(mask.full_mask(), masked_modules(pruned)[name][1].full_mask())


def test_cli_hydra_needs_a_pretrained_checkpoint(tmp_path: Path) -> None:
    rc, log = _run(["prune", "--method", "hydra", "--out", tmp_path / "o", *TINY])
    assert rc == 2 and log.count("\n") == 1
    assert "needs --checkpoint" in log and "prunes a trained model" in log


@pytest.mark.parametrize("objective", list_objectives())
def test_hydra_prunes_with_every_objective(objective: str) -> None:
    import advprune
    from advprune.data import load_dataset, make_loader

    splits = load_dataset("digits", val_fraction=0.0)
    loader = make_loader(torch.utils.data.Subset(splits.train, range(128)), 64, shuffle=True)
    torch.manual_seed(0)
    model = create("digits_cnn", width=8)
    pruned = advprune.prune(model, method="hydra", sparsity=0.9, objective=objective,
                            data=loader, epochs=1, attack_steps=1, lr=0.1)  # fmt: skip
    assert pruned.advprune_card["objective"]["name"] == objective
    dense = dict(model.named_parameters())
    for name, (module, mask) in masked_modules(pruned).items():
        assert torch.equal(dense_weight(module), dense[f"{name}.weight"])  # weights frozen
        assert not torch.equal(mask.scores, scaled_scores(dense[f"{name}.weight"]))  # trained
