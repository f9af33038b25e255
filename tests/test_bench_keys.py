"""Model keys: round trips and one clear error per malformed part."""

from __future__ import annotations

import itertools

import pytest

from advprune.bench.keys import (
    ARCH_CODES,
    DATASET_CODES,
    KEY_PARTS,
    card_key_parts,
    dense_key,
    derive_key,
    make_key,
    parse_key,
)
from advprune.errors import ConfigError


def test_benchmark_key_parses():
    key = parse_key("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90")
    assert (key.method, key.arch, key.dataset, key.structure, key.sparsity) == (
        "HYDRA_Sehwag2020Hydra", "R18", "CIFAR10", "US", "90")  # fmt: skip
    assert key.architecture == "resnet18" and key.dataset_name == "cifar10"
    assert key.sparsity_value == 0.9 and key.granularities == ("unstructured",)


def test_round_trips():
    combos = itertools.product(
        ["HYDRA_Sehwag2020Hydra", "BCSP_Özdenizc2021Training", "lwm-iterative", "RST"],
        [*ARCH_CODES, "resnet18", "vgg16_bn"],
        [*DATASET_CODES, "svhn"],
        ["US", "S", "weights", "filters", "channels"],
        [0.9, "95", 99.5, 0.995, "50"],
    )
    for method, arch, dataset, structure, sparsity in combos:
        text = make_key(method, arch, dataset, structure, sparsity)
        key = parse_key(text)
        assert str(key) == text and key.method == method
        assert make_key(key.method, key.arch, key.dataset, key.structure, key.sparsity) == text
        percent = isinstance(sparsity, float) and sparsity < 1
        value = float(sparsity) if percent else float(sparsity) / 100
        assert key.sparsity_value == pytest.approx(value)


def test_make_key_translates_names():
    assert make_key("HARP_Zhao2023Holistic", "vgg16", "svhn", "channels", 0.75) == (
        "HARP_Zhao2023Holistic_V16_SVHN_S_75"
    )


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (("HY DRA", "R18", "CIFAR10", "US", 90), "method 'HY DRA'"),
        (("A_B_C", "R18", "CIFAR10", "US", 90), "method 'A_B_C'"),
        (("HYDRA", "resnet19", "CIFAR10", "US", 90), "architecture 'resnet19'"),
        (("HYDRA", "R18", "mnist", "US", 90), "dataset 'mnist'"),
        (("HYDRA", "R18", "CIFAR10", "blocks", 90), "structure 'blocks'"),
        (("HYDRA", "R18", "CIFAR10", "US", 0), "sparsity 0"),
        (("HYDRA", "R18", "CIFAR10", "US", "100"), "sparsity .100."),
        (("HYDRA", "R18", "CIFAR10", "US", True), "must be a number"),
    ],
)
def test_make_key_malformed_parts(parts, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_key(*parts)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("HYDRA_Sehwag2020Hydra_R19_CIFAR10_US_90", "architecture 'R19'"),
        ("HYDRA_Sehwag2020Hydra_R18_MNIST_US_90", "dataset 'MNIST'"),
        ("HYDRA_Sehwag2020Hydra_R18_CIFAR10_XS_90", "structure 'XS'"),
        ("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_100", "sparsity '100'"),
        ("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_abc", "sparsity 'abc'"),
        ("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90.0", "written '90'"),
        ("A_B_C_R18_CIFAR10_US_90", "method 'A_B_C'"),
        ("HY DRA_R18_CIFAR10_US_90", "method 'HY DRA'"),
        ("R18_CIFAR10_US_90", "method_arch_dataset"),
        ("", "non-empty"),
    ],
)
def test_malformed_parts(text, part):
    with pytest.raises(ConfigError, match=part.replace(".", r"\.")):
        parse_key(text)


def test_dense_baseline_key():
    assert dense_key("resnet18", "cifar10") == "Dense_R18_CIFAR10_US_0"
    assert make_key("dense", "digits_cnn", "digits", "US", 0) == "Dense_DCNN_DIGITS_US_0"
    key = parse_key("Dense_R18_CIFAR10_US_0")
    assert key.is_dense and key.sparsity_value == 0.0
    assert not parse_key("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90").is_dense
    # Dense and sparsity 0 go together, with US; no other spelling
    for text in ("Dense_R18_CIFAR10_US_90", "HYDRA_R18_CIFAR10_US_0", "Dense_R18_CIFAR10_S_0",
                 "DENSE_R18_CIFAR10_US_0", "dense_R18_CIFAR10_US_0"):  # fmt: skip
        with pytest.raises(ConfigError, match="a dense baseline's key is Dense_R18_CIFAR10_US_0"):
            parse_key(text)
    with pytest.raises(ConfigError, match=r"must be a percent in \(0, 100\)"):
        make_key("HYDRA", "R18", "CIFAR10", "US", 0)


def test_key_derived_from_a_card():
    card = {
        "architecture": {"name": "resnet18"},
        "dataset": {"name": "cifar10"},
        "method": {"name": "hydra", "sparsity": 0.99, "structure": "unstructured"},
        "sparsity": {"measured": 0.99},
    }
    parts = card_key_parts(card)
    assert derive_key(parts) == (
        "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_99",
        dict.fromkeys(KEY_PARTS, "card"),
    )
    key, source = derive_key(parts, {"structure": "filters", "sparsity": "99.5"})
    assert key == "HYDRA_Sehwag2020Hydra_R18_CIFAR10_S_99.5"
    assert [n for n in KEY_PARTS if source[n] == "given"] == ["structure", "sparsity"]
    dense = {**card, "method": None, "sparsity": {"measured": 0.0}}
    assert derive_key(card_key_parts(dense))[0] == "Dense_R18_CIFAR10_US_0"
    assert card_key_parts({**dense, "sparsity": None}, measured=0.0)["method"] == "Dense"
    unknown = card_key_parts({**dense, "sparsity": {"measured": 0.5}})
    assert unknown["method"] is None and unknown["arch"] == "resnet18"
    with pytest.raises(ConfigError, match="does not tell the key's method, structure, sparsity"):
        derive_key(unknown)
    assert derive_key(unknown, {"method": "lwm", "structure": "US", "sparsity": 0.5})[0] == (
        "LWM_Han2015Learning_R18_CIFAR10_US_50"
    )
    with pytest.raises(ConfigError, match="not pruned"):
        derive_key(card_key_parts(dense), {"method": "hydra"})
