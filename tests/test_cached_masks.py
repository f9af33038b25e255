"""Masks are computed once per optimizer step (``cached_masks``), not once per forward pass of
the attack, with the same losses and gradients as without the cache, for every mask kind."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from advprune.errors import ConfigError
from advprune.models import create
from advprune.sparsity import (
    cached_masks,
    create_mask,
    list_mask_kinds,
    masked_modules,
    prunable_layers,
)
from advprune.training import TrainConfig, Trainer, create_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _options(kind: str, shape: torch.Size) -> dict:
    """Each shipped kind with a mask that keeps part of the layer (a new kind: its defaults)."""
    return {
        "fixed": {"mask": torch.rand(shape) < 0.5},
        "hydra": {"density": 0.5, "scores": torch.randn(shape)},
        "scores": {"density": 0.5},
        "harp": {"rate": 0.3},
    }.get(kind, {})


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = create("digits_cnn", width=4)
    for module in prunable_layers(model).values():
        shape = module.weight.shape
        try:
            mask = create_mask(kind, shape, **_options(kind, shape))
        except ConfigError:  # a structure this layer cannot take (N:M: 9 inputs), left dense
            continue
        parametrize.register_parametrization(module, "weight", mask)
    return model


def _loss_and_grads(model: nn.Module, objective, cache) -> tuple[torch.Tensor, dict]:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    model.train()
    torch.manual_seed(2)  # the attack's random start
    with cache(model):
        loss = objective(model, x, y).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _uncached(model: nn.Module) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@pytest.mark.parametrize("kind", list_mask_kinds())
def test_cached_masks_give_the_same_loss_and_gradients(kind: str) -> None:
    model = _model(kind)
    assert masked_modules(model)
    obj = create_objective("pgd", eps="3/16", steps=3)
    loss, grads = _loss_and_grads(copy.deepcopy(model), obj, _uncached)
    cached_loss, cached_grads = _loss_and_grads(copy.deepcopy(model), obj, cached_masks)
    # identical by construction, not within a tolerance: the cache holds the very tensor an
    # uncached forward computes (weight * mask from the same parameters); the attack's
    # forward passes take no parameter gradient, and the loss's one forward runs the same
    # operations on the same values, so the backward pass does too
    assert torch.equal(loss, cached_loss)
    assert grads.keys() == cached_grads.keys() and any("original" in n for n in grads)
    for name in grads:
        assert torch.equal(grads[name], cached_grads[name]), name


# TRADES' loss has two forward passes with gradients (clean and adversarial). Uncached, each
# has its own masked weight and the gradients reach the scores as g1 * w + g2 * w; cached,
# as (g1 + g2) * w: the same value up to float32 rounding of that sum (measured: at most
# 3.4e-9 absolute, 3.4e-5 relative on HARP's rate, whose gradient is a sum over the layer).
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-8


@pytest.mark.parametrize("kind", list_mask_kinds())
def test_cached_masks_with_two_forward_passes_in_the_loss(kind: str) -> None:
    model = _model(kind)
    obj = create_objective("trades", eps="3/16", steps=3)
    loss, grads = _loss_and_grads(copy.deepcopy(model), obj, _uncached)
    cached_loss, cached_grads = _loss_and_grads(copy.deepcopy(model), obj, cached_masks)
    assert torch.equal(loss, cached_loss)  # the forward values are the same tensors
    assert grads.keys() == cached_grads.keys()
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=GRAD_RTOL,
                                   atol=GRAD_ATOL, msg=name)  # fmt: skip


def test_plain_parametrize_cache_loses_the_gradient_the_test_would_catch() -> None:
    """Planted regression: ``parametrize.cached()`` alone caches the weights of TRADES' first
    forward, which runs under ``no_grad``; the loss then reaches no score (the comparisons
    above fail on it: a missing gradient, not a rounding difference)."""
    model = _model("hydra")
    obj = create_objective("trades", eps="3/16", steps=2)
    _, grads = _loss_and_grads(copy.deepcopy(model), obj, _uncached)
    _, naive = _loss_and_grads(copy.deepcopy(model), obj, lambda m: parametrize.cached())
    assert any(n.endswith("scores") for n in grads)
    assert not any(n.endswith("scores") for n in naive)


def test_a_training_step_computes_each_mask_once() -> None:
    model = _model("hydra")
    calls = []
    for name, (_, mask) in masked_modules(model).items():
        original = mask.compact_mask
        mask.compact_mask = lambda original=original, name=name: calls.append(name) or original()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = [(x[:16], torch.arange(16) % 10), (x[16:], torch.arange(16) % 10)]
    steps = 5  # PGD-5: 6 forward passes per step
    Trainer(model, create_objective("pgd", eps="3/16", steps=steps), data,
            TrainConfig(epochs=1, lr=0.01), progress=False).fit()  # fmt: skip
    layers = len(masked_modules(model))
    assert len(calls) == 2 * layers  # two steps, one mask per layer each
    calls.clear()
    obj = create_objective("pgd", eps="3/16", steps=steps)
    obj(model, *data[0])  # without the cache: every forward recomputes every mask
    assert len(calls) == (steps + 1) * layers
