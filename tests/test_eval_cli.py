"""``advprune eval CHECKPOINT --attacks ... --out DIR`` end to end on a tiny digits checkpoint."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest

from _digits_models import natural_digits_model
from advprune.checkpoint import save_checkpoint
from advprune.cli import main
from advprune.data import load_dataset

FAST = [
    "--n", "40", "--hofmn-trials", "3", "--hofmn-tune-steps", "10", "--fmn-steps", "30",
    "--check-n", "40",
]  # fmt: skip


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def fails(argv, *words):
    rc, out, err = run(argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    info = load_dataset("digits").info
    card = {"dataset": info.to_dict(), "eps": "3/16", "norm": "linf"}
    return save_checkpoint(
        folder / "model.safetensors", copy.deepcopy(natural_digits_model()), card
    )


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    argv = ["eval", checkpoint, "--dataset", "digits", "--attacks", "autoattack,hofmn",
            "--eps", "1/4", *FAST, "--out", out]  # fmt: skip
    rc, stdout, stderr = run(argv)
    assert rc == 0, stderr
    return {"out": out, "argv": argv, "stdout": stdout, "stderr": stderr}


def test_eval_writes_report_samples_and_curve(evaluated, checkpoint):
    out = evaluated["out"]
    for name in ("report.json", "per_sample.npz", "security_curve.png", "security_curve.svg",
                 "hofmn_study.json", "hofmn_config.json"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "report.json").read_text())
    assert r["n"] == 40 and r["eps"] == "1/4" and r["eps_value"] == 0.25
    assert r["norm"] == "linf" and r["dataset"] == "digits" and r["reliable"] is True
    assert r["flags"] == [] and 0.9 < r["clean_accuracy"] <= 1.0
    aa, hofmn = r["entries"]
    assert aa["name"] == "autoattack" and aa["config"]["attacks"] == [
        "apgd-ce", "apgd-t", "fab-t", "square"
    ]  # fmt: skip
    assert aa["config"]["version"] == "standard" and aa["seconds"] > 0
    assert hofmn["name"] == "hofmn" and hofmn["config"]["tuning"]["trials"] == 3
    # the curve takes each sample's smallest perturbation found by any attack
    assert r["curve"]["from"] == ["autoattack", "hofmn"]
    assert r["curve"]["robust_accuracy_at_eps"] == r["robust_accuracy"]
    assert r["robust_accuracy"] <= min(aa["robust_accuracy"], hofmn["robust_accuracy"])
    assert {"torch", "pyautoattack", "optuna"} <= set(r["versions"])
    assert r["model"]["checkpoint"] == str(checkpoint) and r["model"]["name"] == "digits_cnn"
    with np.load(out / "per_sample.npz") as z:
        assert {
            "index", "label", "clean_pred", "success_autoattack", "distance_hofmn", "distance_min"
        } <= set(z.files)  # fmt: skip
        assert z["index"].tolist() == list(range(40))
    assert "clean accuracy" in evaluated["stdout"] and "report.json" in evaluated["stdout"]
    assert "HO-FMN tuning" in evaluated["stderr"] and "autoattack" in evaluated["stderr"]  # bars


def test_rerun_resumes_without_recomputing(evaluated):
    out = evaluated["out"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "batches").iterdir()}
    report = json.loads((out / "report.json").read_text())
    rc, _, err = run([*evaluated["argv"], "--no-progress"])
    assert rc == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "batches").iterdir()} == before
    again = json.loads((out / "report.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "curve"):
        assert again[key] == report[key]
    assert [e["robust_accuracy"] for e in again["entries"]] == [
        e["robust_accuracy"] for e in report["entries"]
    ]


def test_rerun_with_other_settings_is_refused(evaluated):
    argv = [a if a != "1/4" else "1/8" for a in evaluated["argv"]]
    fails(argv, "other settings", "settings.eps", "new --out folder")


def test_bad_input_is_one_line_before_any_attack(checkpoint, tmp_path):
    out = tmp_path / "o"
    fails(["eval", checkpoint, "--eps", "8", "--out", out], "eps=8", "did you mean 8/255?")
    fails(["eval", checkpoint, "--eps", "8", "--norm", "linf", "--out", out], "[0, 1]")
    # the attack name is checked before the (missing) checkpoint is even read
    fails(["eval", tmp_path / "none.safetensors", "--attacks", "autoattack,fgm"],
          "unknown attack 'fgm'", "hofmn", "autoattack", "square")  # fmt: skip
    fails(["eval", checkpoint, "--aa-version", "fast", "--out", out], "standard")
    fails(["eval", checkpoint, "--checkpoint", tmp_path / "other.safetensors"], "two checkpoints")
    fails(["eval", checkpoint, "--hofmn-trials", "0", "--out", out], "hofmn_trials")
    assert not out.exists()


def test_eps_grid_flag_sets_the_curve_grid(checkpoint, tmp_path):
    out = tmp_path / "grid"
    rc, _, err = run(["eval", checkpoint, "--attacks", "fmn", "--eps", "1/8", *FAST,
                      "--eps-grid", "0,1/16,1/4", "--out", out, "--no-progress"])  # fmt: skip
    assert rc == 0, err
    curve = json.loads((out / "report.json").read_text())["curve"]
    assert curve["eps"] == [0.0, 1 / 16, 1 / 8, 1 / 4]
    fails(["eval", checkpoint, "--attacks", "fmn", "--eps-grid", "0,4", *FAST], "4/255")
