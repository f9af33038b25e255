"""Tests of the model zoo, the registry and ModelSpec."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.models import (
    ModelSpec,
    Normalize,
    create,
    default_input_size,
    list_models,
    register_model,
)
from advprune.models import registry as registry_module

ALL_MODELS = [
    "cnn7", "digits_cnn", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "vgg16_nobn",
    "wrn28_10", "wrn28_4",
]  # fmt: skip

# Published / reference figures (3 input channels; 1 for digits_cnn).
PARAM_COUNTS = {
    "resnet18": (10, 11_173_962),  # kuangliu/pytorch-cifar
    "resnet34": (10, 21_282_122),
    "resnet50": (10, 23_520_842),
    "vgg16": (10, 15_311_818),  # HYDRA CIFAR VGG-16; derivation in advprune.models.vgg.vgg16
    "vgg16_bn": (1000, 138_365_992),  # torchvision docs
    "vgg16_nobn": (10, 15_303_370),  # vgg16 less its 8,448 BatchNorm parameters
    "wrn28_10": (10, 36_479_194),  # RobustBench Standard
    "wrn28_4": (10, 5_849_050),  # formula in advprune.models.wideresnet docstring
    "digits_cnn": (10, 226_794),  # 288+64 + 18432+128 + 73728+256 + 131328 + 2570
    "cnn7": (10, 17_192_138),  # formula in advprune.models.cnn.cnn7
}

# (first conv/linear, last conv/linear) in named_modules order.
STEM_AND_HEAD = {
    "cnn7": ("features.0", "classifier.3"),
    "digits_cnn": ("features.0", "classifier.2"),
    "resnet18": ("conv1", "linear"),
    "resnet34": ("conv1", "linear"),
    "resnet50": ("conv1", "linear"),
    "vgg16": ("features.0", "classifier.4"),
    "vgg16_bn": ("features.0", "classifier.6"),
    "vgg16_nobn": ("features.0", "classifier.4"),
    "wrn28_10": ("conv1", "fc"),
    "wrn28_4": ("conv1", "fc"),
}

_CACHE: dict[str, nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def cached(name: str) -> nn.Module:
    """One model per name for read-only tests, with the class count of ``PARAM_COUNTS``.

    vgg16_bn is built once, with 1000 classes (building it takes a second or two).
    """
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create(name, num_classes=PARAM_COUNTS[name][0]).eval()
    return _CACHE[name]


def test_registry_lists_exactly_the_known_models():
    assert list_models() == ALL_MODELS
    assert list_models("resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert list_models("wrn*") == ["wrn28_10", "wrn28_4"]
    assert list_models("vgg16") == ["vgg16"]
    assert list_models("nothing*") == []


def test_default_input_size():
    assert default_input_size("resnet18") == (3, 32, 32)
    assert default_input_size("resnet18", in_channels=3) == (3, 32, 32)
    assert default_input_size("resnet18", in_channels=1) == (1, 32, 32)
    assert default_input_size("digits_cnn") == (1, 8, 8)
    assert default_input_size("vgg16_bn") == (3, 224, 224)
    with pytest.raises(UnknownNameError):
        default_input_size("resnet19")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_and_spec(name):
    model = cached(name)
    size = (3, 32, 32) if name == "vgg16_bn" else default_input_size(name)  # 224² is slow
    with torch.no_grad():
        out = model(torch.rand(2, *size))
    num_classes = PARAM_COUNTS[name][0]
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    assert isinstance(model.normalize, Normalize)
    assert next(iter(model.children())) is model.normalize
    spec = model.spec
    assert (spec.name, spec.num_classes, spec.in_channels) == (name, num_classes, size[0])
    assert spec.mean == (0.0,) * size[0] and spec.std == (1.0,) * size[0]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_counts(name):
    assert cached(name).spec.num_classes == PARAM_COUNTS[name][0]
    assert sum(p.numel() for p in cached(name).parameters()) == PARAM_COUNTS[name][1]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_no_normalize_keys_and_no_conv_bias(name):
    model = cached(name)
    keys = list(model.state_dict())
    assert not any(k.startswith("normalize") for k in keys)
    assert {n for n, _ in model.named_buffers()} >= {"normalize.mean", "normalize.std"}
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert (module.bias is not None) == (name == "vgg16_bn")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_stem_first_and_classifier_last(name):
    model = cached(name)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    (first_name, first), (last_name, last) = layers[0], layers[-1]
    assert (first_name, last_name) == STEM_AND_HEAD[name]
    assert first.in_channels == default_input_size(name)[0]
    assert isinstance(last, nn.Linear) and last.out_features == PARAM_COUNTS[name][0]


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n != "vgg16_bn"])
def test_modules_registered_in_execution_order(name):
    model = cached(name)
    registered = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    executed: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: executed.append(m)) for m in registered]
    try:
        with torch.no_grad():
            model(torch.rand(1, *default_input_size(name)))
    finally:
        for h in hooks:
            h.remove()
    assert [id(m) for m in executed] == [id(m) for m in registered]


def test_resnet_key_layout():
    sd = cached("resnet18").state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert "bn1.running_mean" in sd and "conv1.bias" not in sd
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert "layer2.0.shortcut.1.running_var" in sd
    assert "layer4.1.bn2.num_batches_tracked" in sd
    assert not any(k.startswith("layer1.0.shortcut") for k in sd)
    assert not any(k.startswith("layer2.1.shortcut") for k in sd)
    assert sd["linear.weight"].shape == (10, 512) and "linear.bias" in sd
    assert len(list(cached("resnet18").parameters())) == 62
    model = cached("resnet18")
    assert isinstance(model.layer1[0].shortcut, nn.Sequential)
    assert len(model.layer1[0].shortcut) == 0

    sd50 = cached("resnet50").state_dict()
    assert sd50["layer1.0.shortcut.0.weight"].shape == (256, 64, 1, 1)
    assert sd50["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert sd50["linear.weight"].shape == (10, 2048)
    assert "layer3.6.conv1.weight" not in cached("resnet34").state_dict()
    assert "layer3.5.conv1.weight" in cached("resnet34").state_dict()


def test_vgg16_key_layout():
    sd = cached("vgg16").state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert "features.0.bias" not in sd
    assert sd["features.1.running_mean"].shape == (64,)
    convs = sorted({int(k.split(".")[1]) for k in sd if k.endswith(".weight") and sd[k].dim() == 4})
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    features = cached("vgg16").features
    assert len(features) == 43 and isinstance(features[42], nn.ReLU)  # no trailing max-pool
    assert sum(isinstance(m, nn.MaxPool2d) for m in features) == 4
    assert sd["classifier.0.weight"].shape == (256, 2048)
    assert sd["classifier.2.weight"].shape == (256, 256)
    assert sd["classifier.4.weight"].shape == (10, 256) and "classifier.4.bias" in sd
    assert isinstance(cached("vgg16").avgpool, nn.AdaptiveAvgPool2d)


def test_vgg16_nobn_key_layout():
    """HYDRA's / HARP's BatchNorm-free vgg16: conv / ReLU pairs, pools between blocks."""
    sd = cached("vgg16_nobn").state_dict()
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("features."))
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert all(k.endswith(".weight") for k in sd if k.startswith("features."))  # no bias, no BN
    features = cached("vgg16_nobn").features
    assert len(features) == 30 and isinstance(features[29], nn.ReLU)
    assert [k for k in sd if k.startswith("classifier")] == [
        f"classifier.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    ]


def test_vgg16_bn_key_layout():
    sd = cached("vgg16_bn").state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3) and "features.0.bias" in sd
    assert "features.1.running_mean" in sd
    assert sd["features.40.weight"].shape == (512, 512, 3, 3)
    assert "features.41.running_var" in sd
    assert len(cached("vgg16_bn").features) == 44
    assert sd["classifier.0.weight"].shape == (4096, 25088)
    assert sd["classifier.3.weight"].shape == (4096, 4096)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    assert sum(isinstance(m, nn.Dropout) for m in cached("vgg16_bn").classifier) == 2


def test_wideresnet_key_layout():
    sd = cached("wrn28_10").state_dict()
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["block1.layer.0.bn1.weight"].shape == (16,)
    assert sd["block1.layer.0.convShortcut.weight"].shape == (160, 16, 1, 1)
    assert sd["block2.layer.0.convShortcut.weight"].shape == (320, 160, 1, 1)
    assert sd["block3.layer.3.conv2.weight"].shape == (640, 640, 3, 3)
    assert not any("layer.1.convShortcut" in k for k in sd)
    assert "block3.layer.4.conv1.weight" not in sd
    assert sd["bn1.weight"].shape == (640,)
    assert sd["fc.weight"].shape == (10, 640) and "fc.bias" in sd
    assert sd["block1.layer.0.conv1.weight"].shape == (160, 16, 3, 3)
    assert cached("wrn28_4").state_dict()["fc.weight"].shape == (10, 256)
    block = cached("wrn28_4").block1.layer[1]
    assert isinstance(block.relu1, nn.ReLU) and isinstance(block.relu2, nn.ReLU)


def test_normalize_hand_computed_and_non_persistent():
    norm = Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.tensor([1.0, 0.0, 0.75, 0.25]).view(1, 2, 2, 1)
    expected = torch.tensor([1.0, -1.0, 0.25, 0.0]).view(1, 2, 2, 1)
    assert torch.equal(norm(x), expected)
    assert norm.state_dict() == {}
    assert dict(norm.named_buffers()).keys() == {"mean", "std"}
    assert norm.double()(x.double()).dtype == torch.float64
    one = Normalize(0.5, 0.25)  # one value broadcasts over channels
    assert torch.equal(one(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
    assert Normalize.identity(3).is_identity and not norm.is_identity
    with pytest.raises(ConfigError):
        Normalize((0.5, 0.5), (0.5, 0.0))
    with pytest.raises(ConfigError):
        Normalize((0.1, 0.2, 0.3), (0.5, 0.5))


def test_mean_std_change_outputs_exactly_as_normalisation():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    torch.manual_seed(0)
    plain = create("resnet18").eval()
    normed = create("resnet18", mean=mean, std=std).eval()
    normed.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out_plain, out_normed = plain(x), normed(x)
        manual = plain(
            (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        )
    assert (out_plain - out_normed).abs().max() > 0.1 * out_plain.abs().max()
    assert torch.allclose(out_normed, manual, atol=1e-5)
    assert normed.spec.mean == mean and normed.spec.std == std
    assert "normalize.mean" not in normed.state_dict()


def test_single_value_mean_std_expands_to_channels():
    model = create("resnet18", mean=0.5, std=0.25)
    assert model.spec.mean == (0.5, 0.5, 0.5) and model.spec.std == (0.25, 0.25, 0.25)
    assert next(iter(model.children())) is model.normalize  # replaced in place, still first
    assert model.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        create("resnet19")
    assert info.value.valid == ALL_MODELS
    assert "resnet18" in str(info.value) and "wrn28_10" in str(info.value)
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": -3},
        {"num_classes": 2.5},
        {"num_classes": True},
        {"in_channels": 0},
        {"mean": (0.5, 0.5)},  # neither 1 nor in_channels values
        {"std": (0.2, 0.2, 0.2, 0.2)},
        {"std": (0.2, 0.0, 0.2)},
        {"std": 0.0},
        {"mean": "0.5"},
        {"mean": float("nan")},
        {"in_channels": 1, "mean": (0.1, 0.2, 0.3)},
        {"depth": 18},  # resnet18 takes no options
    ],
)
def test_invalid_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        create("resnet18", **kwargs)


def test_invalid_model_options_raise_config_error():
    with pytest.raises(ConfigError):
        create("wrn28_4", drop_rate=1.5)
    with pytest.raises(ConfigError):
        create("digits_cnn", width=0)
    with pytest.raises(ConfigError, match="width"):
        create("digits_cnn", widht=8)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ConfigError):
        register_model("resnet18")(lambda num_classes, in_channels: nn.Linear(1, num_classes))


def test_register_custom_model():
    name = "_test_tiny_mlp"

    class Tiny(nn.Module):
        def __init__(self, num_classes: int, in_channels: int) -> None:
            super().__init__()
            self.normalize = Normalize.identity(in_channels)
            self.fc = nn.Linear(in_channels * 4 * 4, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.normalize(x), 1))

    try:
        register_model(name, input_size=(2, 4, 4))(Tiny)
        assert name in list_models()
        model = create(name, num_classes=3, mean=0.5, std=0.5)
        assert model.spec.in_channels == 2 and model.spec.mean == (0.5, 0.5)
        assert model(torch.rand(5, 2, 4, 4)).shape == (5, 3)
        assert default_input_size(name) == (2, 4, 4)
    finally:
        registry_module._REGISTRY.pop(name, None)
    assert name not in list_models()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {"num_classes": 7, "in_channels": 1, "mean": 0.5, "std": 0.3}),
        ("digits_cnn", {"width": 8, "mean": 0.2, "std": 0.4}),
        ("wrn28_4", {"num_classes": 100, "drop_rate": 0.3}),
    ],
)
def test_model_spec_round_trip(name, kwargs):
    torch.manual_seed(1)
    model = create(name, **kwargs).eval()
    d = json.loads(json.dumps(model.spec.to_dict()))
    assert d == model.spec.to_dict()
    spec = ModelSpec.from_dict(d)
    assert spec == model.spec
    for rebuilt in (spec.build(), create(**spec.to_create_kwargs())):
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        rebuilt.eval()
        assert rebuilt.spec == model.spec
        x = torch.rand(2, *spec.input_size)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))


def test_model_spec_from_dict_rejects_bad_input():
    with pytest.raises(ConfigError):
        ModelSpec.from_dict({"name": "resnet18", "colour": "blue"})
    with pytest.raises(ConfigError):
        ModelSpec.from_dict({"num_classes": 10})
    with pytest.raises(UnknownNameError):
        ModelSpec.from_dict({"name": "resnet19"})
    spec = ModelSpec.from_dict({"name": "digits_cnn"})
    assert (spec.num_classes, spec.in_channels, spec.mean, spec.std) == (10, 1, (0.0,), (1.0,))
    hash(spec)  # frozen and hashable


def test_in_channels_one():
    for name in ("resnet18", "wrn28_4", "vgg16"):
        model = create(name, in_channels=1, num_classes=4).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    assert create("resnet18", in_channels=1).conv1.weight.shape == (64, 1, 3, 3)
    digits3 = create("digits_cnn", in_channels=3).eval()
    assert digits3(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_other_input_sizes():
    with torch.no_grad():
        assert cached("resnet18")(torch.rand(1, 3, 64, 64)).shape == (1, 10)
        assert cached("wrn28_4")(torch.rand(1, 3, 64, 64)).shape == (1, 10)
        assert cached("vgg16")(torch.rand(1, 3, 64, 64)).shape == (1, 10)
        assert cached("digits_cnn")(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_digits_cnn_is_adversarially_trainable():
    """Two epochs of PGD training on sklearn digits give robust accuracy far above chance."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(X))
    X, y = X[perm], y[perm]
    X_train, y_train, X_test, y_test = X[:1400], y[:1400], X[1400:], y[1400:]
    model = create("digits_cnn", mean=0.3, std=0.4)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    eps, alpha = 0.1, 0.03

    def pgd(x, t, steps):
        delta = torch.empty_like(x).uniform_(-eps, eps)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), t)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        return (x + delta).clamp(0, 1).detach()

    for _ in range(2):
        for i in range(0, len(X_train), 64):
            xb, yb = X_train[i : i + 64], y_train[i : i + 64]
            model.eval()
            x_adv = pgd(xb, yb, 3)
            model.train()
            loss = F.cross_entropy(model(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x_adv = pgd(X_test, y_test, 10)
    with torch.no_grad():
        clean = (model(X_test).argmax(1) == y_test).float().mean().item()
        robust = (model(x_adv).argmax(1) == y_test).float().mean().item()
    assert clean > 0.85
    assert robust > 0.5


def test_image_size_keyword_sets_the_spec_input_size() -> None:
    model = create("cnn7", num_classes=10, in_channels=1, image_size=8)
    assert model.spec.input_size == (1, 8, 8)
    assert model(torch.rand(2, *model.spec.input_size)).shape == (2, 10)
    assert create("cnn7").spec.input_size == (3, 32, 32)
