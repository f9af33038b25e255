"""Iterative LWM: cubic schedule, pruned weights stay pruned, the target is reached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import advprune
from advprune.errors import ConfigError
from advprune.methods import create_method
from advprune.models import create
from advprune.sparsity import dense_weight, masked_modules, sparsity_report


def test_cubic_schedule_ends_at_the_target() -> None:
    m = create_method("lwm-iterative", 0.96, rounds=4)
    got = [m.round_sparsity(r) for r in range(4)]
    # s_r = s * (1 - (1 - (r + 1) / 4)^3): 0.96 * (37/64, 56/64, 63/64, 1)
    assert got == pytest.approx([0.96 * 37 / 64, 0.96 * 56 / 64, 0.96 * 63 / 64, 0.96])
    assert got[-1] == 0.96 and m.rounds == 4
    assert create_method("lwm-iterative", 0.9, rounds=1).round_sparsity(0) == 0.9
    assert create_method("lwm-iterative", 0.9).taxonomy.schedule == ("IT",)
    assert create_method("lwm-iterative", 0.9).trainable("prune") == ("weights", "bn")
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ConfigError, match="rounds must be an integer >= 1"):
            create_method("lwm-iterative", 0.9, rounds=bad)


@pytest.mark.parametrize(
    "structure,allocation",
    [("unstructured", "uniform"), ("unstructured", "global"), ("unstructured", "lamp"),
     ("unstructured", "erk"), ("filters", "uniform"), ("channels", "uniform")],
)  # fmt: skip
def test_pruned_weights_stay_pruned_and_target_is_reached(structure, allocation) -> None:
    torch.manual_seed(0)
    model = create("digits_cnn", width=8)
    method = create_method("lwm-iterative", 0.9, structure=structure, allocation=allocation,
                           rounds=3)  # fmt: skip
    previous = None
    for r in range(method.rounds):
        method.prune_round(model, r)
        masks = {n: mask.full_mask().clone() for n, (_, mask) in masked_modules(model).items()}
        if previous is not None:
            for name, mask in masks.items():
                assert bool((mask <= previous[name]).all()), (r, name)  # nothing regrows
        previous = masks
        # "training" between rounds: every dense weight changes, the pruned ones grow large
        with torch.no_grad():
            for module, _ in masked_modules(model).values():
                w = dense_weight(module)
                w.add_(0.01 * torch.randn_like(w))
                w.mul_(torch.where(module.weight == 0, 100.0, 1.0))
    kept = sparsity_report(model).kept
    total = sparsity_report(model).prunable_params
    if structure == "unstructured":
        assert kept == round(0.1 * total)
    else:
        assert abs(kept / total - 0.1) < 0.02


def test_api_trains_between_rounds_and_reaches_the_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create("digits_cnn", width=8)
    pruned = advprune.prune(model, method="lwm-iterative", sparsity=0.95, objective="natural",
                            data="digits", epochs=1, lr=0.05, rounds=2, out=tmp_path)  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_0", "round_1"]
    report = sparsity_report(pruned)
    assert report.kept == round(0.05 * report.prunable_params)
    # weights trained: the surviving weights differ from the original ones
    originals = dict(model.named_parameters())
    changed = [
        not torch.equal(dense_weight(m), originals[f"{n}.weight"])
        for n, (m, _) in masked_modules(pruned).items()
    ]
    assert all(changed)
    assert pruned.advprune_card["method"]["options"] == {"rounds": 2}
