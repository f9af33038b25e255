"""One conformance test per registry entry: every model, dataset, mask kind, allocation,
objective, optimizer, method and evaluation attack builds from its registry, runs a batch,
round-trips its config (and a checkpoint where it has one). A new plug-in is tested here by
being registered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from advprune.checkpoint import load_checkpoint, save_checkpoint
from advprune.data import list_datasets, load_dataset
from advprune.errors import AdvpruneError
from advprune.evaluation import create_attack, list_attacks
from advprune.methods import create_method, list_methods, method_from_config
from advprune.models import ModelSpec, create, default_input_size, list_models
from advprune.registry import signature_options
from advprune.sparsity import (
    allocate,
    attach_mask,
    create_mask,
    list_allocations,
    list_mask_kinds,
    prunable_layers,
)
from advprune.training import (
    OPTIMIZERS,
    TrainConfig,
    build_optimizer,
    create_objective,
    list_objectives,
    parameter_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def digits(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("digits_cnn", num_classes=10, in_channels=1)


def batch(n: int = 8, shape=(1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", list_models())
def test_model(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=10).eval()
    x = torch.rand(2, *default_input_size(name))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    rebuilt = ModelSpec.from_dict(json.loads(json.dumps(model.spec.to_dict()))).build()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    if sum(p.numel() for p in model.parameters()) < 3_000_000:  # large ones: test_models
        loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m", model, {}))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), out)


@pytest.mark.parametrize("name", list_datasets())
def test_dataset(name: str, tmp_path) -> None:
    if name == "digits":  # bundled: loads offline
        splits = load_dataset(name, val_fraction=0.1)
        x, y = splits.test[0]
        assert tuple(x.shape) == splits.info.input_shape and 0 <= int(y) < 10
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    else:  # no files, no download: one clear error naming what is missing
        with pytest.raises(AdvpruneError) as err:
            load_dataset(name, tmp_path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", list_mask_kinds())
def test_mask_kind(kind: str, tmp_path) -> None:
    model = digits()
    layer = prunable_layers(model)["features.3"]
    mask = create_mask(kind, layer.weight.shape, granularity="unstructured")
    attach_mask(layer, mask)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        out = model(x)
    loaded, card = load_checkpoint(save_checkpoint(tmp_path / "m", model, {}))
    assert card["masks"]["features.3"]["kind"] == kind
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)


@pytest.mark.parametrize("name", list_allocations())
def test_allocation(name: str) -> None:
    layers = prunable_layers(digits())
    densities = allocate(name, layers, 0.75)
    assert set(densities) == set(layers) and all(0 < d <= 1 for d in densities.values())
    kept = sum(densities[n] * m.weight.numel() for n, m in layers.items())
    total = sum(m.weight.numel() for m in layers.values())
    assert kept / total == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("name", list_objectives())
def test_objective(name: str) -> None:
    objective = create_objective(name, **({"eps": "1/16"} if "eps" in _args(name) else {}))
    model = digits().train()
    x, y = batch()
    out = objective(model, x, y)
    assert torch.isfinite(out.loss) and out.logits.shape == (8, 10)
    out.loss.backward()
    config = json.loads(json.dumps(objective.config()))
    kwargs = {k: v for k, v in config.items() if k in _args(name)}
    if "eps_text" in config:  # recorded as written (exact fraction) beside its value
        kwargs["eps"] = config["eps_text"]
    again = create_objective(name, **kwargs)
    assert again.config() == objective.config()


def _args(name: str) -> list[str]:
    from advprune.training.objectives import objective_options

    return list(objective_options(name).model_fields)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer(name: str) -> None:
    model = digits()
    opt = build_optimizer(parameter_groups(model), TrainConfig(lr=0.05))
    assert all(g["base_lr"] == 0.05 for g in opt.param_groups)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", list_methods())
def test_method(name: str, tmp_path) -> None:
    method = create_method(name, 0.5)
    assert method.stages and "prune" in method.stages
    assert all(method.stage_kind(s) in ("pretrain", "prune", "train") for s in method.stages)
    model = method.prepare(digits())
    targets = {}
    for r in range(method.rounds):
        targets = method.prune_round(model, r)
    assert targets and all(0 < d <= 1 for d in targets.values())
    method.finish(model, targets)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        out = model(x)
    config = json.loads(json.dumps(method.config()))
    assert method_from_config(config).config() == method.config()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m", model, {"method": config}))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)
    assert set(signature_options(type(method)).model_fields) >= {"sparsity"}


_FAST = {"pgd": {"steps": 2}, "fmn": {"steps": 5},
         "hofmn": {"steps": 5, "trials": 1, "tune_steps": 2, "tune_batch": 4}}  # fmt: skip


@pytest.mark.parametrize("name", list_attacks(kind=None))
def test_attack(name: str) -> None:
    attack = create_attack(name, 1 / 16, "linf", _FAST.get(name))
    assert json.loads(json.dumps(attack.config(), default=str))
    if name == "smoothing":  # certifies a whole set (certified_entries); listed here
        assert attack.kind == "certified"
        return
    model = digits().eval()
    x, y = batch(4)
    with torch.no_grad():  # labels the model gets right, so that every attack has work
        y = model(x).argmax(1)
    attack.prepare(model, {"settings": {"seed": 0}, "tune": (x, y), "out": None})
    out = attack.run_batch(model, x, y, seed=0)
    success, distance = np.asarray(out["success"]), np.asarray(out["distance"])
    assert success.shape == (4,) and success.dtype == bool and distance.shape == (4,)
    assert (distance >= 0).all()
    if attack.kind == "empirical":  # a found example lies within eps (min-norm: at its norm)
        assert np.isinf(distance[~success]).all() or attack.min_norm
        assert (distance[success] <= 1 / 16 + 1e-6).all()
