"""AutoAttack through pyautoattack: advprune's robust accuracy is recomputed from the returned
adversarial examples and equals pyautoattack's own result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _digits_models import digits_test, natural_digits_model
from _tolerance import unexplained_disagreements
from advprune.attacks.fmn import lp_distance
from advprune.data import load_dataset
from advprune.errors import UnknownNameError
from advprune.evaluation import autoattack_attacks, evaluate, run_autoattack
from advprune.evaluation.runner import _batch_seed

EPS = 1 / 16  # leaves about 60 % of the digits robust for APGD on the natural model


@pytest.fixture(scope="module")
def model():
    return natural_digits_model()


def test_robust_accuracy_equals_accuracy_on_its_adversarial_examples(model):
    from pyautoattack import AutoAttack

    x, y = digits_test(96)
    result = run_autoattack(model, x, y, eps=EPS, attacks=["apgd-ce"], seed=3)
    with torch.no_grad():
        adv_correct = model(result.x_adv).argmax(1) == y
        clean_correct = model(x).argmax(1) == y
    robust = clean_correct & ~result.success
    # Verdicts on the returned examples come from forward passes over batches of other sizes
    # (here all 96 points; inside, the points still correct), which another processor may
    # round differently: they may differ only for a point on the decision boundary.
    assert unexplained_disagreements(robust, adv_correct, model, result.x_adv, y) == []
    assert 0.3 < float(robust.float().mean()) < 0.9  # neither trivial nor empty
    assert unexplained_disagreements(result.success, result.own_success, model, result.x_adv,
                                     y) == []  # AutoAttack's own verdict  # fmt: skip
    assert float(lp_distance(result.x_adv - x, "linf").max()) <= EPS + 1e-6
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    # the same attack run directly through pyautoattack, same seed and settings: the same code
    # on the same points in this process, so the same examples and labels
    aa = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=3)
    aa.attacks_to_run = ["apgd-ce"]
    x_raw, y_raw = aa.run_standard_evaluation(x, y, batch_size=96)
    assert unexplained_disagreements(y_raw == y, robust, model, x_raw, y) == []
    with torch.no_grad():
        adv_raw = model(x_raw).argmax(1) == y
    assert unexplained_disagreements(adv_raw, robust, model, x_raw, y) == []


def test_evaluate_entry_equals_the_recount(model):
    x, y = digits_test(64)
    splits = load_dataset("digits")
    report = evaluate(model, splits, eps=EPS, attacks="apgd-ce", n=64, batch_size=64, seed=5,
                      check_n=16, probe_steps=10)  # fmt: skip
    seed = _batch_seed(5, "apgd-ce", 0)
    direct = run_autoattack(model, x, y, eps=EPS, attacks=["apgd-ce"], seed=seed)
    with torch.no_grad():
        recount = float((model(direct.x_adv).argmax(1) == y).float().mean())
    # exact by construction: evaluate() runs this very call (same batch, same seed, same
    # process); the recount here is one more forward pass, equal up to a boundary point
    assert report.entry("apgd-ce").robust_accuracy == pytest.approx(recount, abs=1 / 64)
    assert np.array_equal(report.samples["success_apgd-ce"], direct.success.numpy())


def test_attacks_run_in_order_on_the_remaining_points(model):
    x, y = digits_test(48)
    result = run_autoattack(model, x, y, eps=EPS, attacks=["apgd-ce", "apgd-t"], seed=0)
    assert result.attacks == ["apgd-ce", "apgd-t"]
    first = result.first_attack
    assert torch.equal(first >= 0, result.success)
    assert int((first == 0).sum()) > 5  # APGD-CE broke these; APGD-T only ran on the rest
    apgd_alone = run_autoattack(model, x, y, eps=EPS, attacks=["apgd-ce"], seed=0)
    assert torch.equal(first == 0, apgd_alone.success)  # same call, seed and process: exact


def test_versions_and_names():
    assert autoattack_attacks("standard") == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert autoattack_attacks("plus") == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert autoattack_attacks("rand") == ["apgd-ce", "apgd-dlr"]
    assert autoattack_attacks("standard", ["square"]) == ["square"]
    with pytest.raises(UnknownNameError, match="unknown AutoAttack attack 'pgd'"):
        autoattack_attacks("standard", ["pgd"])
    with pytest.raises(UnknownNameError, match="plus, rand, standard"):
        autoattack_attacks("fast")
