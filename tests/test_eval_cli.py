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
    # a naturally trained model (0.95 on these 40 points here; another processor trains a
    # slightly different one): far above chance, so the checkpoint was read right
    assert r["flags"] == [] and 0.8 < r["clean_accuracy"] <= 1.0
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


def test_bench_add_derives_the_key_from_the_checkpoint_card(checkpoint, evaluated, tmp_path):
    """`advprune eval CKPT --out E && advprune bench add E`: a method's model under the key its
    card gives, the unpruned model as the dense baseline of its (architecture, dataset)."""
    store = tmp_path / "results.sqlite"
    rc, out, err = run(["bench", "add", evaluated["out"], "--store", store])
    assert rc == 0, err
    assert out.splitlines()[0] == (
        "key Dense_DCNN_DIGITS_US_0 (from the checkpoint card: method, arch, dataset, "
        "structure, sparsity)"
    )
    assert out.splitlines()[1].startswith("stored Dense_DCNN_DIGITS_US_0 (the dense baseline)")
    # a pruned model (LWM, one shot, no training): its card names method, structure, sparsity
    pruned, ev = tmp_path / "lwm", tmp_path / "lwm-eval"
    rc, _, err = run(["prune", "--checkpoint", checkpoint, "--method", "lwm", "--sparsity", "0.8",
                      "--structure", "filters", "--out", pruned, "--no-progress"])  # fmt: skip
    assert rc == 0, err
    rc, _, err = run(["eval", pruned / "model.safetensors", "--attacks", "pgd", "--n", "40",
                      "--eval-steps", "2", "--out", ev, "--no-progress"])  # fmt: skip
    assert rc == 0, err
    rc, out, err = run(["bench", "add", ev, "--store", store])
    assert rc == 0, err
    assert out.startswith("key LWM_Han2015Learning_DCNN_DIGITS_S_80 (from the checkpoint card: ")
    rc, out, _ = run(["bench", "list", "--store", store])
    assert [line.split()[0] for line in out.splitlines()] == [
        "Dense_DCNN_DIGITS_US_0", "LWM_Han2015Learning_DCNN_DIGITS_S_80"
    ]  # fmt: skip
    # partial flags override what the card says; --key still overrides everything
    rc, out, err = run(["bench", "add", ev, "--store", store, "--method", "hydra",
                        "--sparsity", "0.8"])  # fmt: skip
    assert rc == 0, err
    assert out.startswith("key HYDRA_Sehwag2020Hydra_DCNN_DIGITS_S_80 (from the checkpoint "
                          "card: arch, dataset, structure; given: method, sparsity)")  # fmt: skip
    rc, out, err = run(["bench", "add", ev, "--store", store, "--key", "X_DCNN_DIGITS_S_80"])
    assert rc == 0 and out.startswith("stored X_DCNN_DIGITS_S_80 ["), err
    fails(["bench", "add", ev, "--store", store, "--key", "X_DCNN_DIGITS_S_80", "--arch", "R18"],
          "not both")  # fmt: skip
    fails(["bench", "add", evaluated["out"], "--store", store, "--method", "hydra"],
          "not pruned", "dense baseline")  # fmt: skip


def test_bench_add_asks_for_what_the_card_cannot_tell(checkpoint, evaluated, tmp_path):
    import shutil

    report = json.loads((evaluated["out"] / "report.json").read_text())
    old = tmp_path / "old"  # an older report: no key parts recorded, the checkpoint gone
    shutil.copytree(evaluated["out"], old)
    report["model"].pop("key_parts")
    report["model"].update(checkpoint=str(tmp_path / "gone.safetensors"), measured_sparsity=0.5)
    (old / "report.json").write_text(json.dumps(report))
    store = tmp_path / "s.sqlite"
    fails(["bench", "add", old, "--store", store], "does not tell the key's method, structure, "
          "sparsity", "--method METHOD --structure STRUCTURE --sparsity SPARSITY")  # fmt: skip
    assert not store.exists()
    rc, out, err = run(["bench", "add", old, "--store", store, "--method", "lwm",
                        "--structure", "US", "--sparsity", "50"])  # fmt: skip
    assert rc == 0, err
    assert out.startswith("key LWM_Han2015Learning_DCNN_DIGITS_US_50 (from the checkpoint "
                          "card: arch, dataset; given: method, structure, sparsity)")  # fmt: skip


def test_kernel_flags_are_recorded_and_a_resume_may_change_them(evaluated):
    """--channels-last / --compile change kernels, not the protocol: a rerun with them reuses
    every finished batch, and the report records what ran."""
    out = evaluated["out"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "batches").iterdir()}
    first = json.loads((out / "report.json").read_text())["settings"]
    assert first["channels_last"] is False and first["compile"] is False
    rc, _, err = run([*evaluated["argv"], "--no-progress", "--channels-last"])
    assert rc == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "batches").iterdir()} == before
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["channels_last"] is True and settings["compile"] is False
