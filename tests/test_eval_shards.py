"""Evaluation at scale: sharded over processes (the same per-sample results and report as one
process, after a killed shard resumes too), the automatic batch size, HO-FMN's tuning cache.

Exact equality is expected (not a tolerance): every batch runs the same code on the same
inputs with the same seed ``(seed, attack, batch)`` in whichever process; sharding only
chooses which process runs it, and the merge orders batches by index.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _digits_models import digits_splits, natural_digits_model
from advprune.errors import ConfigError
from advprune.evaluation import evaluate
from advprune.evaluation.shards import AUTO_BATCH_CPU, eval_devices
from advprune.sparsity import prune_magnitude

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 points in 4 batches: process 0 runs batches 0 and 2, process 1 batches 1 and 3
SETTINGS = dict(
    eps="3/16", attacks="autoattack,hofmn", n=64, batch_size=16, hofmn_trials=2,
    hofmn_tune_steps=10, fmn_steps=20, hofmn_tune_batch=16, check_n=16, probe_steps=5,
    hofmn_cache=False,
)  # fmt: skip
VOLATILE = {"created", "seconds", "tuning_seconds"}


def _stable(obj, skip=frozenset()):
    """A report's dict without wall times and dates (and the keys ``skip``)."""
    if isinstance(obj, dict):
        return {k: _stable(v, skip) for k, v in obj.items() if k not in VOLATILE | skip}
    if isinstance(obj, list):
        return [_stable(v, skip) for v in obj]
    return obj


def _same(a, b, skip=frozenset({"processes"})) -> None:
    assert sorted(a.samples) == sorted(b.samples)
    for key in a.samples:
        assert np.array_equal(a.samples[key], b.samples[key]), key
    assert _stable(a.to_dict(), skip) == _stable(b.to_dict(), skip)


@functools.cache
def _pruned() -> torch.nn.Module:
    """The digits model with half its weights masked: a parametrized module, which PyTorch
    cannot pickle (evaluate(devices=N) sends it to its processes as a checkpoint)."""
    model = copy.deepcopy(natural_digits_model())
    prune_magnitude(model, 0.5)
    return model


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return evaluate(_pruned(), digits_splits(), out=tmp_path_factory.mktemp("one"), **SETTINGS)


class _ExitAfter:
    """after_batch hook: the process running batch ``batch`` of ``attack`` dies (no cleanup)
    right after saving it, as a killed shard would."""

    def __init__(self, attack: str, batch: int) -> None:
        self.attack, self.batch = attack, batch

    def __call__(self, attack: str, batch: int) -> None:
        if (attack, batch) == (self.attack, self.batch):
            os._exit(3)


def test_two_shards_give_the_report_of_one_process(one_process, tmp_path: Path) -> None:
    assert one_process.robust_accuracy < one_process.clean_accuracy  # the attacks did work
    report = evaluate(_pruned(), digits_splits(), out=tmp_path, devices=2,
                      **SETTINGS)  # fmt: skip
    _same(report, one_process)
    assert report.settings["processes"] == 2 and one_process.settings["processes"] == 1
    assert len(list((tmp_path / "batches").glob("autoattack_*.npz"))) == 4
    assert (tmp_path / "report.json").exists() and (tmp_path / "hofmn_study.json").exists()


def test_a_killed_shard_resumes_only_its_unfinished_batches(one_process, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="sharded evaluation process failed"):
        evaluate(_pruned(), digits_splits(), out=tmp_path, devices=2,
                 after_batch=_ExitAfter("autoattack", 1), **SETTINGS)  # fmt: skip
    batches = tmp_path / "batches"
    assert (batches / "autoattack_00001.npz").exists()
    assert not (batches / "autoattack_00003.npz").exists()  # process 1 died before it
    assert not (tmp_path / "report.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in batches.glob("*.npz")}
    report = evaluate(_pruned(), digits_splits(), out=tmp_path, devices=2,
                      **SETTINGS)  # fmt: skip
    after = {p.name: p.stat().st_mtime_ns for p in batches.glob("*.npz")}
    assert {k: after[k] for k in before} == before  # finished batches were not run again
    assert len(after) > len(before)
    _same(report, one_process)


def test_auto_batch_is_recorded_and_kept_when_a_run_resumes(monkeypatch, tmp_path: Path) -> None:
    import advprune.evaluation.runner as runner

    model, settings = natural_digits_model(), dict(eps="3/16", attacks="apgd-ce", n=64)
    auto = evaluate(model, digits_splits(), batch_size="auto", **settings)
    assert auto.settings["batch_size"] == AUTO_BATCH_CPU
    assert auto.settings["batch_size_choice"] == "auto"
    given = evaluate(model, digits_splits(), batch_size=AUTO_BATCH_CPU, **settings)
    assert given.settings["batch_size_choice"] == "given"
    _same(auto, given, skip=frozenset({"batch_size_choice"}))

    # a GPU would choose 32 here; the run dies, and resumes where 16 would be chosen: the
    # recorded 32 is kept, so the batches (and their seeds) are those of the first run
    explicit = evaluate(model, digits_splits(), batch_size=32, **settings)
    monkeypatch.setattr(runner, "auto_batch_size", lambda *a, **k: 32)

    def die(attack: str, batch: int) -> None:
        if batch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, digits_splits(), batch_size="auto", out=tmp_path, after_batch=die,
                 **settings)  # fmt: skip
    monkeypatch.setattr(runner, "auto_batch_size", lambda *a, **k: 16)
    resumed = evaluate(model, digits_splits(), batch_size="auto", out=tmp_path, **settings)
    assert resumed.settings["batch_size"] == 32
    assert len(list((tmp_path / "batches").glob("apgd-ce_*.npz"))) == 2
    for key in explicit.samples:
        assert np.array_equal(resumed.samples[key], explicit.samples[key]), key


def test_hofmn_tuning_is_reused_for_the_same_model_only(tmp_path: Path) -> None:
    settings = dict(eps="3/16", attacks="hofmn", n=16, batch_size=16, hofmn_trials=2,
                    hofmn_tune_steps=10, fmn_steps=20, hofmn_tune_batch=16, check_n=16,
                    probe_steps=5, hofmn_cache=tmp_path / "cache")  # fmt: skip
    model = natural_digits_model()
    first = evaluate(model, digits_splits(), out=tmp_path / "a", **settings)
    again = evaluate(model, digits_splits(), out=tmp_path / "b", **settings)
    assert not first.entry("hofmn").details["tuning_reused"]
    assert again.entry("hofmn").details["tuning_reused"]
    assert again.entry("hofmn").config == first.entry("hofmn").config
    assert np.array_equal(again.samples["distance_hofmn"], first.samples["distance_hofmn"])
    assert not (tmp_path / "b" / "hofmn_study.json").exists()  # nothing was tuned
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    changed = evaluate(other, digits_splits(), **settings)
    assert not changed.entry("hofmn").details["tuning_reused"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_bad_devices_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="devices must be >= 1"):
        eval_devices(0)
    with pytest.raises(ConfigError, match=r"mixes CPU and GPU|CUDA is not available"):
        eval_devices(["cpu", "cuda:0"])
    assert eval_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2


def test_eval_under_torchrun_writes_the_report_of_one_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    from advprune.checkpoint import save_checkpoint
    from advprune.cli import main

    ckpt = save_checkpoint(tmp_path / "model.safetensors", natural_digits_model(),
                           {"dataset": "digits"})  # fmt: skip
    args = ["eval", str(ckpt), "--attacks", "apgd-ce", "--eps", "3/16", "--eval-n", "32",
            "--batch-size", "16", "--check-n", "16", "--progress", "off"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "advprune.cli", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("evaluation: digits n=32") == 1  # rank 0 prints the report
    one = np.load(tmp_path / "one" / "per_sample.npz")
    two = np.load(tmp_path / "two" / "per_sample.npz")
    assert one.files == two.files
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["settings"]["processes"] == 2
