"""Robust binary random subnetworks and the bn_affine / head model variants."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from _method_checks import export_into_plain, fails_in_one_line
from advprune.checkpoint import load_checkpoint
from advprune.cli import main
from advprune.data import load_dataset, make_loader
from advprune.errors import ConfigError
from advprune.methods import create_method
from advprune.methods.binary import BinarySubnet, binary_variant
from advprune.models import ModelSpec, create
from advprune.models.variants import ConvHead
from advprune.sparsity import ScoreMask, dense_weight, masked_modules, prunable_layers
from advprune.sparsity.allocation import allocate
from advprune.training import TrainConfig, Trainer, create_objective, parameter_groups


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------------------- model variants


@pytest.mark.parametrize("name", ["digits_cnn", "resnet18", "vgg16", "wrn28_4", "cnn7"])
def test_variant_for_every_architecture_rebuilds_from_its_spec(name: str) -> None:
    kwargs = {"image_size": 8} if name == "cnn7" else {}
    model = create(name, num_classes=7, bn_affine=False, head="conv-bn", **kwargs)
    assert model.spec.kwargs == {**kwargs, "bn_affine": False, "head": "conv-bn"}
    bns = _batchnorms(model)
    assert bns and not any(bn.affine for bn in bns)
    heads = [m for m in model.modules() if isinstance(m, ConvHead)]
    assert len(heads) == 1 and isinstance(heads[0].bn, nn.BatchNorm2d)
    assert heads[0].conv.weight.shape[0] == 7 and heads[0].conv.bias is None
    # the head is the last conv / linear layer, so keep_last and pruning see it as usual
    assert list(prunable_layers(model))[-1].endswith(".conv")
    rebuilt = ModelSpec.from_dict(json.loads(json.dumps(model.spec.to_dict()))).build()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    c, h, w = model.spec.input_size
    x = torch.rand(2, c, kwargs.get("image_size", h), kwargs.get("image_size", w))
    model.eval(), rebuilt.eval()
    assert model(x).shape == (2, 7)
    assert torch.equal(model(x), rebuilt(x))


def test_conv_head_computes_the_linear_it_replaces() -> None:
    torch.manual_seed(0)
    plain = create("digits_cnn")
    torch.manual_seed(0)
    conv = create("digits_cnn", head="conv")
    with torch.no_grad():
        plain.classifier[2].bias.zero_()
    x = torch.rand(3, 1, 8, 8)
    plain.eval(), conv.eval()
    torch.testing.assert_close(plain(x), conv(x))
    assert all(bn.affine for bn in _batchnorms(conv))  # bn_affine defaults to true


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"head": "mlp"}, ["head", "conv-bn"]),
        ({"bn_affine": "no"}, ["bn_affine"]),
        ({"depth": 3}, ["unknown option", "bn_affine", "head"]),
    ],
)
def test_bad_variant_arguments(kwargs: dict, words: list[str]) -> None:
    fails_in_one_line(lambda: create("digits_cnn", **kwargs), *words)


# ---------------------------------------------------------------------------- the method


def _binary(sparsity: float = 0.9, **options) -> tuple[BinarySubnet, nn.Module]:
    torch.manual_seed(0)
    source = create("digits_cnn")
    method = create_method("binary", sparsity, **options)
    model = method.prepare(source)
    method.prune(model)
    return method, model


def test_prepare_gives_the_signs_of_the_default_init() -> None:
    torch.manual_seed(1)
    source = create("digits_cnn")
    model = binary_variant(source)
    assert model.spec.kwargs == {"bn_affine": False, "head": "conv-bn"}
    pairs = zip(prunable_layers(source).values(), prunable_layers(model).values())
    for src, dst in pairs:
        w = dst.weight.detach()
        assert torch.equal(w.abs(), torch.ones_like(w))
        expected = torch.where(src.weight >= 0, 1.0, -1.0).reshape(w.shape)
        assert torch.equal(w, expected)
        assert dst.bias is None or not dst.bias.any()
    assert not any(bn.affine for bn in _batchnorms(model))
    head = model.classifier[2]
    assert isinstance(head, ConvHead) and not head.bn.affine
    # the source model is left as it was
    assert not torch.equal(
        source.features[0].weight.abs(), torch.ones_like(source.features[0].weight)
    )


def test_np_densities_and_score_init() -> None:
    _, model = _binary(0.95, allocation_params={"p": 0.3}, score_init_a=0.05)
    layers = {n: m for n, (m, _) in masked_modules(model).items()}
    expected = allocate("np", layers, 0.95, p=0.3)
    for name, (module, mask) in masked_modules(model).items():
        assert isinstance(mask, ScoreMask)
        assert float(mask.target_density) == pytest.approx(expected[name])
        assert mask.density() == pytest.approx(expected[name], abs=1 / module.weight.numel())
        assert float(mask.scores.detach().abs().max()) <= 0.05
        assert float(mask.scores.detach().abs().max()) > 0.04  # uniform(-a, a), not scaled
    # n^p with p < 1: smaller layers keep larger fractions
    by_size = sorted(layers, key=lambda n: layers[n].weight.numel())
    dens = [expected[n] for n in by_size]
    assert dens == sorted(dens, reverse=True)


@pytest.mark.parametrize("mode", ["all", "except-last", "only-last"])
def test_fan_in_scaled_scores(mode: str) -> None:
    _, model = _binary(0.9, score_fan_scale=mode, score_init_a=1.0)
    masks = masked_modules(model)
    last = list(masks)[-1]
    for name, (module, mask) in masks.items():
        fan_in = module.weight[0].numel()
        scaled = mode == "all" or (mode == "except-last") != (name == last)
        bound = fan_in**-0.5 if scaled else 1.0
        assert float(mask.scores.detach().abs().max()) <= bound
        assert float(mask.scores.detach().abs().max()) > 0.8 * bound


@pytest.fixture(scope="module")
def digits_loader():
    splits = load_dataset("digits", val_fraction=0.0, seed=0)
    return make_loader(torch.utils.data.Subset(splits.train, range(256)), 128, shuffle=True)


@pytest.mark.parametrize(
    "objective, kwargs",
    [
        ("pgd", {"eps": "3/16", "steps": 2}),
        ("trades", {"eps": "3/16", "steps": 2}),
        ("fast", {"eps": "3/16"}),
    ],
)
def test_only_scores_train_and_weights_stay_binary(objective, kwargs, digits_loader) -> None:
    method, model = _binary(0.9)
    kinds = method.trainable("prune")
    assert kinds == ("scores",) and not method.needs_pretrained
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "scores" not in n}
    scores = {n: m.scores.detach().clone() for n, (_, m) in masked_modules(model).items()}
    stats = model.features[1].running_mean.clone()
    trainer = Trainer(
        model,
        create_objective(objective, **kwargs),
        digits_loader,
        TrainConfig(epochs=1, lr=0.1, weight_decay=5e-4),
        param_groups=parameter_groups(model, kinds),
        progress=False,
    )
    trainer.fit()
    for name, value in model.named_parameters():
        if "scores" not in name:
            assert torch.equal(value.detach(), weights[name]), name
    for module, _ in masked_modules(model).values():
        w = dense_weight(module)
        assert torch.equal(w.abs(), torch.ones_like(w))  # exactly +-1 after training
    changed = [
        n for n, (_, m) in masked_modules(model).items() if not torch.equal(m.scores, scores[n])
    ]
    assert changed == list(scores)
    assert not torch.equal(model.features[1].running_mean, stats)  # BN statistics do update


def test_export_loads_strict_into_the_binary_architecture(tmp_path: Path) -> None:
    _, model = _binary(0.9)
    plain, card = export_into_plain(model, tmp_path)
    assert card["architecture"]["kwargs"] == {"bn_affine": False, "head": "conv-bn"}
    values = torch.cat([m.weight.detach().flatten() for m in prunable_layers(plain).values()])
    assert set(values.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert card["sparsity"]["measured"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: create_method("binary", 0.9, structure="channels"), ["structure", "channels"]),
        (lambda: create_method("binary", 0.9, score_fan_scale="some"), ["score_fan_scale"]),
        (lambda: create_method("binary", 0.9, score_init_a=0), ["score_init_a"]),
        (lambda: create_method("binary", 0.9, end_with_bn="yes"), ["end_with_bn"]),
        (lambda: create_method("binary", 0.9).prune(create("digits_cnn")), ["not binary"]),
        (lambda: create_method("binary", 0.99999).prune(binary_variant(create("digits_cnn"))),
         ["cannot be reached"]),
    ],
)  # fmt: skip
def test_bad_input(make, words) -> None:
    fails_in_one_line(make, *words)


def test_pruned_model_cannot_be_made_binary() -> None:
    method, model = _binary(0.9)
    with pytest.raises(ConfigError, match="unpruned"):
        method.prepare(model)


def test_cli_prunes_a_fresh_digits_cnn(tmp_path: Path) -> None:
    out = tmp_path / "binary"
    argv = [
        "prune", "--method", "binary", "--model", "digits_cnn", "--sparsity", "0.9",
        "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1", "--n", "40",
        "--batch-size", "256", "--no-progress", "--out", str(out), "--allocation-p", "0.2",
    ]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    assert rc == 0, stderr.getvalue()
    model, card = load_checkpoint(out / "model.safetensors")
    assert card["architecture"]["kwargs"] == {"bn_affine": False, "head": "conv-bn"}
    assert card["method"]["name"] == "binary" and card["method"]["allocation"] == "np"
    assert card["method"]["allocation_params"] == {"p": 0.2}
    layers = {n: m for n, (m, _) in masked_modules(model).items()}
    expected = allocate("np", layers, 0.9, p=0.2)
    assert card["sparsity"]["target_layers"] == pytest.approx(expected)
    assert card["sparsity"]["masked_layers"] == pytest.approx(expected, abs=1e-6)
    assert card["sparsity"]["measured"] == pytest.approx(0.9, abs=1e-4)
    for module in layers.values():
        w = dense_weight(module)
        assert torch.equal(w.abs(), torch.ones_like(w))


def test_prune_stage_scores_depend_on_the_seed_only() -> None:
    """The binary method draws its initial scores at random: in the prune stage they come from
    the run's seed, not from whatever the process drew before (a grid job run twice gave two
    different models before this). Exact equality holds by construction: the same seeded
    generator produces the same draws on one machine."""
    from advprune.api import prune

    def scores(global_seed: int, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)  # what the process drew before: differs run to run
        model = create("digits_cnn")
        config = {"epochs": 0, "seed": seed, "device": "cpu", "progress": "off"}
        pruned = prune(model, "binary", 0.9, data="digits", config=config)
        masks = [m for m in pruned.modules() if isinstance(m, ScoreMask)]
        assert masks
        return [m.scores.detach().clone() for m in masks]

    a, b, other = scores(1, 0), scores(2, 0), scores(1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))
