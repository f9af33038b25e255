"""Tests of advprune.attacks: PGD and FGSM-RS (L∞ and L2)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advprune.attacks import FGSM, MODEL_MODES, PGD, model_mode_scope
from advprune.errors import AdvpruneError, ConfigError

EPS = {"linf": 8 / 255, "l2": 0.5}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mlp(seed: int = 0, n_in: int = 48, n_out: int = 5) -> nn.Module:
    """2-layer MLP whose first layer is scaled up so that eps = 8/255 changes the loss clearly."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 32), nn.ReLU(), nn.Linear(32, n_out))
    with torch.no_grad():
        model[1].weight.mul_(5.0)
    return model


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
    )


def batch(n: int = 32, seed: int = 1, edges: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    if edges:  # inputs exactly at the box boundary
        x[:4] = 0.0
        x[4:8] = 1.0
        x[8:12, 0] = 0.0
        x[8:12, 1] = 1.0
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def per_sample_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def random_noise(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Random perturbation of exactly norm eps (L∞: random signs), clamped to [0, 1]."""
    if norm == "linf":
        delta = eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)
    else:
        delta = torch.randn_like(x)
        delta = eps * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1)


def dist(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1).double()
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)


# --------------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_increases_loss_over_clean_and_random_noise(norm: str) -> None:
    model = mlp()
    x, y = batch(edges=False)
    torch.manual_seed(0)
    x_adv = PGD(eps=EPS[norm], steps=10, norm=norm)(model, x, y)
    clean = per_sample_ce(model, x, y)
    adv = per_sample_ce(model, x_adv, y)
    torch.manual_seed(1)
    noise = torch.stack(
        [per_sample_ce(model, random_noise(x, EPS[norm], norm), y) for _ in range(10)]
    ).amax(dim=0)
    assert (adv >= clean - 1e-6).all()
    assert (adv >= noise - 1e-6).all()
    assert adv.mean() > clean.mean() + 0.1
    assert adv.mean() > noise.mean() + 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_steps_do_not_hurt_and_fgsm_is_weaker_than_pgd(norm: str) -> None:
    model = mlp()
    x, y = batch(edges=False)
    torch.manual_seed(0)
    fgsm = per_sample_ce(model, FGSM(eps=EPS[norm], norm=norm)(model, x, y), y).mean()
    pgd = per_sample_ce(model, PGD(eps=EPS[norm], steps=20, norm=norm)(model, x, y), y).mean()
    clean = per_sample_ce(model, x, y).mean()
    assert clean < fgsm <= pgd + 1e-6


@pytest.mark.parametrize("random_start", [False, True])
def test_linf_pgd_reaches_closed_form_optimum_of_linear_model(random_start: bool) -> None:
    # 2-class linear model: CE(y) grows with (w_other - w_y)·x, so the L∞ optimum inside the
    # ball (box inactive since x is in [0.3, 0.7] and eps = 0.1) is x - eps·sign(w_y - w_other).
    torch.manual_seed(3)
    lin = nn.Linear(10, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 10))
        lin.weight[0, 0] = lin.weight[1, 0] + 0.5  # every coordinate has a non-zero difference
    model = nn.Sequential(lin)
    x = 0.3 + 0.4 * torch.rand(12, 10)
    y = torch.tensor([0, 1] * 6)
    eps = 0.1
    w = lin.weight.detach()
    w_diff = w[y] - w[1 - y]
    assert (w_diff != 0).all()
    expected = x - eps * torch.sign(w_diff)
    x_adv = PGD(eps=eps, steps=10, random_start=random_start)(model, x, y)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)


def test_l2_pgd_reaches_closed_form_optimum_of_linear_model() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(10, 2)
    model = nn.Sequential(lin)
    x = 0.3 + 0.4 * torch.rand(8, 10)
    y = torch.tensor([0, 1] * 4)
    eps = 0.2  # < 0.3: the box is inactive
    w = lin.weight.detach()
    u = w[1 - y] - w[y]
    expected = x + eps * u / u.norm(dim=1, keepdim=True)
    x_adv = PGD(eps=eps, steps=10, norm="l2", random_start=False)(model, x, y)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    # From a random start, the iterate converges to the same point.
    torch.manual_seed(0)
    x_rs = PGD(eps=eps, step_size=eps, steps=30, norm="l2", random_start=True)(model, x, y)
    torch.testing.assert_close(x_rs, expected, atol=1e-3, rtol=0)


def test_step_size_is_honoured() -> None:
    model = mlp()
    x, y = batch(edges=False)
    x = 0.25 + 0.5 * x  # interior: no clamping to the box
    eps = 0.1
    x_adv = PGD(eps=eps, step_size=0.03, steps=1, random_start=False)(model, x, y)
    moved = (x_adv - x).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.03), atol=1e-6)
    assert (moved > 0).float().mean() > 0.9
    x_l2 = PGD(eps=1.0, step_size=0.3, steps=1, norm="l2", random_start=False)(model, x, y)
    torch.testing.assert_close(
        dist(x_l2, x, "l2"), torch.full((32,), 0.3).double(), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack_cls", [PGD, FGSM])
def test_stays_in_ball_and_box(attack_cls: type, norm: str, device: str) -> None:
    model = mlp().to(device)
    x, y = batch()
    x, y = x.to(device), y.to(device)
    eps = EPS[norm] if norm == "linf" else 2.0  # large L2 radius: the box is active
    for seed in range(3):
        torch.manual_seed(seed)
        x_adv = attack_cls(eps=eps, norm=norm)(model, x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
        assert not x_adv.requires_grad
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert (dist(x_adv, x, norm) <= eps + 1e-6).all()
        assert (
            (x_adv != x).flatten(1).any(dim=1).all()
        )  # every sample, also at 0 and 1, was perturbed


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_in_ball_and_box(norm: str) -> None:
    from advprune.attacks import sample_random_start

    x, _ = batch()
    torch.manual_seed(0)
    x0 = sample_random_start(x, EPS[norm], norm)
    assert x0.min() >= 0 and x0.max() <= 1
    assert (dist(x0, x, norm) <= EPS[norm] + 1e-6).all()
    assert (dist(x0, x, norm)[12:] > 0.5 * EPS[norm]).all()  # not degenerate


@pytest.mark.parametrize("attack_cls", [PGD, FGSM])
def test_eps_zero_returns_clone_of_x(attack_cls: type) -> None:
    model = mlp()
    x, y = batch()
    x_adv = attack_cls(eps=0)(model, x, y)
    assert torch.equal(x_adv, x)
    assert x_adv.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- model state


def test_per_module_modes_restored() -> None:
    model = bn_model()
    model.train()
    model[2].eval()  # frozen BN inside a model in train mode
    flags = [m.training for m in model.modules()]
    for mode in MODEL_MODES:
        PGD(steps=2, model_mode=mode)(model, *batch())
        assert [m.training for m in model.modules()] == flags
    model.eval()
    model[1].train()
    flags = [m.training for m in model.modules()]
    PGD(steps=2, model_mode="train")(model, *batch())
    assert [m.training for m in model.modules()] == flags


class Boom(nn.Module):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("mode", MODEL_MODES)
def test_modes_restored_after_exception_in_model(mode: str) -> None:
    model = nn.Sequential(bn_model(), Boom(after=2))
    model.train()
    model[0][2].eval()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        PGD(steps=5, model_mode=mode)(model, *batch())
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize(
    ("mode", "initial", "expected"),
    [("train", False, True), ("eval", True, False), ("keep", True, True), ("keep", False, False)],
)
def test_model_mode_seen_by_batchnorm(mode: str, initial: bool, expected: bool) -> None:
    model = bn_model()
    model.train(initial)
    seen: list[bool] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    stats_before = model[2].running_mean.clone()
    PGD(steps=3, model_mode=mode)(model, *batch())
    assert seen == [expected] * 3
    assert model.training is initial
    # Running statistics change only when the attack runs the model in train mode.
    assert torch.equal(model[2].running_mean, stats_before) is (not expected)


def test_model_mode_scope_rejects_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="model_mode"), model_mode_scope(mlp(), "test"):
        pass


def test_no_gradients_on_parameters_and_input_untouched() -> None:
    model = bn_model()
    x, y = batch()
    x.requires_grad_(True)
    x_before = x.detach().clone()
    PGD(steps=3)(model, x, y)
    FGSM()(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and torch.equal(x.detach(), x_before)
    # Existing gradients are left exactly as they were.
    F.cross_entropy(model(x_before), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    PGD(steps=3)(model, x_before, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_deterministic_under_seed() -> None:
    model = mlp()
    x, y = batch()
    for attack in (PGD(steps=5), PGD(steps=5, norm="l2", eps=0.5), FGSM()):
        torch.manual_seed(123)
        a = attack(model, x, y)
        torch.manual_seed(123)
        b = attack(model, x, y)
        torch.manual_seed(124)
        c = attack(model, x, y)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


# --------------------------------------------------------------------------- contexts


def test_works_under_no_grad_and_inference_mode() -> None:
    model = mlp()
    x, y = batch()
    torch.manual_seed(0)
    ref = PGD(steps=3)(model, x, y)
    with torch.no_grad():
        torch.manual_seed(0)
        a = PGD(steps=3)(model, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        torch.manual_seed(0)
        b = PGD(steps=3)(model, xi, yi)
    assert torch.equal(ref, a) and torch.equal(ref, b)


def test_works_under_autocast() -> None:
    model = mlp()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = PGD(steps=5)(model, x, y)
    assert x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert (dist(x_adv, x, "linf") <= EPS["linf"] + 1e-6).all()
    assert per_sample_ce(model, x_adv, y).mean() > per_sample_ce(model, x, y).mean() + 0.05


def test_custom_loss_callable_is_maximised() -> None:
    model = mlp()
    x, y = batch(edges=False)

    def neg_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(logits, labels)

    x_adv = PGD(steps=5, loss=neg_ce)(model, x, y)
    assert per_sample_ce(model, x_adv, y).mean() < per_sample_ce(model, x, y).mean() - 0.05
    assert PGD(loss=neg_ce).config()["loss"].endswith("neg_ce")


# --------------------------------------------------------------------------- arguments


def test_defaults_and_config() -> None:
    pgd = PGD()
    assert pgd.eps == 8 / 255 and pgd.steps == 10 and pgd.norm == "linf"
    assert pgd.step_size == pytest.approx(2.5 * (8 / 255) / 10)
    assert pgd.random_start is True and pgd.model_mode == "eval"
    cfg = json.loads(json.dumps(PGD(eps="8/255", step_size="2/255", norm="Linf").config()))
    assert cfg == {
        "name": "pgd",
        "eps": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "norm": "linf",
        "random_start": True,
        "model_mode": "eval",
        "loss": "ce",
    }
    fgsm = FGSM(eps="8/255")
    assert fgsm.step_size == pytest.approx(1.25 * 8 / 255) and fgsm.steps == 1
    assert fgsm.config()["name"] == "fgsm" and fgsm.random_start
    assert PGD(eps=0.5, norm="l2", steps=20).step_size == pytest.approx(2.5 * 0.5 / 20)
    assert "PGD(eps=" in repr(pgd)


def test_eps_fraction_string_is_exact() -> None:
    assert PGD(eps="8/255").eps == 8 / 255
    assert FGSM(eps=" 16/255 ").eps == 16 / 255


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 8}, "did you mean 8/255"),
        ({"eps": -0.1}, "eps must be >= 0"),
        ({"eps": "eight"}, "eps must be a number"),
        ({"norm": "l3"}, "unknown norm"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"step_size": 0}, "step_size must be > 0"),
        ({"step_size": -0.01}, "step_size must be > 0"),
        ({"model_mode": "test"}, "valid model_modes: eval, train, keep"),
        ({"loss": "mse"}, "unknown loss 'mse'"),
        ({"random_start": "yes"}, "random_start"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        PGD(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, AdvpruneError)


def test_l2_eps_above_one_is_allowed_and_fgsm_validates() -> None:
    assert PGD(eps=2.0, norm="l2").eps == 2.0
    with pytest.raises(ConfigError, match="8/255"):
        FGSM(eps=8)
    with pytest.raises(ConfigError, match="step_size"):
        FGSM(step_size=0)


def test_label_shape_mismatch_is_reported() -> None:
    x, y = batch()
    with pytest.raises(ConfigError, match="labels must have shape"):
        PGD()(mlp(), x, y[:5])
