"""Mask-based sparsity: densities, straight-through scores, reports, export round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.sparsity import (
    FixedMask,
    ScoreMask,
    allocate_densities,
    attach_mask,
    attach_scores,
    export_dense,
    is_masked,
    kept_count,
    layer_densities,
    load_dense_state_dict,
    mask_specs,
    masked_modules,
    prunable_layers,
    prune_magnitude,
    restore_masks,
    sparsity_report,
    topk_mask,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 216 weights, 8x8 output
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # 1152 weights, 4x4 output
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),  # 2560 weights
    )


X = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_local_density_exact_per_layer(sparsity: float) -> None:
    model = small_net()
    densities = prune_magnitude(model, sparsity, scope="local")
    for name, (module, mask) in masked_modules(model).items():
        n = module.weight.numel()
        kept = int(mask.full_mask().sum())
        assert abs(kept - (1 - sparsity) * n) <= 1, name
        assert densities[name] == pytest.approx(1 - sparsity)
        # masked weights are exactly zero in the effective weight
        assert int(module.weight.count_nonzero()) <= kept


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_global_density_exact_in_total(sparsity: float) -> None:
    model = small_net()
    prune_magnitude(model, sparsity, scope="global")
    report = sparsity_report(model, (3, 8, 8))
    total = report.prunable_params
    assert abs(report.kept - (1 - sparsity) * total) <= 1
    # a global ranking gives layers different densities
    assert len({round(d, 6) for d in layer_densities(model).values()}) > 1


def test_global_keeps_the_largest_weights() -> None:
    model = small_net()
    flat = [m.weight.detach().abs().flatten() for m in prunable_layers(model).values()]
    prune_magnitude(model, 0.99, scope="global")
    masks = [mask.full_mask().flatten().bool() for _, mask in masked_modules(model).values()]
    # each layer's largest weight is reserved; every other kept weight beats every pruned one
    for f, m in zip(flat, masks):
        assert m[f.argmax()]
        f[f.argmax()] = float("nan")
    weights, kept = torch.cat(flat), torch.cat(masks)
    reserved = weights.isnan()
    assert weights[kept & ~reserved].min() >= weights[~kept].max()


def test_local_keeps_largest_magnitudes_in_each_layer() -> None:
    model = small_net()
    dense = {n: m.weight.detach().abs().clone() for n, m in prunable_layers(model).items()}
    prune_magnitude(model, 0.75)
    for name, (_, mask) in masked_modules(model).items():
        keep = mask.full_mask().bool()
        assert dense[name][keep].min() >= dense[name][~keep].max()


@pytest.mark.parametrize("granularity,dim", [("filters", 0), ("channels", 1)])
def test_structured_masks_remove_whole_units(granularity: str, dim: int) -> None:
    model = small_net()
    prune_magnitude(model, 0.5, granularity=granularity)
    for name, (module, mask) in masked_modules(model).items():
        full = mask.full_mask()
        other = [d for d in range(full.dim()) if d != dim]
        per_unit = full.amax(dim=other)
        assert torch.equal(per_unit, full.amin(dim=other)), f"{name}: partial unit"
        assert int(per_unit.sum()) == round(0.5 * module.weight.shape[dim])


def test_structured_global_within_one_unit() -> None:
    model = small_net()
    prune_magnitude(model, 0.7, granularity="filters", scope="global")
    report = sparsity_report(model)
    largest_unit = max(m.weight[0].numel() for m in prunable_layers(model).values())
    assert abs(report.kept - 0.3 * report.prunable_params) <= largest_unit


def test_allocate_global_by_hand() -> None:
    importance = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([4.0, 2.0, 0.5, 6.0])}
    # keep 3 of 7 weights: 6, 5, 4 -> a keeps 1/3, b keeps 2/4
    dens = allocate_densities(importance, 1 - 3 / 7, scope="global")
    assert dens == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 4)}


def test_straight_through_gives_nonzero_score_gradients() -> None:
    model = small_net()
    masks = attach_scores(model, dict.fromkeys(prunable_layers(model), 0.3))
    loss = model(X).logsumexp(1).mean()
    loss.backward()
    for name, mask in masks.items():
        assert mask.scores.grad is not None, name
        assert mask.scores.grad.abs().sum() > 0, name
        # pruned units get gradient too (that is what lets them come back)
        pruned = ~mask.full_mask().bool()
        assert mask.scores.grad[pruned].abs().sum() > 0, name


def test_score_mask_matches_topk_of_abs_scores() -> None:
    lin = nn.Linear(10, 5)
    scores = torch.linspace(-1, 1, 50).view(5, 10)
    mask = attach_mask(lin, ScoreMask(lin.weight.shape, "unstructured", 0.2, scores))
    keep = mask.full_mask().bool()
    assert int(keep.sum()) == 10
    assert scores.abs()[keep].min() >= scores.abs()[~keep].max()


def _topk_reference(scores: torch.Tensor, density: float) -> torch.Tensor:
    flat = scores.flatten()
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, kept_count(flat.numel(), density), sorted=False).indices] = 1
    return mask.view_as(scores)


@pytest.mark.parametrize("kind", ["uniform", "normal", "ascending", "descending", "ties"])
def test_large_cpu_topk_masks_keep_exactly_the_topk_entries(kind: str) -> None:
    """Large CPU score tensors take the banded path (a sample brackets the threshold, topk
    runs inside the bracket); it keeps the same entries as ``torch.topk`` (with ties: the same
    count and the same kept values), also for orders that fool a strided sample."""
    g = torch.Generator().manual_seed(0)
    n = 21 * 10_000  # 200,000 entries once a column is cut off
    scores = {
        "uniform": lambda: torch.rand(n, generator=g),
        "normal": lambda: torch.randn(n, generator=g),
        "ascending": lambda: torch.arange(n, dtype=torch.float32),
        "descending": lambda: -torch.arange(n, dtype=torch.float32),
        "ties": lambda: torch.randint(0, 4, (n,), generator=g).float(),
    }[kind]().view(-1, 7 * 3)[:, :20]  # not contiguous as a weight's scores can be
    for density in (1e-4, 0.1, 0.5, 0.9, 0.9999):
        banded, reference = topk_mask(scores, density), _topk_reference(scores, density)
        assert int(banded.sum()) == int(reference.sum()) == kept_count(scores.numel(), density)
        if kind == "ties":
            kept = scores[banded.bool()].sort().values
            assert torch.equal(kept, scores[reference.bool()].sort().values)
        else:
            assert torch.equal(banded, reference), density


def test_the_banded_topk_runs_and_falls_back_when_the_sample_misleads(monkeypatch) -> None:
    """The fast path is taken on a large CPU tensor (topk then sees only the band), and a
    sample that misses the threshold (here: every sampled entry is the smallest value) sends
    the call to the full topk, which still keeps exactly the top entries."""
    sizes: list[int] = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: sizes.append(x.numel()) or
                        real_topk(x, k, **kw))  # fmt: skip
    n = 1 << 18
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(topk_mask(scores, 0.1), _topk_reference(scores, 0.1))
    assert sizes[0] < n // 10  # the band, not the whole tensor
    sizes.clear()
    fooled = scores + 1.0
    fooled[:: n // 16_384] = 0.0  # the strided sample sees only zeros
    assert torch.equal(topk_mask(fooled, 0.1), _topk_reference(fooled, 0.1))
    assert sizes[0] == n  # the full topk ran


def test_magnitude_init_equals_magnitude_pruning() -> None:
    a, b = small_net(), small_net()
    prune_magnitude(a, 0.8)
    attach_scores(b, dict.fromkeys(prunable_layers(b), 0.2), init="magnitude")
    for (_, ma), (_, mb) in zip(masked_modules(a).values(), masked_modules(b).values()):
        assert torch.equal(ma.full_mask(), mb.full_mask())


def test_dense_checkpoint_masked_export_round_trip() -> None:
    dense = small_net().eval()
    state = copy.deepcopy(dense.state_dict())
    model = small_net()
    nn.init.zeros_(model[0].weight)  # prove the weights come from the checkpoint
    prune_magnitude(model, 0.9)  # masks attached before loading
    load_dense_state_dict(model, state, strict=True)
    model.eval()
    prune_magnitude(model, 0.9)  # re-rank on the loaded weights
    with torch.no_grad():
        masked_out = model(X)
        assert not torch.allclose(masked_out, dense(X))
    export_dense(model)
    assert not any(is_masked(m) for m in model.modules())
    assert set(model.state_dict()) == set(state)
    plain = small_net().eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(X), masked_out)
    assert sparsity_report(plain).sparsity == pytest.approx(0.9, abs=1e-3)


def test_restore_masks_from_specs_round_trip() -> None:
    model = small_net().eval()
    prune_magnitude(model, 0.6, granularity="filters", layers={"0": model[0]})
    attach_scores(model, {"3": 0.25, "6": 0.5}, layers={"3": model[3], "6": model[6]})
    specs = mask_specs(model)
    assert specs["0"] == {"kind": "fixed", "granularity": "filters"}
    assert specs["3"]["kind"] == "scores"
    fresh = small_net().eval()
    restore_masks(fresh, specs)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    assert layer_densities(fresh) == layer_densities(model)


def test_replacing_a_mask_restores_hidden_weights() -> None:
    model = small_net()
    original = model[6].weight.detach().clone()
    prune_magnitude(model, 0.99, layers={"6": model[6]})
    attach_mask(model[6], FixedMask(original.shape))  # all-ones mask
    assert torch.equal(model[6].weight, original)


def test_prunable_layer_selection() -> None:
    model = small_net()
    assert list(prunable_layers(model)) == ["0", "3", "6"]
    assert list(prunable_layers(model, keep_first=True, keep_last=True)) == ["3"]
    assert list(prunable_layers(model, exclude=["6"])) == ["0", "3"]
    assert list(prunable_layers(model, include=["3"])) == ["3"]
    with pytest.raises(ConfigError, match="no prunable layer left"):
        prunable_layers(model, include=["nothing*"])
    with pytest.raises(ConfigError, match="no Conv2d or Linear"):
        prunable_layers(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_sparsity_report_flops_by_hand() -> None:
    model = small_net()
    report = sparsity_report(model, (3, 8, 8))
    rows = {r.name: r for r in report.layers}
    assert rows["0"].flops_dense == 216 * 64
    assert rows["3"].flops_dense == 1152 * 16
    assert rows["6"].flops_dense == 2560
    assert report.total_params == sum(p.numel() for p in model.parameters())
    prune_magnitude(model, 0.5, granularity="filters", layers={"0": model[0]})
    rows = {r.name: r for r in sparsity_report(model, (3, 8, 8)).layers}
    assert rows["0"].kept == 108 and rows["0"].flops == 108 * 64
    assert rows["0"].density == 0.5
    text = sparsity_report(model, (3, 8, 8)).format()
    assert "total (conv+linear)" in text


def test_bad_input() -> None:
    model = small_net()
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        prune_magnitude(model, 1.0)
    with pytest.raises(ConfigError):
        prune_magnitude(model, -0.1)
    with pytest.raises(UnknownNameError, match="granularity"):
        prune_magnitude(model, 0.5, granularity="rows")
    with pytest.raises(UnknownNameError, match="scope"):
        prune_magnitude(model, 0.5, scope="planet")
    with pytest.raises(ConfigError, match="cannot mask"):
        attach_mask(nn.BatchNorm2d(3), FixedMask((3,)))


def test_export_of_a_deepcopy_leaves_the_original_masked() -> None:
    model = small_net().eval()
    prune_magnitude(model, 0.8)
    with torch.no_grad():
        before = model(X)
    exported = export_dense(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(X), before)
        assert torch.equal(exported(X), before)
    assert all(is_masked(m) for m in prunable_layers(model).values())
    assert not any(is_masked(m) for m in exported.modules())


def test_export_keeps_the_parameter_object() -> None:
    model = small_net()
    prune_magnitude(model, 0.5)
    original = model[6].parametrizations.weight.original
    export_dense(model)
    assert model[6].weight is original
    assert int((model[6].weight == 0).sum()) >= 0.5 * original.numel() - 1
