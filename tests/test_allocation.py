"""Layer allocation strategies: exact totals, the n^p rule by hand, ERK / LAMP properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.methods import create_method
from advprune.models import create
from advprune.sparsity import (
    allocate,
    compact_shape,
    kept_count,
    list_allocations,
    prunable_layers,
    sparsity_report,
    unit_size,
)


def _layers(*sizes: int) -> dict[str, nn.Module]:
    return prunable_layers(nn.Sequential(*[nn.Linear(s, s, bias=False) for s in sizes]))


def _kept(layers: dict[str, nn.Module], densities: dict[str, float], granularity: str) -> int:
    total = 0
    for name, m in layers.items():
        n = math.prod(compact_shape(m.weight.shape, granularity))
        total += kept_count(n, densities[name]) * unit_size(m.weight.shape, granularity)
    return total


@pytest.fixture(scope="module")
def digits_layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return prunable_layers(create("digits_cnn"))


def test_list_allocations() -> None:
    assert list_allocations() == ["erk", "global", "lamp", "np", "uniform"]


def test_np_rule_matches_hand_computed_example_with_capping() -> None:
    # n = 100, 400, 10000 weights; p = 0.5: density ∝ n^-1/2 = 0.1, 0.05, 0.01, i.e. kept
    # weights ∝ 10, 20, 100. Sparsity 0.8 keeps 2100 of 10500: scale 2100 / 130 = 16.15 puts
    # the first layer at density 1.615 -> capped at 1 (100 kept); the other 2000 split 20:100
    # -> 333.33 and 1666.67 kept -> 333 and 1667 (largest remainder), summing to 2100.
    layers = _layers(10, 20, 100)
    d = allocate("np", layers, 0.8, p=0.5)
    kept = {n: round(d[n] * m.weight.numel()) for n, m in layers.items()}
    assert kept == {"0": 100, "1": 333, "2": 1667}
    assert d["0"] == 1.0
    # p = 1 is uniform density; a larger sparsity caps nothing
    d = allocate("np", layers, 0.9, p=1.0)
    assert sum(round(d[n] * m.weight.numel()) for n, m in layers.items()) == 1050
    assert all(abs(v - 0.1) <= 1 / layers[n].weight.numel() for n, v in d.items())


def test_np_caps_several_layers_smallest_first() -> None:
    # sparsity 0.5 keeps 5250: scale 40.4 caps layers 0 and 1 (densities 4.04, 2.02); the
    # last layer keeps the remaining 5250 - 500 = 4750
    layers = _layers(10, 20, 100)
    d = allocate("np", layers, 0.5, p=0.5)
    assert (d["0"], d["1"]) == (1.0, 1.0)
    assert round(d["2"] * 10000) == 4750


@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("strategy", ["uniform", "erk", "lamp", "global", "np"])
def test_every_strategy_reaches_the_target_exactly(digits_layers, strategy, sparsity) -> None:
    d = allocate(strategy, digits_layers, sparsity)
    total = sum(m.weight.numel() for m in digits_layers.values())
    assert _kept(digits_layers, d, "unstructured") == round((1 - sparsity) * total)
    assert all(0 < v <= 1 for v in d.values())


@pytest.mark.parametrize("granularity", ["filters", "channels"])
@pytest.mark.parametrize("strategy", ["uniform", "erk", "lamp", "global", "np"])
def test_structured_totals_within_one_unit(digits_layers, strategy, granularity) -> None:
    d = allocate(strategy, digits_layers, 0.75, granularity=granularity)
    total = sum(m.weight.numel() for m in digits_layers.values())
    largest = max(unit_size(m.weight.shape, granularity) for m in digits_layers.values())
    assert abs(_kept(digits_layers, d, granularity) - round(0.25 * total)) <= largest
    for name, m in digits_layers.items():  # whole units
        n = math.prod(compact_shape(m.weight.shape, granularity))
        assert d[name] * n == pytest.approx(round(d[name] * n), abs=1e-9)


def test_uniform_keeps_every_layer_within_one_weight(digits_layers) -> None:
    d = allocate("uniform", digits_layers, 0.95)
    for name, m in digits_layers.items():
        assert abs(d[name] * m.weight.numel() - 0.05 * m.weight.numel()) <= 1


def test_erk_density_follows_its_formula_and_favours_small_layers(digits_layers) -> None:
    d = allocate("erk", digits_layers, 0.9)
    ratio = {n: sum(m.weight.shape) / m.weight.numel() for n, m in digits_layers.items()}
    free = [n for n in d if d[n] < 1]
    assert len(free) >= 2 and len(free) < len(d)  # the first conv (288 weights) is capped

    # uncapped layers: density / ratio is one constant (up to one weight of rounding)
    def tol(n: str) -> float:
        return 1.0 / digits_layers[n].weight.numel() / ratio[n]

    for n in free:
        assert abs(d[n] / ratio[n] - d[free[0]] / ratio[free[0]]) <= tol(n) + tol(free[0]) + 1e-9
    # a capped layer's ratio is at least that of every uncapped one
    capped = [n for n in d if d[n] == 1]
    assert min(ratio[n] for n in capped) >= max(ratio[n] for n in free)


def test_lamp_keeps_the_largest_weights_under_one_global_score_threshold() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        net[1].weight.mul_(100.0)  # a global magnitude ranking would starve layer 0
    layers = prunable_layers(net)
    lamp = allocate("lamp", layers, 0.8)
    glob = allocate("global", layers, 0.8)
    assert glob["0"] == 1 / 64  # only its forced top weight survives the global ranking
    assert lamp["0"] > 0.1  # LAMP is scale-invariant per layer
    # scale invariance: rescaling one layer does not change the LAMP allocation
    with torch.no_grad():
        net[1].weight.div_(100.0)
    assert allocate("lamp", layers, 0.8) == lamp
    # by hand: LAMP scores within a layer are w_u^2 / sum of w_v^2 over |w_v| >= |w_u|
    from advprune.sparsity.allocation import _lamp_scores

    s = _lamp_scores(torch.tensor([1.0, 3.0, 2.0]))
    assert torch.allclose(s, torch.tensor([1 / 14, 1.0, 4 / 13], dtype=torch.float64))


def test_global_allocation_equals_lwm_global_scope() -> None:
    torch.manual_seed(0)
    a, b = create("digits_cnn"), create("digits_cnn")
    b.load_state_dict(a.state_dict())
    da = create_method("lwm", 0.95, scope="global").prune(a)
    db = create_method("lwm", 0.95, allocation="global").prune(b)
    assert da == db
    assert sparsity_report(a).kept == sparsity_report(b).kept


def test_unreachable_targets_and_bad_parameters_are_one_line_errors(digits_layers) -> None:
    with pytest.raises(ConfigError, match="cannot be reached over 5 layers"):
        allocate("np", digits_layers, 0.99, granularity="channels")
    with pytest.raises(ConfigError, match="cannot be reached"):
        allocate("uniform", _layers(2, 2), 0.9)  # 8 weights: one per layer is 25 %
    with pytest.raises(UnknownNameError, match="valid allocations"):
        allocate("random", digits_layers, 0.5)
    with pytest.raises(ConfigError, match="unknown parameter"):
        allocate("erk", digits_layers, 0.5, p=0.1)
    with pytest.raises(ConfigError, match="no prunable layers"):
        allocate("uniform", {}, 0.5)
    with pytest.raises(ConfigError, match="scope 'global' is allocation 'global'"):
        create_method("lwm", 0.5, scope="global", allocation="erk")
    with pytest.raises(UnknownNameError, match="valid allocations"):
        create_method("lwm", 0.5, allocation="erkk")
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_method("lwm", 0.5, allocation="uniform", allocation_params={"p": 0.5})


def test_method_records_and_restores_its_allocation() -> None:
    from advprune.methods import method_from_config

    m = create_method("lwm", 0.9, allocation="np", allocation_params={"p": 0.3})
    cfg = m.config()
    assert cfg["allocation"] == "np" and cfg["allocation_params"] == {"p": 0.3}
    again = method_from_config(cfg)
    assert (again.allocation, again.allocation_params) == ("np", {"p": 0.3})
    assert create_method("lwm", 0.9).allocation == "uniform"
    assert create_method("lwm", 0.9, allocation="global").scope == "global"
