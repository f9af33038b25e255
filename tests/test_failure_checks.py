"""Attack-failure checks: a gradient-masking model is flagged, a healthy one is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _digits_models import RoundedInputs, digits_splits, natural_digits_model
from advprune.evaluation import evaluate, plot_security_curve
from advprune.evaluation.checks import Probe, convergence_flag, probe_flags


@pytest.fixture(scope="module")
def model():
    return natural_digits_model()


splits = pytest.fixture(scope="module")(digits_splits)


def _names(report):
    return {f.name for f in report.all_flags()}


def test_healthy_model_raises_no_flag(model, splits):
    report = evaluate(model, splits, eps="3/16", attacks="autoattack,fmn,pgd", n=64,
                      check_n=64, fmn_steps=100)  # fmt: skip
    assert report.all_flags() == [] and report.reliable
    assert report.entry("autoattack").robust_accuracy < 0.1  # undefended at 3/16
    assert not report.format().startswith("UNRELIABLE")


def test_gradient_masking_model_is_flagged(model, splits, tmp_path):
    masked = RoundedInputs(model)
    report = evaluate(masked, splits, eps="3/16", attacks="pgd,fmn", n=64, check_n=64,
                      fmn_steps=50, out=tmp_path / "masked")  # fmt: skip
    names = _names(report)
    assert {"zero_gradients", "unbounded_attack_failed"} <= names
    assert any(
        f.attack == "fmn" and f.name == "unbounded_attack_failed" for f in report.all_flags()
    )
    assert not report.reliable
    # the naive figure looks robust (zero gradients: FMN never moves, so its robust accuracy is
    # the clean accuracy, whatever the processor), and every place that shows it says it is
    # unreliable
    assert report.entry("fmn").robust_accuracy == report.clean_accuracy > 0.8
    assert report.format().startswith("UNRELIABLE evaluation")
    on_disk = (tmp_path / "masked" / "report.json").read_text()
    assert '"reliable": false' in on_disk and "zero_gradients" in on_disk
    fig = plot_security_curve([report], ["masked"])
    assert fig.axes[0].lines[0].get_label() == "masked (UNRELIABLE)"


def test_square_succeeding_where_white_box_attacks_fail_is_flagged(model, splits):
    report = evaluate(RoundedInputs(model), splits, eps="3/16", attacks="apgd-ce,square", n=48,
                      check_n=16, probe_steps=10)  # fmt: skip
    flag = next(f for f in report.all_flags() if f.name == "square_beats_whitebox")
    s = report.samples
    extra = int((s["success_square"] & ~s["success_apgd-ce"]).sum())
    assert extra > 10 and f"broke {extra} points" in flag.message


def test_nondeterministic_model_is_flagged(model, splits):
    class Noisy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # dropout that stays on in eval mode
            return self.inner(torch.nn.functional.dropout(x, 0.2, training=True))

    report = evaluate(Noisy(model), splits, eps="1/8", attacks="pgd", n=32, check_n=16,
                      probe_steps=10)  # fmt: skip
    assert "nondeterministic_outputs" in _names(report)


def test_unconverged_fmn_is_flagged(model, splits):
    report = evaluate(model, splits, eps="1/8", attacks="fmn", n=64, check_n=16,
                      probe_steps=10, fmn_steps=4)  # fmt: skip
    flag = next(f for f in report.all_flags() if f.name == "distance_not_converged")
    assert flag.attack == "fmn"
    report = evaluate(model, splits, eps="1/8", attacks="fmn", n=64, check_n=16,
                      probe_steps=10, fmn_steps=100)  # fmt: skip
    assert "distance_not_converged" not in _names(report)


def test_convergence_and_monotonicity_rules():
    steps = np.arange(51)
    rising = -1.0 + steps / 50  # still climbing at the end
    flat = -np.exp(-steps / 3.0)  # converged long before the end
    assert convergence_flag(rising, name="loss_not_converged", what="x").name == (
        "loss_not_converged"
    )
    assert convergence_flag(flat, name="loss_not_converged", what="x") is None
    probe = Probe(eps=[0.1, 0.2, 1.0], robust_accuracy=[0.5, 0.6, 0.0], unbounded_success=1.0,
                  loss_history=list(flat), n=10)  # fmt: skip
    assert [f.name for f in probe_flags(probe)] == ["robust_accuracy_rises_with_eps"]
    probe = Probe(eps=[0.1, 0.2, 1.0], robust_accuracy=[0.5, 0.4, 0.1], unbounded_success=0.9,
                  loss_history=list(rising), n=10)  # fmt: skip
    assert [f.name for f in probe_flags(probe)] == ["loss_not_converged", "unbounded_attack_failed"]


@pytest.mark.parametrize("eps", [3 / 16, 1.5], ids=["eps-inside-box", "eps-beyond-box"])
def test_probe_shared_out_over_processes_is_the_probe_of_one(model, eps):
    """A sharded evaluation shares the probe's PGD runs out (run i in process i % world): each
    run is the same code on the same points, so the merge equals one process's probe exactly.
    eps beyond the box adds a run for the loss history alone."""
    from advprune.evaluation.checks import merge_probe, probe_runs, probe_tasks, run_probe

    x = torch.stack([digits_splits().test[i][0] for i in range(32)])
    y = torch.tensor([int(digits_splits().test[i][1]) for i in range(32)])
    tasks = probe_tasks(x, eps, "linf")
    assert tasks[-1][1] == (eps > 1)  # a history-only run where eps is not a radius
    whole = run_probe(model, x, y, eps=eps, norm="linf", steps=5)
    runs = {}
    for rank in range(3):
        part = probe_runs(model, x, y, eps=eps, norm="linf", steps=5, rank=rank, world=3)
        assert sorted(part) == list(range(rank, len(tasks), 3))
        runs.update(part)
    assert merge_probe(runs, x, eps=eps, norm="linf", n=32) == whole
    assert len(whole.loss_history) == 6 and len(whole.eps) == len(whole.robust_accuracy)
