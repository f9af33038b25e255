"""The attacks' view of the model (advprune.evaluation.forward): channels-last and compiled
forward passes compute the same function as the eager model, so AutoAttack's per-sample
outcomes are the same.

Tolerances: logits within 1e-5 (float rounding of other kernels: the convolutions' sums run
in another order); AutoAttack's per-sample successes on 16 digits: at most one point differs
(an attack's path can turn on a float-rounding tie; none differed on this machine). The
planted regression (a view that runs BatchNorm in training mode) differs on several points,
so the tolerance is tight enough to catch a wrong view. The compiled view's test is marked
slow (inductor compiles for ~30 s on a cold cache): ``make test-all`` runs it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from _digits_models import digits_test, natural_digits_model
from advprune.errors import ConfigError
from advprune.evaluation import evaluate
from advprune.evaluation.autoattack import run_autoattack
from advprune.evaluation.forward import AttackView, attack_view, use_channels_last

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1 / 16  # the natural digits model keeps about half its points at this radius


def _model() -> nn.Module:
    return copy.deepcopy(natural_digits_model())


def test_neither_option_is_the_model_itself() -> None:
    model = _model()
    assert attack_view(model) is model  # on a CPU channels_last defaults to off
    assert use_channels_last(None, torch.device("cuda")) is True
    assert use_channels_last(None, torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cpu")) is True


def test_channels_last_copies_and_leaves_the_callers_model() -> None:
    model = _model()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    view = attack_view(model, channels_last=True)
    assert isinstance(view, AttackView) and view.model is not model
    inner = next(m for m in view.model.modules() if isinstance(m, nn.Conv2d))
    assert inner.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous()  # the caller's weights keep their layout
    x, _ = digits_test(32)
    with torch.no_grad():
        assert torch.allclose(view(x), model(x), atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_(True)
    view(xg).logsumexp(1).sum().backward()
    xe = x.clone().requires_grad_(True)
    model(xe).logsumexp(1).sum().backward()
    assert torch.allclose(xg.grad, xe.grad, atol=1e-5, rtol=0)


class _Recorder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_only_forwards_without_gradients_run_compiled(monkeypatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda model, **kw: _Recorder(model))
    model = _model()
    view = attack_view(model, compile=True)
    compiled = view.__dict__["_compiled"]
    x, _ = digits_test(4)
    view(x.clone().requires_grad_(True))  # an attack's step: eager
    assert compiled.calls == 0
    with torch.no_grad():
        view(x)  # a query or a re-check: compiled
    assert compiled.calls == 1
    assert view.model is model  # compile alone copies nothing


def test_a_compiler_failure_is_one_line_naming_the_way_out(monkeypatch) -> None:
    def broken(model, **kw):
        def run(x):
            raise RuntimeError("InductorError: no working C++ compiler found\nlong trace")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    view = attack_view(_model(), compile=True)
    with pytest.raises(ConfigError) as info, torch.no_grad():
        view(digits_test(2)[0])
    message = str(info.value)
    assert "\n" not in message and "without --compile" in message
    assert "no working C++ compiler" in message


class _TrainModeBatchNorm(nn.Module):
    """Planted regression: a view whose copy runs BatchNorm in training mode (batch
    statistics), as a copy made or restored in the wrong mode would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.train()
        return self.model(x)


def _successes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return run_autoattack(model, x, y, eps=EPS, seed=3).success.numpy()


@pytest.fixture(scope="module")
def eager_outcome():
    x, y = digits_test(16)
    return x, y, _successes(_model(), x, y)


def test_channels_last_view_keeps_autoattack_outcomes(eager_outcome) -> None:
    x, y, eager = eager_outcome
    assert 0 < eager.sum() < len(y) - 4  # some points broken, several robust (Square runs)
    fast = _successes(attack_view(_model(), channels_last=True), x, y)
    assert int((fast != eager).sum()) <= 1


@pytest.mark.slow  # compiling the digits CNN with inductor takes ~30 s on a cold cache
def test_compiled_view_keeps_logits_and_autoattack_outcomes(eager_outcome) -> None:
    """Both options at once: the logits of the shrinking sets of points an attack queries
    (one compiled graph, dynamic batch), and AutoAttack's per-sample outcomes."""
    x, y, eager = eager_outcome
    model = _model()
    view = attack_view(model, channels_last=True, compile=True)
    with torch.no_grad():
        for n in (16, 7, 1):
            assert torch.allclose(view(x[:n]), model(x[:n]), atol=1e-5, rtol=0)
    fast = _successes(view, x, y)
    assert int((fast != eager).sum()) <= 1


def test_the_tolerance_catches_a_broken_view(eager_outcome) -> None:
    x, y, eager = eager_outcome
    broken = _successes(_TrainModeBatchNorm(_model()), x, y)
    assert int((broken != eager).sum()) >= 3


def test_evaluate_records_the_runtime_settings() -> None:
    x, y = digits_test(16)
    common = dict(eps="1/16", attacks="apgd-ce", batch_size=8, check_n=8, probe_steps=2)
    plain = evaluate(_model(), (x, y), **common)
    fast = evaluate(_model(), (x, y), channels_last=True, **common)
    assert plain.settings["channels_last"] is False and plain.settings["compile"] is False
    assert fast.settings["channels_last"] is True
    assert int((plain.samples["success_apgd-ce"] != fast.samples["success_apgd-ce"]).sum()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_channels_last_is_the_default_and_keeps_the_outcomes(eager_outcome) -> None:
    x, y, eager = eager_outcome
    model = _model().cuda()
    view = attack_view(model)
    assert isinstance(view, AttackView) and view.channels_last
    fast = run_autoattack(view, x.cuda(), y.cuda(), eps=EPS, seed=3).success.cpu().numpy()
    # another device's kernels: the same tolerance as between CPU kernels
    assert int((fast != eager).sum()) <= 1
    report = evaluate(model, (x, y), eps="1/16", attacks="apgd-ce", batch_size=16, check_n=8,
                      probe_steps=2, compile=True)  # fmt: skip
    assert report.settings["channels_last"] is True and report.settings["compile"] is True


class _SeesPrecision(nn.Module):
    """Records the float32 precision settings its forward passes ran under."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = torch.backends.cudnn.conv.fp32_precision
        self.seen.add((conv, torch.backends.cuda.matmul.fp32_precision))
        return self.model(x)


def test_evaluation_runs_float32_in_full_precision_and_restores_the_setting() -> None:
    """PyTorch's default lets cuDNN run float32 convolutions in TF32; evaluate() turns that
    off while it runs (any device: the flags are global) and puts the caller's back."""
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        model = _SeesPrecision(_model())
        x, y = digits_test(8)
        report = evaluate(model, (x, y), eps="1/16", attacks="apgd-ce", batch_size=8,
                          check_n=4, probe_steps=2)  # fmt: skip
        assert model.seen == {("ieee", "ieee")}
        assert report.settings["fp32_precision"] == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # restored
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
