"""HARP: learned rates and scores, the hinge loss and its schedule, structured channels."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from _method_checks import export_into_plain, fails_in_one_line
from advprune.checkpoint import load_checkpoint, save_checkpoint
from advprune.cli import main
from advprune.data import load_dataset, make_loader
from advprune.methods import create_method
from advprune.methods.harp import (
    HARP,
    HardwareLoss,
    RateMask,
    harp_masks,
    layer_costs,
    measured_cost,
    rate_densities,
    shared_input_groups,
)
from advprune.models import create
from advprune.sparsity import magnitude_importance, prunable_layers, sparsity_report, topk_mask
from advprune.sparsity.allocation import allocate
from advprune.training import TrainConfig, Trainer, create_objective, parameter_groups


def _harp(sparsity: float, model: nn.Module | None = None, **kwargs) -> tuple[HARP, nn.Module]:
    torch.manual_seed(0)
    model = model if model is not None else create("digits_cnn")
    method = create_method("harp", sparsity, **kwargs)
    method.prune(model)
    return method, model


def _kept_weights(model: nn.Module) -> int:
    return sum(int(m.full_mask().count_nonzero()) for m in harp_masks(model).values())


def _total(model: nn.Module) -> int:
    return sum(m.weight_shape.numel() for m in harp_masks(model).values())


def _raise_rates(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for mask in {id(m.rate): m for m in harp_masks(model).values()}.values():
            mask.rate.add_(by)


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits", val_fraction=0.2, seed=0)
    train = make_loader(torch.utils.data.Subset(splits.train, range(384)), 128, shuffle=True)
    val = make_loader(torch.utils.data.Subset(splits.val, range(128)), 128)
    return train, val


# ---------------------------------------------------------------------------- mask and rates


@pytest.mark.parametrize("strategy", ["uniform", "erk", "lamp"])
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.99])
def test_initial_rates_reproduce_the_allocation(strategy: str, sparsity: float) -> None:
    torch.manual_seed(0)
    model = create("digits_cnn")
    expected = allocate(strategy, prunable_layers(model), sparsity)
    method, model = _harp(sparsity, model, allocation=strategy)
    a_min = 0.1 * (1 - sparsity)
    assert method.a_min == pytest.approx(a_min)
    for name, mask in harp_masks(model).items():
        assert mask.kept() == round(expected[name] * mask.units), name
        assert float(mask.a_min) == pytest.approx(a_min)
    assert _kept_weights(model) == round((1 - sparsity) * _total(model))


def test_unstructured_scores_start_as_magnitude_pruning() -> None:
    _, model = _harp(0.9)
    for name, module in prunable_layers(model).items():
        mask = harp_masks(model)[name]
        weight = module.parametrizations.weight.original
        fan_in = weight[0].numel()
        expected = math.sqrt(6 / fan_in) * weight / weight.abs().max()
        torch.testing.assert_close(mask.scores.detach(), expected)
        lwm = topk_mask(magnitude_importance(weight, "unstructured"), mask.kept() / mask.units)
        assert torch.equal(mask.full_mask(), lwm)


def test_rate_gradient_is_the_summed_mask_gradient_times_the_density_slope() -> None:
    _, model = _harp(0.9)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, mask in harp_masks(model).items():
        assert mask.rate.grad is not None and mask.rate.grad != 0, name
        # unstructured: d/dS = dL/dm * sign(S), so sum(dL/dm) = sum(dS * sign(S))
        mask_grad = (mask.scores.grad * mask.scores.detach().sign()).sum().double()
        s = torch.sigmoid(mask.rate.detach())
        slope = (1 - mask.a_min) * s * (1 - s)
        torch.testing.assert_close(mask.rate.grad, mask_grad * slope)


def test_kept_count_is_the_ceiling_of_the_rate_density() -> None:
    _, model = _harp(0.9)
    _raise_rates(model, 0.37)
    for mask in harp_masks(model).values():
        a = float(mask.layer_density().detach())
        assert mask.kept() == math.ceil(a * mask.units)
        assert int(mask.full_mask().count_nonzero()) == mask.kept()


# ---------------------------------------------------------------------------- hinge loss


def test_gamma_grows_until_the_target_is_met_then_freezes() -> None:
    method, model = _harp(0.9, gamma0=0.5)
    reg = method.regularizer("prune")
    assert isinstance(reg, HardwareLoss) and method.regularizer("finetune") is None
    _raise_rates(model, 1.0)
    assert not reg.ready(model) and float(reg.hinge(model).detach()) > 0
    assert reg.end_epoch(model, 0)["hw_gamma"] == 1.0  # (epoch + 1) * gamma0 for epoch 1
    assert reg.end_epoch(model, 1)["hw_gamma"] == 1.5
    assert float(reg.loss(model).detach()) == pytest.approx(1.5 * float(reg.hinge(model).detach()))
    method.finalize(model)  # meets the target
    assert reg.ready(model)
    logged = reg.end_epoch(model, 2)
    assert logged["hw_gamma"] == 1.5 and logged["hw_target_met"] == 1.0
    _raise_rates(model, 1.0)
    assert reg.end_epoch(model, 3)["hw_gamma"] == 1.5  # frozen even when above again
    assert not reg.ready(model)
    resumed = HardwareLoss(method.target_density, 0.5)
    resumed.load_state_dict(json.loads(json.dumps(reg.state_dict())))
    assert (resumed.gamma, resumed.frozen) == (1.5, True)


def test_rates_move_to_the_target_and_best_is_kept_only_once_met(digits, tmp_path) -> None:
    train, val = digits
    method, model = _harp(0.9, gamma0=2.0)
    _raise_rates(model, 2.0)
    start = _kept_weights(model) / _total(model)
    assert start > 0.3
    scores = {n: m.scores.detach().clone() for n, m in harp_masks(model).items()}
    trainer = Trainer(
        model,
        create_objective("natural"),
        train,
        TrainConfig(epochs=3, lr=0.1, schedule="constant"),
        val_loader=val,
        param_groups=parameter_groups(model, method.trainable("prune")),
        regularizer=method.regularizer("prune"),
        out_dir=tmp_path,
        progress=False,
    )
    result = trainer.fit()
    met = [row.extra["hw_target_met"] for row in result.history]
    assert met[0] == 0.0 and 1.0 in met  # above the target after epoch 1, met later
    assert all(m == 1.0 for row, m in zip(result.history, met) if row.best)
    assert result.best_epoch is not None and met[result.best_epoch] == 1.0
    densities = [row.extra["hw_density"] for row in result.history]
    assert densities[0] < start and min(densities) <= 0.1
    best, _ = load_checkpoint(tmp_path / "best.safetensors")
    assert _kept_weights(best) <= round(0.1 * _total(best))
    assert any(not torch.equal(m.scores, scores[n]) for n, m in harp_masks(model).items())


def test_final_density_is_within_one_weight_of_the_rate_and_at_the_target() -> None:
    method, model = _harp(0.9)
    _raise_rates(model, 0.8)  # as if training stopped above the target
    assert _kept_weights(model) > round(0.1 * _total(model))
    learned = method.finish(model, {})
    rates = rate_densities(model)
    report = sparsity_report(model)
    for row in report.layers:
        mask = harp_masks(model)[row.name]
        assert abs(row.kept - rates[row.name] * row.params) < 1
        assert learned[row.name] == pytest.approx(row.kept / row.params)
        assert mask.kept() == row.kept
    assert report.kept <= round(0.1 * report.prunable_params)
    assert report.kept >= round(0.1 * report.prunable_params) - 2 * len(report.layers)


@pytest.mark.parametrize("learn", ["rates", "scores", "both"])
def test_variants_train_their_parameters_only(learn, digits) -> None:
    method, model = _harp(0.9, learn=learn, freeze_bn=learn == "rates")
    kinds = {"both": ("scores", "rates"), "rates": ("rates",), "scores": ("scores",)}[learn]
    assert method.trainable("prune") == kinds + (() if learn == "rates" else ("bn",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(
        model,
        create_objective("natural"),
        digits[0],
        TrainConfig(epochs=1, lr=0.1),
        param_groups=parameter_groups(model, method.trainable("prune")),
        regularizer=method.regularizer("prune"),
        progress=False,
    ).fit()
    after = model.state_dict()
    bn_keys = ("features.1.", "features.4.", "features.8.")
    trained = set(method.trainable("prune"))
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm statistics follow the data in train mode
        kind = (
            "rates" if key.endswith(".rate") else
            "scores" if key.endswith(".scores") else
            "bn" if key.startswith(bn_keys) else "weights"
        )  # fmt: skip
        assert torch.equal(after[key], value) != (kind in trained), key


def test_flops_costs_count_macs_at_the_input_size() -> None:
    method, model = _harp(0.8, hw_loss="flops")
    costs = layer_costs(model, "flops")
    # digits_cnn on 8x8: convs at 8x8, 8x8 and 4x4 output positions, linear layers once
    positions = {"features.0": 64, "features.3": 64, "features.7": 16}
    for name, cost in costs.items():
        assert cost.unit_cost == positions.get(name, 1)
    _raise_rates(model, 1.0)
    method.finalize(model)
    report = sparsity_report(model, (1, 8, 8))
    assert report.flops <= 0.2 * report.flops_dense
    assert measured_cost(model, costs) == report.flops


# ---------------------------------------------------------------------------- structured


def test_shared_inputs_are_found_by_tracing() -> None:
    groups = shared_input_groups(create("resnet18"))
    assert sorted(groups) == [[f"layer{k}.0.conv1", f"layer{k}.0.shortcut.0"] for k in (2, 3, 4)]
    groups = shared_input_groups(create("wrn28_4"))
    expected = [[f"block{k}.layer.0.conv1", f"block{k}.layer.0.convShortcut"] for k in (1, 2, 3)]
    assert sorted(groups) == expected
    assert shared_input_groups(create("vgg16")) == []


def test_structured_harp_prunes_whole_channels_and_ties_shortcuts(tmp_path) -> None:
    _, model = _harp(0.5, create("resnet18"), structure="channels")
    masks = harp_masks(model)
    for name, mask in masks.items():
        full = mask.full_mask()
        per_channel = full.transpose(0, 1).flatten(1)
        assert bool(((per_channel == 0).all(1) | (per_channel == 1).all(1)).all()), name
        assert 0 < mask.kept() < mask.units or mask.units == 3
    for k in (2, 3, 4):
        conv1, short = masks[f"layer{k}.0.conv1"], masks[f"layer{k}.0.shortcut.0"]
        assert conv1.scores is short.scores and conv1.rate is short.rate
    # initial channel scores rank by the summed per-channel L1 norms of the tied layers
    l1 = sum(
        prunable_layers(model)[n].parametrizations.weight.original.abs().sum((0, 2, 3))
        for n in ("layer3.0.conv1", "layer3.0.shortcut.0")
    )
    assert torch.equal(masks["layer3.0.conv1"].scores.argsort(), l1.argsort())
    # one training step moves the shared scores; the masks stay equal
    _raise_rates(model, -0.3)
    opt = torch.optim.SGD(list(model.parameters()), lr=1.0)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for k in (2, 3, 4):
        a = masks[f"layer{k}.0.conv1"].compact_mask()
        assert torch.equal(a, masks[f"layer{k}.0.shortcut.0"].compact_mask())
    # saved and loaded (the mask kind is rebuilt), the masks are still consistent
    path = save_checkpoint(tmp_path / "s.safetensors", model)
    loaded, _ = load_checkpoint(path)
    lm = harp_masks(loaded)
    assert all(isinstance(m, RateMask) for m in lm.values())
    for k in (2, 3, 4):
        assert torch.equal(lm[f"layer{k}.0.conv1"].compact_mask(),
                           lm[f"layer{k}.0.shortcut.0"].compact_mask())  # fmt: skip
    model.eval(), loaded.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_export_loads_strict_into_the_plain_model(tmp_path) -> None:
    _, model = _harp(0.9)
    _raise_rates(model, 0.3)
    _, card = export_into_plain(model, tmp_path)
    expected = {n: m.kept() / m.units for n, m in harp_masks(model).items()}
    assert card["sparsity"]["layers"] == pytest.approx(expected)
    assert card["architecture"]["kwargs"] == {}


# ---------------------------------------------------------------------------- bad input


def _wrong_input_size() -> nn.Module:
    model = create("digits_cnn")
    model.spec = dataclasses.replace(model.spec, in_channels=3)  # the model takes 1 channel
    return model


class _Grouped(nn.Module):
    """A grouped convolution: masking its input channels would not remove whole channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: create_method("harp", 0.9, structure="filters"), ["structure", "filters"]),
        (lambda: create_method("harp", 0.9, learn="weights"), ["learn", "rates"]),
        (lambda: create_method("harp", 0.9, hw_loss="latency"), ["hw_loss", "flops"]),
        (lambda: create_method("harp", 0.9, gamma0=-1), ["gamma0"]),
        (lambda: create_method("harp", 0.9, a_min_factor=1.5), ["a_min_factor"]),
        (lambda: _harp(0.5, create("resnet18"), structure="channels", exclude=["*shortcut*"]),
         ["layer2.0.shortcut.0", "not pruned"]),
        (lambda: _harp(0.9999, structure="channels"), ["cannot be reached"]),
        (lambda: _harp(0.5, _Grouped(), structure="channels"), ["grouped", "conv"]),
        (lambda: _harp(0.5, _wrong_input_size(), structure="channels"),
         ["input size (3, 8, 8)", "forward pass failed"]),
    ],
)  # fmt: skip
def test_bad_input(make, words) -> None:
    fails_in_one_line(make, *words)


# ---------------------------------------------------------------------------- CLI


def test_cli_prune_and_finetune_on_digits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = save_checkpoint(tmp_path / "dense.safetensors", create("digits_cnn"))
    tiny = ["--attack-steps", "1", "--eval-steps", "1", "--n", "40", "--batch-size", "256",
            "--no-progress"]  # fmt: skip

    def run(argv: list[str]) -> None:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
        assert rc == 0, err.getvalue()

    out = tmp_path / "harp"
    run(["prune", "--method", "harp", "--checkpoint", dense, "--sparsity", "0.95", "--epochs",
         "2", "--option", "gamma0=0.1", "--out", out, *tiny])  # fmt: skip
    model, card = load_checkpoint(out / "model.safetensors")
    assert card["method"]["options"]["gamma0"] == 0.1
    masks = harp_masks(model)
    assert masks and all(isinstance(m, RateMask) for m in masks.values())
    assert card["sparsity"]["target_layers"] == pytest.approx(
        {n: m.kept() / m.units for n, m in masks.items()}
    )
    assert _kept_weights(model) <= round(0.05 * _total(model))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["extra"]["hw_gamma"] > 0 for r in rows] == [True, True]
    ft = tmp_path / "ft"
    run(["finetune", "--checkpoint", out / "model.safetensors", "--epochs", "1", "--out", ft,
         *tiny])  # fmt: skip
    tuned, card = load_checkpoint(ft / "model.safetensors")
    for name, mask in harp_masks(tuned).items():
        assert torch.equal(mask.full_mask(), masks[name].full_mask())
    assert card["sparsity"]["target_layers"] == pytest.approx(
        {n: m.kept() / m.units for n, m in masks.items()}
    )
