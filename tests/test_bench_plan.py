"""``advprune bench plan``: a grid's cost counted in training passes, divided by a rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from _grid_helpers import write_grid
from advprune.bench.grid import jobs, load_grid
from advprune.bench.plan import format_plan, plan_grid, stage_costs
from advprune.cli import main

APB = Path(__file__).resolve().parents[1] / "configs" / "apb_grid.yaml"
RATE = 1000.0  # passes / s given for digits_cnn
# TINY (tests/_grid_helpers.py): PGD-1 training, so every training or validation image is
# 2 passes; digits has 1437 training images: one epoch is 2874 passes, whatever the split
EPOCH = 1437 * 2


def hours(passes: float) -> float:
    return passes / RATE / 3600


def test_passes_by_construction_and_wall_time(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    kw = {"train_rates": {"digits_cnn": RATE}, "clean": 0.5, "robust": 0.25}
    plan = plan_grid(grid, gpus=1, **kw)
    eval_h = hours(24 * (20 * 0.5 + 1))  # PGD-20 on the 24 points, on the clean half
    # lwm: prune 0 epochs, finetune 1 epoch; binary: prune (trains) 1 epoch; dense 1 epoch
    assert [c.job.method for c in plan.costs] == ["lwm", "lwm", "binary", "binary"]
    for cost in plan.costs:
        assert cost.train_h == pytest.approx(hours(EPOCH))
        assert cost.eval_h == pytest.approx(eval_h)
    assert plan.dense_hours == {"digits_cnn_digits": pytest.approx(hours(EPOCH))}
    job_h = hours(EPOCH) + eval_h
    assert plan.gpu_hours == pytest.approx(hours(EPOCH) + 4 * job_h)
    assert plan.wall_hours == pytest.approx(plan.gpu_hours)  # one GPU: everything in a row
    # two GPUs: the dense model first (the jobs wait for it), then two jobs on each GPU
    assert plan_grid(grid, gpus=2, **kw).wall_hours == pytest.approx(hours(EPOCH) + 2 * job_h)
    # scaled to 10 models of the same mix: the dense model is still trained once
    scaled = plan_grid(grid, gpus=1, models=10, **kw)
    assert len(scaled.costs) == 10
    assert scaled.gpu_hours == pytest.approx(hours(EPOCH) + 10 * job_h)
    # a measured evaluation rate replaces the attack count
    fast = plan_grid(grid, eval_rates={"digits_cnn": 12.0}, **kw)
    assert fast.costs[0].eval_h == pytest.approx(24 / 12 / 3600)
    text = format_plan(plan)
    assert "| digits_cnn | digits | 4 |" in text and "ASSUMED" not in text
    assert "1000 training passes/s (given: --train-rate)" in text


def test_attack_and_objective_costs_follow_the_grid(tmp_path):
    base = {**load_grid(write_grid(tmp_path)).base}
    kw = {"train_rates": {"digits_cnn": RATE}, "clean": 0.8, "robust": 0.4}
    # TRADES-5 costs 7 passes per training image (validation: PGD-5, 6 passes)
    trades = write_grid(tmp_path, "t.yaml", base={**base, "objective": "trades", "attack_steps": 5})
    cost = plan_grid(load_grid(trades), **kw).costs[0]
    val = round(1437 * 0.1)
    assert cost.train_h == pytest.approx(hours((1437 - val) * 7 + val * 6))
    # AutoAttack: APGD-CE on the correct points, the targeted attacks and Square on the rest
    aa = write_grid(tmp_path, "aa.yaml", evaluation={"attacks": ["autoattack"], "n": 100})
    per_point = 1 + 100 * 0.8 + 0.4 * (900 + 1200 + 5000 / 3)
    assert plan_grid(load_grid(aa), **kw).costs[0].eval_h == pytest.approx(hours(100 * per_point))
    # HO-FMN: its tuning once per model plus FMN on the correct points
    ho = write_grid(
        tmp_path, "ho.yaml",
        evaluation={"attacks": ["hofmn"], "n": 100, "options": {"hofmn_trials": 4}},
    )  # fmt: skip
    expected = 4 * 100 * 64 + 100 * (200 * 0.8 + 1)
    assert plan_grid(load_grid(ho), **kw).costs[0].eval_h == pytest.approx(hours(expected))


def test_apb_grid_plan_marks_assumed_rates(capsys):
    grid = load_grid(APB)
    runnable = [j for j in jobs(grid) if not j.skip]
    assert len(runnable) == 108
    assert main(["bench", "plan", str(APB), "--gpus", "8", "--models", "240"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("grid apb_grid: 240 jobs on 8 GPU(s)")
    assert "resnet18: ASSUMED" in text and "WARNING: rates marked ASSUMED" in text
    # a measured rate replaces the assumption, and halving it doubles the hours
    rate = stage_costs()["train_rates"]["gpu"]["resnet18"]["rate"]
    args = ["--train-rate", f"resnet18={rate}", "--train-rate", f"vgg16={rate}"]
    one = plan_grid(grid, gpus=8, train_rates={"resnet18": rate, "vgg16": rate})
    half = plan_grid(grid, gpus=8, train_rates={"resnet18": rate / 2, "vgg16": rate / 2})
    assert half.gpu_hours == pytest.approx(2 * one.gpu_hours)
    assert main(["bench", "plan", str(APB), "--gpus", "8", *args]) == 0
    assert "ASSUMED" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--train-rate", "digits_cnn=fast"], "--train-rate takes NAME=NUMBER"),
        ([], "no gpu training rate of 'digits_cnn'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cpu", "--clean", "0.3", "--robust", "0.5"], "need 0 <= robust <= clean"),
        (["--device", "cpu", "--models", "0"], "--models must be >= 1"),
    ],
)
def test_bad_plan_input_one_line(tmp_path, capsys, args, message):
    grid = write_grid(tmp_path)
    assert main(["bench", "plan", str(grid), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
