"""Tests of advprune.certify.bounds and verify: soundness against sampled and attacked points,
exact intervals on hand-built networks, tightness of CROWN, masked layers, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advprune.attacks import PGD
from advprune.attacks.pgd import projected_gradient_ascent
from advprune.certify import BoundedModel, margin_spec, verified_accuracy, verify_batch
from advprune.errors import ConfigError, UnknownNameError
from advprune.models import Normalize, create
from advprune.models.resnet import BasicBlock
from advprune.sparsity import attach_scores, export_dense, prunable_layers, prune_magnitude

METHODS = ("ibp", "crown-ibp", "crown")
TOL = 1e-5  # float32 rounding between the bound arithmetic and the forward pass


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm is not ~identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    return model.eval()


class TinyResNet(nn.Module):
    """normalize -> conv/bn/relu -> two residual blocks (projection and identity shortcut)
    -> global average pool -> linear: the residual path of the shipped ResNets, small."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.25,))
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.block1 = BasicBlock(4, 8, stride=2)
        self.block2 = BasicBlock(8, 8, stride=1)
        self.linear = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.block2(self.block1(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    digits = _randomise_bn(create("digits_cnn", in_channels=1, width=4, mean=0.3, std=0.4))
    cnn7 = _randomise_bn(
        create("cnn7", in_channels=1, image_size=8, width=4, linear_width=16, mean=0.3, std=0.4)
    )
    masked = _randomise_bn(create("digits_cnn", in_channels=1, width=4))
    prune_magnitude(masked, 0.7)
    # the robust-binary-subnetwork variant: non-affine BatchNorm, 1x1-conv head + logits BN
    binary_head = _randomise_bn(
        create("digits_cnn", in_channels=1, width=4, head="conv-bn", bn_affine=False)
    )
    return {
        "digits_cnn": digits,
        "digits_cnn_conv_bn_head": binary_head,
        "cnn7": cnn7,
        "resnet_block": _randomise_bn(TinyResNet()),
        "digits_cnn_masked": masked,
    }


MODELS = _models()


def _points_in_ball(x: torch.Tensor, eps: float, per_input: int) -> torch.Tensor:
    """Uniform points and random vertices of the eps-ball, clipped to [0, 1]: (N, P, ...)."""
    shape = (x.shape[0], per_input, *x.shape[1:])
    uniform = (torch.rand(shape) * 2 - 1) * eps
    vertices = torch.randint(0, 2, shape).float() * 2 * eps - eps
    delta = torch.where(torch.arange(per_input).view(1, -1, *[1] * (x.dim() - 1)) % 2 == 0,
                        uniform, vertices)  # fmt: skip
    return (x.unsqueeze(1) + delta).clamp(0, 1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_bounds_contain_logits_of_thousands_of_points_in_the_ball(name, method):
    torch.manual_seed(1)
    model = MODELS[name]
    x, eps = torch.rand(3, 1, 8, 8), 0.03
    bm = BoundedModel(model, (1, 8, 8))
    with torch.no_grad():
        r = bm.compute(x, eps, method=method, intersect=False)  # the raw bounds
        points = _points_in_ball(x, eps, 1000)  # 3000 points
        logits = model(points.flatten(0, 1)).view(3, 1000, -1)
        assert torch.allclose(r.clean, model(x), atol=1e-6)
    assert (logits >= r.lower.unsqueeze(1) - TOL).all()
    assert (logits <= r.upper.unsqueeze(1) + TOL).all()
    # and not vacuous: the bound is finite and wider than the sampled spread only moderately
    assert torch.isfinite(r.lower).all() and torch.isfinite(r.upper).all()


@pytest.mark.parametrize("method", METHODS)
def test_bounds_hold_against_gradient_attacks_on_every_logit(method):
    """Points found by PGD maximising / minimising each logit stay inside the bounds (the
    strongest evidence of soundness short of exact verification)."""
    torch.manual_seed(2)
    model, eps = MODELS["digits_cnn"], 0.03
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        r = BoundedModel(model).compute(x, eps, method=method, intersect=False)
    for k in range(10):
        for sign in (1.0, -1.0):
            start = _points_in_ball(x, eps, 1)[:, 0]
            x_adv = projected_gradient_ascent(
                model, x, None, lambda z, _y, k=k, s=sign: s * z[:, k].sum(),
                eps=eps, step_size=eps / 8, steps=30, x_init=start,
            )  # fmt: skip
            with torch.no_grad():
                z = model(x_adv)[:, k]
            if sign > 0:
                assert (z <= r.upper[:, k] + TOL).all()
            else:
                assert (z >= r.lower[:, k] - TOL).all()


class AbsDiff(nn.Module):
    """Hand-built two-layer network on a 1x1x2 "image" x = (x1, x2):

    normalize (mean 0.5, std 0.5: z = 2x - 1) -> h = relu([[.5, -.5], [-.5, .5]] z)
    = (relu(x1 - x2), relu(x2 - x1)) -> y = [[1, 1], [1, -1]] h = (|x1 - x2|, x1 - x2).
    """

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.5,))
        self.fc1 = nn.Linear(2, 2, bias=False)
        self.fc2 = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
            self.fc2.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(self.normalize(x), 1))))


def test_hand_built_network_exact_intervals():
    """Over the whole unit square (x = (0.5, 0.5), eps = 0.5): |x1 - x2| in [0, 1] and
    x1 - x2 in [-1, 1] exactly. CROWN finds both exact intervals: its upper line for
    relu(z) on [-1, 1] is (z + 1) / 2, and the two lines add up to 1; the lower slope is 0
    (u = -l). IBP treats the two ReLUs as independent: |x1 - x2| in [0, 2]."""
    bm = BoundedModel(AbsDiff(), (1, 1, 2))
    x = torch.full((1, 1, 1, 2), 0.5)
    with torch.no_grad():
        for method in ("crown", "crown-ibp"):
            lo, hi = bm.bounds(x, 0.5, method)
            assert torch.allclose(lo, torch.tensor([[0.0, -1.0]]), atol=1e-6)
            assert torch.allclose(hi, torch.tensor([[1.0, 1.0]]), atol=1e-6)
        lo, hi = bm.bounds(x, 0.5, "ibp")
    assert torch.allclose(lo, torch.tensor([[0.0, -1.0]]), atol=1e-6)
    assert torch.allclose(hi, torch.tensor([[2.0, 1.0]]), atol=1e-6)
    # a smaller box, clipped to [0, 1]: x = (0.45, 0.1), eps 0.25 gives x1 in [0.2, 0.7] and
    # x2 in [0, 0.35] (clipped at 0): x1 - x2 in [-0.15, 0.7] and |x1 - x2| in [0, 0.7];
    # CROWN's upper lines for the two ReLUs add up to 0.647 d + 0.247, 0.7 at d = 0.7
    x = torch.tensor([[[[0.45, 0.1]]]])
    with torch.no_grad():
        lo, hi = bm.bounds(x, 0.25, "crown")
    assert torch.allclose(lo, torch.tensor([[0.0, -0.15]]), atol=1e-6)
    assert torch.allclose(hi, torch.tensor([[0.7, 0.7]]), atol=1e-6)


def test_max_pool_relaxation_is_exact_when_one_input_dominates():
    """max over a 2x2 window: IBP and CROWN give [max l, max u]; when one element's lower
    bound beats every other upper bound, CROWN's bound is that element's exact interval."""

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normalize = Normalize.identity(1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.pool(self.normalize(x)), 1)

    x = torch.tensor([[[[0.9, 0.2], [0.1, 0.3]]]])
    bm = BoundedModel(Pool(), (1, 2, 2))
    with torch.no_grad():
        for method in METHODS:
            lo, hi = bm.bounds(x, 0.1, method)
            assert torch.allclose(lo, torch.tensor([[0.8]])) and torch.allclose(
                hi, torch.tensor([[1.0]])
            )
        x = torch.tensor([[[[0.5, 0.45], [0.1, 0.3]]]])  # undecided: max in [0.4, 0.6]
        for method in METHODS:
            lo, hi = bm.bounds(x, 0.1, method)
            assert torch.allclose(lo, torch.tensor([[0.4]])) and torch.allclose(
                hi, torch.tensor([[0.6]])
            )


def test_crown_at_least_as_tight_as_ibp_and_tighter_on_average():
    torch.manual_seed(3)
    model = MODELS["digits_cnn"]
    x = torch.rand(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    bm = BoundedModel(model, (1, 8, 8))
    with torch.no_grad():
        ibp = bm.compute(x, 0.02, method="ibp", labels=y)
        for method in ("crown-ibp", "crown"):
            r = bm.compute(x, 0.02, method=method, labels=y)
            assert (r.lower >= ibp.lower - 1e-6).all() and (r.upper <= ibp.upper + 1e-6).all()
            raw = bm.compute(x, 0.02, method=method, labels=y, intersect=False)
            # the relaxation itself (before intersecting with IBP) is much tighter
            assert (raw.upper - raw.lower).mean() < 0.5 * (ibp.upper - ibp.lower).mean()
        crown_ibp = bm.compute(x, 0.02, method="crown-ibp", labels=y, intersect=False)
        crown = bm.compute(x, 0.02, method="crown", labels=y, intersect=False)
    # CROWN's intermediate bounds beat IBP's, so full CROWN beats CROWN-IBP
    assert (crown.upper - crown.lower).mean() < (crown_ibp.upper - crown_ibp.lower).mean()


def test_masked_layers_use_the_effective_weight_and_pass_gradients_to_scores():
    torch.manual_seed(4)
    masked = MODELS["digits_cnn_masked"]
    dense = export_dense(masked)  # same function, masks folded into plain weights
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        for method in METHODS:
            a = BoundedModel(masked).bounds(x, 0.02, method)
            b = BoundedModel(dense).bounds(x, 0.02, method)
            assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    scored = create("digits_cnn", in_channels=1, width=4)
    layers = prunable_layers(scored)
    masks = attach_scores(scored, {n: 0.5 for n in layers}, layers=layers)
    r = BoundedModel(scored).compute(x, 0.02, method="crown-ibp", labels=torch.tensor([0, 1, 2]))
    F.cross_entropy(-r.lower, torch.tensor([0, 1, 2])).backward()
    assert all(m.scores.grad is not None and m.scores.grad.abs().sum() > 0 for m in masks.values())


def test_train_mode_batchnorm_uses_the_clean_batch_statistics():
    """In train mode the bounds use the BatchNorm statistics of the clean batch, the same the
    forward pass uses: at eps = 0 they collapse onto the train-mode logits."""
    torch.manual_seed(5)
    model = create("digits_cnn", in_channels=1, width=4).train()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        for method in METHODS:
            r = BoundedModel(model).compute(x, 0.0, method=method)
            assert torch.allclose(r.clean, expected, atol=1e-5)
            assert torch.allclose(r.lower, expected, atol=1e-4)
            assert torch.allclose(r.upper, expected, atol=1e-4)


def test_margin_spec_rows():
    spec = margin_spec(torch.tensor([2]), 4)
    assert spec.shape == (1, 4, 4)
    z = torch.tensor([[1.0, 5.0, 3.0, -1.0]])
    assert torch.equal(torch.einsum("nsk,nk->ns", spec, z), torch.tensor([[2.0, -2.0, 0.0, 4.0]]))


def test_unsupported_layers_and_bad_input_are_one_line_errors():
    class WithTanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(torch.flatten(x, 1)))

    class WithSigmoid(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(torch.flatten(x, 1))

    class WithCat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], 1).flatten(1)

    for model, word in ((WithTanh(), "Tanh"), (WithSigmoid(), "sigmoid"), (WithCat(), "cat")):
        with pytest.raises(ConfigError) as info:
            BoundedModel(model)
        assert word in str(info.value) and "\n" not in str(info.value)
    bm = BoundedModel(create("resnet18"))  # IBP / CROWN-IBP are fine ...
    assert bm.check_method("crown-ibp", (3, 32, 32)) == "crown-ibp"
    with pytest.raises(ConfigError, match="full CROWN on 'resnet18'"):  # ... full CROWN is not
        bm.check_method("crown", (3, 32, 32))
    small = BoundedModel(MODELS["digits_cnn"])
    x = torch.rand(1, 1, 8, 8)
    for eps in (1.5, -0.1, "2"):
        with pytest.raises(ConfigError, match="eps"):
            small.compute(x, eps)
    with pytest.raises(UnknownNameError, match="bound method"):
        small.compute(x, 0.1, method="deeppoly")


def _natural_digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from advprune.data import load_dataset

    torch.manual_seed(6)
    splits = load_dataset("digits", val_fraction=0.0)
    xs = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    ys = torch.tensor([splits.train[i][1] for i in range(len(splits.train))])
    model = create("digits_cnn", in_channels=1, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for i in range(0, len(ys), 64):
            opt.zero_grad()
            F.cross_entropy(model(xs[i : i + 64]), ys[i : i + 64]).backward()
            opt.step()
    model.eval()
    xt = torch.stack([splits.test[i][0] for i in range(120)])
    yt = torch.tensor([splits.test[i][1] for i in range(120)])
    return model, xt, yt


def test_verified_points_resist_pgd_and_verified_accuracy_never_exceeds_robust_accuracy():
    model, x, y = _natural_digits_model()
    bm = BoundedModel(model, (1, 8, 8))
    loader = [(x[:60], y[:60]), (x[60:], y[60:])]
    for eps in (0.002, 0.02):  # PGD breaks no point at the first, about 6 % at the second
        attack = PGD(eps=eps, steps=20)
        with torch.no_grad():
            pgd_ok = model(attack(model, x, y)).argmax(1) == y
        counts = []
        for method in METHODS:
            _, verified = verify_batch(bm, x, y, eps, method)
            assert not (verified & ~pgd_ok).any()  # every verified point survives PGD
            counts.append(int(verified.sum()))
        assert counts == sorted(counts)  # IBP <= CROWN-IBP <= CROWN
        assert 0 < counts[-1] < len(y)  # a non-trivial split
        results = [verified_accuracy(model, loader, eps, m, input_shape=(1, 8, 8)) for m in METHODS]
        assert [round(r.verified_accuracy * len(y)) for r in results] == counts
        assert all(r.verified_accuracy <= int(pgd_ok.sum()) / len(y) for r in results)
        assert results[-1].n == 120 and len(results[-1].verified) == 120
    assert not model.training


def test_eval_cli_certify_writes_certified_entries(tmp_path, capsys):
    """``advprune eval --certify``: certified entries (method and settings recorded) in the
    report format of the attacks, alone or after an attack; bad settings: one line, exit 2."""
    import json

    from advprune.checkpoint import save_checkpoint
    from advprune.cli import main

    model, _, _ = _natural_digits_model()
    card = {"objective": {"name": "smooth", "sigma": 0.5}}
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, card)
    out = tmp_path / "cert"
    args = ["eval", str(ckpt), "--n", "24", "--eps", "0.002", "--no-progress"]
    rc = main(
        [*args, "--certify", "ibp,crown,smoothing", "--smoothing-n", "300", "--out", str(out)]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    entries = {e["name"]: e for e in report["entries"]}
    assert list(entries) == ["ibp", "crown", "smoothing"]
    assert all(e["kind"] == "certified" for e in entries.values())
    assert entries["crown"]["config"]["intermediate_bounds"] == "crown"
    assert entries["ibp"]["robust_accuracy"] <= entries["crown"]["robust_accuracy"]
    assert entries["crown"]["robust_accuracy"] <= report["clean_accuracy"]
    smooth = entries["smoothing"]
    assert smooth["config"]["sigma"] == 0.5  # the training sigma of the card
    assert (smooth["config"]["n"], smooth["config"]["n0"], smooth["config"]["alpha"]) == (
        300, 100, 0.001
    )  # fmt: skip
    assert set(smooth["robust_accuracy_at"]) >= {"0", "0.25", "0.5"}
    assert report["robust_accuracy"] is None  # no attack ran
    assert (out / "certified_accuracy.png").exists() and (out / "certified_per_sample.npz").exists()
    capsys.readouterr()
    rc = main([*args, "--attacks", "pgd", "--certify", "crown-ibp", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and [e["kind"] for e in report["entries"]] == ["empirical", "certified"]
    pgd, cert = report["entries"]
    assert cert["robust_accuracy"] <= pgd["robust_accuracy"]
    for bad, word in (("--certify=deeppoly", "certifier"), ("--sigma=-1", "sigma")):
        rc = main(
            [*args, "--certify", "smoothing", bad] if bad.startswith("--sigma") else [*args, bad]
        )
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and word in err


@pytest.mark.parametrize("name", ["cnn7", "resnet18", "resnet50", "vgg16", "wrn28_4"])
def test_shipped_cifar_architectures_trace_and_ibp_bounds_hold(name):
    """IBP and CROWN-IBP run on the shipped CIFAR architectures (residual blocks, bottlenecks,
    pre-activation blocks, max-pool stacks); full CROWN is refused for them (too many
    neurons). vgg16_bn and wrn28_10 are the same layer types, larger."""
    torch.manual_seed(7)
    model = _randomise_bn(create(name))
    bm = BoundedModel(model, (3, 32, 32))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        lo, hi = bm.bounds(x, 1 / 255, "ibp")
        logits = model(_points_in_ball(x, 1 / 255, 16)[0])
    assert (logits >= lo - 1e-4).all() and (logits <= hi + 1e-4).all()
    if name == "resnet18":
        with torch.no_grad():
            lo2, _ = bm.bounds(x, 1 / 255, "crown-ibp")
        assert (lo2 >= lo - 1e-5).all() and (logits >= lo2 - 1e-4).all()
    with pytest.raises(ConfigError, match="full CROWN"):
        bm.check_method("crown", (3, 32, 32))
