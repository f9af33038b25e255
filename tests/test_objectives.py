"""Tests of advprune.training.objectives: formulas checked against hand-computed values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.training import objectives
from advprune.training.objectives import (
    MART,
    TRADES,
    FastAT,
    Natural,
    Objective,
    ObjectiveOutput,
    PGDTraining,
    create_objective,
    list_objectives,
    register_objective,
)

# --------------------------------------------------------------------------- helpers

W = [[1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]]
B = [0.1, -0.2, 0.0]
X = [[0.2, 0.7], [0.9, 0.1], [0.5, 0.5]]
Y = [1, 0, 2]
X_ADV = [[0.25, 0.65], [0.85, 0.15], [0.45, 0.55]]


# torch computes in float32, the hand formulas in float64: they agree to a few float32 ulps
# (1.2e-7 relative each), whatever the processor; a wrong term moves the loss by far more
F32_TOL = 1e-5


def linear_model() -> nn.Module:
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W))
        lin.bias.copy_(torch.tensor(B))
    return nn.Sequential(lin)


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(X), torch.tensor(Y), torch.tensor(X_ADV)


def hand_logits(v: list[float], w: list[list[float]] = W, b: list[float] = B) -> list[float]:
    return [sum(w[k][j] * v[j] for j in range(2)) + b[k] for k in range(3)]


def hand_softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(zi - m) for zi in z]
    s = sum(e)
    return [ei / s for ei in e]


def hand_trades(beta: float, w: list[list[float]] = W, b: list[float] = B) -> float:
    """CE(f(x), y) + beta * KL(p || q), both averaged over the batch, in float64."""
    ce, kl = 0.0, 0.0
    for i in range(3):
        p = hand_softmax(hand_logits(X[i], w, b))
        q = hand_softmax(hand_logits(X_ADV[i], w, b))
        ce += -math.log(p[Y[i]])
        kl += sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(3))
    return ce / 3 + beta * kl / 3


def hand_mart(beta: float, w: list[list[float]] = W, b: list[float] = B) -> float:
    """The official MART loss written out per sample, in float64."""
    bce, robust = 0.0, 0.0
    for i in range(3):
        p = hand_softmax(hand_logits(X[i], w, b))
        q = hand_softmax(hand_logits(X_ADV[i], w, b))
        yi = Y[i]
        k_star = max((k for k in range(3) if k != yi), key=lambda k, q=q: q[k])
        bce += -math.log(q[yi]) - math.log(1.0001 - q[k_star] + 1e-12)
        kl = sum(p[k] * (math.log(p[k]) - math.log(q[k] + 1e-12)) for k in range(3))
        robust += kl * (1.0000001 - p[yi])
    return bce / 3 + beta * robust / 3


def finite_difference_grads(
    loss_fn: Callable[[list[list[float]], list[float]], float],
) -> tuple[list[list[float]], list[float]]:
    """Central differences of a hand-written loss(w, b) w.r.t. every weight and bias."""
    h = 1e-6

    def shifted(k: int, j: int | None, sign: float) -> float:
        w = [row[:] for row in W]
        b = B[:]
        if j is None:
            b[k] += sign * h
        else:
            w[k][j] += sign * h
        return loss_fn(w, b)

    gw = [[(shifted(k, j, 1) - shifted(k, j, -1)) / (2 * h) for j in range(2)] for k in range(3)]
    gb = [(shifted(k, None, 1) - shifted(k, None, -1)) / (2 * h) for k in range(3)]
    return gw, gb


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        model[1].weight.mul_(5.0)
    return model


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
    )


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


# --------------------------------------------------------------------------- formulas


def test_natural_is_cross_entropy_by_hand() -> None:
    x, y, _ = tensors()
    out = create_objective("natural")(linear_model(), x, y)
    expected = sum(-math.log(hand_softmax(hand_logits(X[i]))[Y[i]]) for i in range(3)) / 3
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.item() == pytest.approx(expected, rel=F32_TOL)
    assert out.logits.shape == (3, 3)


def test_trades_loss_and_gradient_equal_hand_computation() -> None:
    x, y, x_adv = tensors()
    obj = create_objective("trades", beta=6.0, eps=0.1)
    obj.perturb = lambda model, xx, yy: x_adv  # fix the adversarial example
    model = linear_model()
    out = obj(model, x, y)
    assert hand_trades(1.0) - hand_trades(0.0) > 1e-3  # the robust term is not negligible here
    assert out.loss.item() == pytest.approx(hand_trades(6.0), rel=F32_TOL)
    torch.testing.assert_close(out.logits, linear_model()(x_adv))
    # The gradient flows through the clean and the adversarial logits, as in the official code.
    out.loss.backward()
    gw, gb = finite_difference_grads(lambda w, b: hand_trades(6.0, w, b))
    torch.testing.assert_close(model[0].weight.grad, torch.tensor(gw), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[0].bias.grad, torch.tensor(gb), atol=1e-5, rtol=1e-4)


def test_mart_loss_and_gradient_equal_hand_computation() -> None:
    x, y, x_adv = tensors()
    beta = 5.0
    obj = create_objective("mart", beta=beta, eps=0.1)
    obj.perturb = lambda model, xx, yy: x_adv
    model = linear_model()
    out = obj(model, x, y)
    tops = [
        max(range(3), key=lambda k, i=i: hand_softmax(hand_logits(X_ADV[i]))[k]) for i in range(3)
    ]
    assert tops[0] == Y[0] and tops[2] != Y[2]  # both branches of k* are exercised
    assert out.loss.item() == pytest.approx(hand_mart(beta), rel=F32_TOL)
    torch.testing.assert_close(out.logits, linear_model()(x_adv))
    out.loss.backward()
    gw, gb = finite_difference_grads(lambda w, b: hand_mart(beta, w, b))
    torch.testing.assert_close(model[0].weight.grad, torch.tensor(gw), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[0].bias.grad, torch.tensor(gb), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["pgd", "fast"])
def test_pgd_and_fast_are_ce_on_the_adversarial_batch(name: str) -> None:
    x, y, x_adv = tensors()
    obj = create_objective(name, eps=0.1)
    obj.perturb = lambda model, xx, yy: x_adv
    out = obj(linear_model(), x, y)
    expected = sum(-math.log(hand_softmax(hand_logits(X_ADV[i]))[Y[i]]) for i in range(3)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=F32_TOL)


@pytest.mark.parametrize("name", ["pgd", "trades", "mart", "fast"])
def test_adversarial_loss_exceeds_natural_loss(name: str) -> None:
    model = mlp()
    x, y = batch()
    natural = create_objective("natural")(model, x, y).loss.item()
    torch.manual_seed(0)
    adv = create_objective(name)(model, x, y)
    assert adv.loss.item() >= natural
    if name in ("pgd", "fast"):
        assert adv.loss.item() > natural + 0.05


def test_eps_zero_pgd_equals_natural() -> None:
    model = mlp()
    x, y = batch()
    natural = create_objective("natural")(model, x, y).loss
    for name in ("pgd", "fast", "trades"):
        assert torch.equal(create_objective(name, eps=0)(model, x, y).loss, natural)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["pgd", "trades", "mart", "fast"])
def test_inner_attack_stays_in_ball_and_raises_its_loss(name: str, norm: str) -> None:
    model = mlp()
    x, y = batch()
    x[:2] = 0.0
    x[2:4] = 1.0
    eps = 8 / 255 if norm == "linf" else 0.5
    obj = create_objective(name, eps=eps, norm=norm)
    torch.manual_seed(0)
    x_adv = obj.perturb(model, x, y)
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        if name == "trades":  # the inner loss is the KL to the clean prediction
            p = F.softmax(model(x), dim=1)
            start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
            kl_adv = F.kl_div(F.log_softmax(model(x_adv), dim=1), p, reduction="batchmean")
            kl_start = F.kl_div(F.log_softmax(model(start), dim=1), p, reduction="batchmean")
            assert kl_adv > 100 * kl_start
        else:
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.05


# --------------------------------------------------------------------------- model state


@pytest.mark.parametrize("name", list_objectives())
def test_gradients_flow_to_all_parameters(name: str) -> None:
    model = mlp()
    x, y = batch()
    torch.manual_seed(0)
    out = create_objective(name)(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # the attack left no gradients
    assert out.loss.dim() == 0 and out.loss.requires_grad
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "train_forwards"),
    [("natural", 1), ("pgd", 1), ("fast", 1), ("trades", 2), ("mart", 2)],
)
def test_attack_in_eval_mode_loss_in_callers_mode(name: str, train_forwards: int) -> None:
    model = bn_model()
    model.train()
    seen: list[bool] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = batch()
    torch.manual_seed(0)
    create_objective(name)(model, x, y)
    assert seen.count(True) == train_forwards  # only the loss's forward passes are in train mode
    assert model[2].num_batches_tracked.item() == train_forwards
    assert all(m.training for m in model.modules())


def test_attack_mode_train_is_honoured() -> None:
    model = bn_model()
    model.eval()
    seen: list[bool] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    create_objective("pgd", steps=3, attack_mode="train")(model, *batch())
    assert seen == [True, True, True, False]  # 3 attack steps in train mode, loss in eval mode
    assert not any(m.training for m in model.modules())


# --------------------------------------------------------------------------- registry, config


def test_list_objectives() -> None:
    # the certified ones come from advprune.training.certified
    names = ["crown-ibp", "fast", "ibp", "mart", "mixtrain", "natural", "pgd", "smooth", "trades"]
    assert list_objectives() == names
    assert isinstance(create_objective("PGD"), PGDTraining)
    assert isinstance(create_objective("trades"), TRADES)
    assert isinstance(create_objective("mart"), MART)
    assert isinstance(create_objective("fast"), FastAT)
    assert isinstance(create_objective("natural"), Natural)


def test_unknown_objective_name() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_objective("madry")
    msg = str(info.value)
    assert msg == (
        "unknown objective 'madry'; valid objectives: crown-ibp, fast, ibp, mart, mixtrain, "
        "natural, pgd, smooth, trades"
    )
    assert isinstance(info.value, KeyError)


def test_unknown_kwargs_name_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_objective("pgd", beta=6.0)
    assert str(info.value) == (
        "unknown argument beta for objective 'pgd'; valid arguments: "
        "eps, step_size, steps, norm, random_start, attack_mode"
    )
    with pytest.raises(ConfigError, match="valid arguments: beta, eps, step_size, steps, norm"):
        create_objective("trades", random_start=False, betta=1)
    with pytest.raises(ConfigError, match="valid arguments: none"):
        create_objective("natural", eps=0.1)
    with pytest.raises(ConfigError, match="valid arguments: eps, step_size, norm, attack_mode"):
        create_objective("fast", steps=10)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("pgd", {"eps": 8}, "did you mean 8/255"),
        ("trades", {"beta": -1}, "beta must be >= 0"),
        ("mart", {"attack_mode": "test"}, "valid attack_modes: eval, train, keep"),
        ("pgd", {"steps": 0}, "steps must be >= 1"),
        ("fast", {"step_size": 0}, "step_size must be > 0"),
        ("trades", {"norm": "l1"}, "unknown norm"),
    ],
)
def test_invalid_values(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        create_objective(name, **kwargs)
    assert "\n" not in str(info.value)


def test_config_is_json_and_complete() -> None:
    cfg = create_objective("pgd", eps="8/255", step_size="2/255", steps=10, norm="linf").config()
    assert json.loads(json.dumps(cfg)) == {
        "name": "pgd",
        "eps": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "norm": "linf",
        "attack_mode": "eval",
        "random_start": True,
    }
    trades = create_objective("trades", eps="8/255").config()
    assert trades["beta"] == 6.0 and trades["eps"] == 8 / 255 and trades["norm"] == "linf"
    assert trades["step_size"] == pytest.approx(2 / 255)
    assert create_objective("mart", beta="5").config()["beta"] == 5.0
    fast = create_objective("fast", eps="8/255").config()
    assert fast["name"] == "fast" and fast["step_size"] == pytest.approx(1.25 * 8 / 255)
    assert create_objective("natural").config() == {"name": "natural"}
    for name in list_objectives():
        obj = create_objective(name)
        assert obj.name == name
        json.dumps(obj.config())


def test_register_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))

    @register_objective("scaled")
    class Scaled(Objective):
        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
            logits = model(x)
            return ObjectiveOutput(self.scale * F.cross_entropy(logits, y), logits)

    assert "scaled" in list_objectives()
    obj = create_objective("scaled", scale=2.0)
    assert obj.name == "scaled" and obj.config() == {"name": "scaled"}
    with pytest.raises(ConfigError, match="valid arguments: scale"):
        create_objective("scaled", eps=1)
    with pytest.raises(ConfigError, match="already registered"):

        @register_objective("pgd")
        class Other(Objective):
            def __call__(
                self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
            ) -> ObjectiveOutput:
                raise NotImplementedError
