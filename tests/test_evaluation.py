"""evaluate(): per-sample results, security curve, report JSON, resumable runs, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _digits_models import RoundedInputs, digits_test, natural_digits_model
from advprune.data import load_dataset
from advprune.errors import ConfigError, DataError, UnknownNameError
from advprune.evaluation import (
    Entry,
    Flag,
    Report,
    default_eps_grid,
    evaluate,
    load_report,
    plot_security_curve,
    robust_accuracy_at,
    security_curve,
)

# cheap settings for plumbing tests (reported numbers always use the defaults)
FAST = {
    "n": 64, "check_n": 32, "probe_steps": 10, "fmn_steps": 30, "hofmn_trials": 3,
    "hofmn_tune_steps": 10, "hofmn_tune_batch": 32,
}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return natural_digits_model()


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def report(model, splits):
    return evaluate(model, splits, eps="1/16", attacks="hofmn,pgd", **FAST)


# ------------------------------------------------------------------------------ curve


def test_per_sample_results(report, model):
    s = report.samples
    x, y = digits_test(64)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert np.array_equal(s["index"], np.arange(64)) and np.array_equal(s["label"], y.numpy())
    assert np.array_equal(s["clean_pred"], pred)
    assert np.array_equal(s["clean_correct"], pred == y.numpy())
    d = s["distance_hofmn"]
    assert (d[~s["clean_correct"]] == 0).all() and (d[s["clean_correct"]] > 0).all()
    assert np.array_equal(s["success_hofmn"], s["clean_correct"] & (d <= report.eps_value))
    robust = s["clean_correct"] & ~s["success_hofmn"] & ~s["success_pgd"]
    assert np.array_equal(s["robust"], robust)
    assert report.robust_accuracy == pytest.approx(robust.mean())
    assert report.clean_accuracy == pytest.approx(s["clean_correct"].mean())


def test_security_curve_properties(report):
    curve = report.curve
    eps, acc = np.asarray(curve["eps"]), np.asarray(curve["robust_accuracy"])
    assert curve["from"] == ["hofmn", "pgd"] and eps[0] == 0 and report.eps_value in eps
    assert (np.diff(eps) > 0).all() and eps[-1] == pytest.approx(2 * report.eps_value)
    assert (np.diff(acc) <= 0).all()  # never increases
    assert acc[0] == report.clean_accuracy  # eps 0: the clean accuracy
    at_eps = report.curve_at()
    # the curve uses, per sample, the smallest perturbation any attack found
    s = report.samples
    d = s["distance_min"]
    assert np.array_equal(d, np.minimum(s["distance_hofmn"], s["distance_pgd"]))
    assert at_eps == curve["robust_accuracy_at_eps"] == robust_accuracy_at(d, report.eps_value)
    assert at_eps == np.mean(d > report.eps_value) == report.robust_accuracy
    assert at_eps <= report.entry("hofmn").robust_accuracy
    assert at_eps <= report.entry("pgd").robust_accuracy
    assert report.entry("hofmn").robust_accuracy > 0.3  # eps 1/16 leaves many digits robust


def test_security_curve_on_any_grid():
    d = np.array([0.0, 0.0, 0.1, 0.25, 0.25, 0.7, math.inf, math.inf])
    grid = [0.3, 0.0, 0.25, 10.0, 0.05, 0.1]  # any order, any values
    expected = [np.mean(d > e) for e in grid]
    assert security_curve(d, grid).tolist() == expected
    assert security_curve(d, [0.0])[0] == 6 / 8 and security_curve(d, [1e9])[0] == 2 / 8
    grid = default_eps_grid(3 / 16, points=11)
    assert 3 / 16 in grid.tolist() and grid[0] == 0 and (np.diff(grid) > 0).all()
    with pytest.raises(ConfigError, match="distances must be >= 0"):
        security_curve([0.1, math.nan], [0.1])


def test_plot_several_models(report, tmp_path):
    other = np.asarray(report.samples["distance_hofmn"]) * 1.5
    fig = plot_security_curve(
        [report, other], ["natural", "scaled"], path=tmp_path / "curve", title="t"
    )
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels[:2] == ["natural", "scaled"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [report.eps_value] * 2
    flagged = Report(**{**report.__dict__, "flags": [Flag("zero_gradients", "x")]})
    fig = plot_security_curve([flagged], ["masked"])
    assert fig.axes[0].lines[0].get_label() == "masked (UNRELIABLE)"


# ------------------------------------------------------------------------------ report


def test_report_json_round_trip_with_a_certified_entry(report, tmp_path):
    r = Report(**{k: v for k, v in report.__dict__.items() if k != "samples"})
    r.add_entry(
        Entry(
            name="smoothing",
            kind="certified",
            config={"sigma": 0.25, "n": 1000},
            seconds=1.5,
            robust_accuracy=None,
            robust_accuracy_at={"0.25": 0.5, "0.5": 0.25},
        )
    )
    r.flags.append(Flag("zero_gradients", "exactly zero at 1 of 64 points"))
    path = r.save(tmp_path / "report.json")
    data = json.loads(path.read_text())  # valid JSON: no bare Infinity / NaN
    assert data["reliable"] is False and data["entries"][-1]["kind"] == "certified"
    back = load_report(path)
    assert back == r and not back.reliable
    assert back.entry("smoothing").robust_accuracy_at == {"0.25": 0.5, "0.5": 0.25}
    with pytest.raises(ConfigError, match="already has an entry"):
        back.add_entry(back.entry("pgd"))
    with pytest.raises(ConfigError, match="kind"):
        Entry("x", "guess", {}, 0.0, None)
    text = back.format()
    assert text.startswith("UNRELIABLE evaluation") and "FLAG zero_gradients" in text


def test_report_records_settings_and_versions(report):
    hofmn = report.entry("hofmn")
    assert hofmn.config["tuning"]["trials"] == 3 and hofmn.config["steps"] == 30
    assert hofmn.config["loss"] in ("logit_diff", "ce", "dlr")
    assert hofmn.seconds > 0 and report.entry("pgd").config["steps"] == 20
    assert report.eps == "1/16" and report.eps_value == 1 / 16 and report.norm == "linf"
    assert {"torch", "pyautoattack", "optuna", "advprune"} <= set(report.versions)
    assert report.settings["attacks"] == ["hofmn", "pgd"] and report.dataset == "digits"


# ------------------------------------------------------------------------------ resume


def _run(model, splits, out, after_batch=None):
    return evaluate(
        model, splits, eps="1/8", attacks="apgd-ce,hofmn,pgd", batch_size=32,
        **{**FAST, "n": 96, "fmn_steps": 20}, out=out, after_batch=after_batch,
        hofmn_cache=False,  # the tuning itself is killed and resumed here (no cached result)
    )  # fmt: skip


class _KillError(Exception):
    pass


def test_killed_and_resumed_evaluation_equals_an_uninterrupted_one(model, splits, tmp_path):
    whole = _run(model, splits, tmp_path / "whole")

    def kill_at(target):
        def hook(attack, batch):
            if (attack, batch) == target:
                raise _KillError

        return hook

    out = tmp_path / "resumed"
    with pytest.raises(_KillError):  # during HO-FMN tuning, after trial 1 was saved
        _run(model, splits, out, kill_at(("hofmn-tuning", 1)))
    assert len(json.loads((out / "hofmn_study.json").read_text())["trials"]) == 2
    calls = {"n": 0}

    def die(*_):
        calls["n"] += 1
        if calls["n"] == 25:  # a forward pass in the middle of a batch of the final FMN run
            raise _KillError

    handle = model.register_forward_hook(die)
    try:
        with pytest.raises(_KillError):
            _run(model, splits, out)
    finally:
        handle.remove()
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "batches").iterdir()}
    assert "apgd-ce_00002.npz" in saved and "pgd_00000.npz" not in saved
    resumed = _run(model, splits, out)
    for name, mtime in saved.items():  # finished batches were read back, not recomputed
        assert (out / "batches" / name).stat().st_mtime_ns == mtime
    # exact by construction: every batch has its own seed, so the resumed run computes the
    # batches it lacks with the same code, seeds and inputs as the whole run, in this process
    for key, value in whole.samples.items():
        assert np.array_equal(resumed.samples[key], value), key
    assert [e.robust_accuracy for e in resumed.entries] == [
        e.robust_accuracy for e in whole.entries
    ]
    assert resumed.entry("hofmn").config == whole.entry("hofmn").config
    assert resumed.curve == whole.curve
    on_disk = load_report(out / "report.json")
    assert on_disk.entry("hofmn").config == whole.entry("hofmn").config


def test_resuming_with_other_settings_is_refused(model, splits, tmp_path):
    out = tmp_path / "run"
    evaluate(model, splits, eps="1/8", attacks="pgd", n=32, check_n=16, probe_steps=10, out=out)
    with pytest.raises(ConfigError, match=r"other settings \(settings.eps, settings.eps_value"):
        evaluate(model, splits, eps="1/16", attacks="pgd", n=32, check_n=16, out=out)
    other = natural_digits_model(epochs=1)
    with pytest.raises(ConfigError, match="model_sha256 differ"):
        evaluate(other, splits, eps="1/8", attacks="pgd", n=32, check_n=16, probe_steps=10,
                 out=out)  # fmt: skip


# ------------------------------------------------------------------------------ bad input


class _Counting(torch.nn.Module):
    """Wraps a model and counts forward passes (to prove no attack ran)."""

    def __init__(self, inner, transform=None) -> None:
        super().__init__()
        self.inner, self.transform, self.calls = inner, transform, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return self.transform(out) if self.transform else out


@pytest.mark.parametrize(
    ("transform", "words"),
    [
        (lambda z: z.softmax(1), "probabilities"),
        (lambda z: z[:, :3], "3 logits per input but the data has 10 classes"),
        (lambda z: z.argmax(1), "shape (N, classes)"),
        (lambda z: (z, z), "returned tuple"),
        (lambda z: z * math.nan, "non-finite"),
    ],
)
def test_bad_model_outputs_fail_before_any_attack(model, splits, tmp_path, transform, words):
    wrapped = _Counting(model, transform)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        evaluate(wrapped, splits, eps="1/8", attacks="pgd", n=16, out=tmp_path / "o")
    assert "\n" not in str(e.value)
    assert wrapped.calls == 1 and not (tmp_path / "o").exists()


def test_bad_data_and_settings_fail_before_any_attack(model, tmp_path):
    wrapped = _Counting(model)
    x, y = digits_test(16)
    cases = [
        ((x * 16, y), {}, ConfigError, r"must be in \[0, 1\]"),
        ((x - 0.5, y), {}, ConfigError, r"must be in \[0, 1\]"),
        ((x[:0], y[:0]), {}, ConfigError, "evaluation set is empty"),
        ((x, y), {"eps": "8"}, ConfigError, "did you mean 8/255"),
        ((x, y), {"attacks": "autoattack,hofmnn"}, UnknownNameError, "unknown attack 'hofmnn'"),
        ((x, y), {"aa_version": "fast"}, UnknownNameError, "standard"),
        ((x, y), {"eps": "0"}, ConfigError, "eps must be > 0"),
        ((x, y), {"attacks": "hofmn"}, ConfigError, "tuning split"),
        ((x, y + 20), {}, DataError, "labels must be in"),
        ((x, y), {"norm": "l3"}, ConfigError, "unknown norm"),
    ]
    for data, kwargs, error, words in cases:
        settings = {"eps": "1/8", "attacks": "pgd", **kwargs}
        with pytest.raises(error, match=words):
            evaluate(wrapped, data, out=tmp_path / "o", **settings)
        assert not (tmp_path / "o").exists()
    assert wrapped.calls <= 2  # only the two clean passes that found the bad labels


def test_any_module_and_tensor_data(model, tmp_path):
    x, y = digits_test(48)
    plain = torch.nn.Sequential(model)  # any nn.Module, not an advprune model
    r = evaluate(plain, (x, y), eps=1 / 16, attacks="fmn", tune_data=None, fmn_steps=30,
                 check_n=16, probe_steps=10)  # fmt: skip
    assert r.n == 48 and r.eps_value == 1 / 16 and r.dataset is None
    assert r.entry("fmn").robust_accuracy == r.curve_at()
    masked = evaluate(RoundedInputs(model), (x, y), eps=1 / 16, attacks="fmn", fmn_steps=10,
                      check_n=16, probe_steps=10)  # fmt: skip
    d = masked.samples["distance_fmn"]
    correct = masked.samples["clean_correct"]
    assert np.isinf(d[correct]).all() and (d[~correct] == 0).all()  # failed: +inf, not 0


def test_custom_eps_grid_with_exact_fractions(model, splits):
    x, y = digits_test(32)
    rep = evaluate(model, (x, y), eps="1/16", attacks="fmn", eps_grid="0, 1/32, 1/8", **FAST)
    eps = rep.curve["eps"]
    assert eps == [0.0, 1 / 32, 1 / 16, 1 / 8]  # eps added, sorted, exact
    d = rep.samples["distance_min"]
    assert rep.curve["robust_accuracy"] == [float(np.mean(d > e)) for e in eps]
    assert rep.settings["eps_grid"] == eps
    with pytest.raises(ConfigError, match="did you mean 8/255"):
        evaluate(model, (x, y), eps="1/16", attacks="fmn", eps_grid="0,8", **FAST)
    with pytest.raises(ConfigError, match="eps_grid is empty"):
        evaluate(model, (x, y), eps="1/16", attacks="fmn", eps_grid=" , ", **FAST)
