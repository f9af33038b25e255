"""benchmark(): compliance, normalisation, stored rows and the submission entry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import advprune
from _digits_models import digits_splits, natural_digits_model
from advprune.bench.contribute import benchmark, check_compliance
from advprune.bench.keys import parse_key
from advprune.bench.store import ResultsStore
from advprune.checkpoint import save_checkpoint, sha256_file
from advprune.cli import main
from advprune.errors import ConfigError
from advprune.methods import create_method
from advprune.models import create

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_50"


def pruned_digits_model():
    """The natural digits model (width 8) with HYDRA masks at 50 %."""
    model = create("digits_cnn", width=8)
    model.load_state_dict(natural_digits_model().state_dict())
    create_method("hydra", 0.5).prune(model)
    return model


def test_benchmark_stores_and_writes_submission(tmp_path):
    model = pruned_digits_model()
    path = save_checkpoint(tmp_path / "ckpt" / "model.safetensors", model)
    result = benchmark(model, KEY, digits_splits(), out=tmp_path / "out", attacks=("pgd",),
                       n=48, checkpoint=path)  # fmt: skip
    assert result.compliant and result.compliance["missing"] == []
    sub = json.loads(result.submission_path.read_text())
    assert sub == result.submission
    assert sub["model_key"] == KEY and sub["taxonomy"]["name"] == "HYDRA"
    assert sub["eps"] == "3/16" and sub["n"] == 48 and sub["norm"] == "linf"
    assert sub["normalization"] == {"mean": [0.0], "std": [1.0]}
    assert sub["autoattack_robust_accuracy"] is None
    assert sub["worst_case_robust_accuracy"] == result.report.robust_accuracy
    assert sub["robust_accuracy_by_attack"]["pgd"] == result.report.robust_accuracy
    assert sub["checkpoint_sha256"] == sha256_file(path)
    assert sub["distances"] == {
        "path": "per_sample.npz",  # beside submission.json
        "sha256": sha256_file(tmp_path / "out" / "per_sample.npz"),
    }
    assert sub["advprune_version"] == advprune.__version__
    rows = ResultsStore(tmp_path / "out" / "results.sqlite").results(key=KEY)
    assert [r.attack for r in rows] == ["pgd", "worst-case"]
    assert rows[-1].clean_accuracy == result.report.clean_accuracy > 0.8


class Foreign(nn.Module):
    """A model of another layout (not advprune's digits_cnn)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def test_noncompliant_model(tmp_path):
    with pytest.raises(ConfigError, match="normalisation"):
        benchmark(Foreign(), KEY, digits_splits(), out=tmp_path / "a", attacks=("pgd",), n=16)
    with pytest.raises(ConfigError, match=r"strict=True: missing .*unexpected body\.1\.bias"):
        benchmark(Foreign(), KEY, digits_splits(), out=tmp_path / "b", attacks=("pgd",), n=16,
                  normalization="none")  # fmt: skip
    assert not (tmp_path / "b").exists()
    result = benchmark(Foreign(), "LWM_Han2015Learning_DCNN_DIGITS_US_90", digits_splits(),
                       out=tmp_path / "c", attacks=("pgd",), n=16, normalization="none",
                       require_compliance=False)  # fmt: skip
    assert not result.compliant and "body.1.weight" in result.compliance["unexpected"]
    assert result.submission["compliance"]["compliant"] is False
    assert result.submission["normalization"] is None


def test_compliance_names_the_extra_key_and_records_normalisation(tmp_path):
    model = pruned_digits_model()
    model.register_buffer("temperature", torch.ones(1))
    result = check_compliance(model, parse_key(KEY))
    assert not result["compliant"]
    assert (result["missing"], result["unexpected"]) == ([], ["temperature"])
    with pytest.raises(ConfigError, match=r"strict=True: unexpected temperature$"):
        benchmark(model, KEY, digits_splits(), out=tmp_path / "x", attacks=("pgd",), n=16)
    assert not (tmp_path / "x").exists()
    # a model without advprune's spec is checked against the base at its default width (32):
    # a width-8 one does not fit, a width-32 one does; the normalisation the caller states is
    # recorded in the submission and in the stored report
    narrow = pruned_digits_model()
    del narrow.spec
    result = check_compliance(narrow, parse_key(KEY))
    assert result["mismatched"] and "features.0.weight" in result["mismatched"]
    plain = create("digits_cnn")
    del plain.spec
    norm = {"mean": [0.5], "std": [0.25]}
    with pytest.raises(ConfigError, match="normalization must be"):
        benchmark(plain, KEY, digits_splits(), out=tmp_path / "y", normalization={"mean": [0]})
    result = benchmark(plain, KEY, digits_splits(), out=tmp_path / "z", attacks=("pgd",),
                       n=16, normalization=norm)  # fmt: skip
    assert result.compliant and result.submission["normalization"] == norm
    stored = ResultsStore(tmp_path / "z" / "results.sqlite").report(KEY, "linf-3/16")
    assert stored["model"]["normalization"] == norm and stored["model"]["key"] == KEY


def test_data_of_another_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="for digits but the data is cifar10"):
        benchmark(pruned_digits_model(), KEY, "cifar10", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unknown_method_gets_a_note(tmp_path):
    result = benchmark(pruned_digits_model(), "MYAP_Me2026New_DCNN_DIGITS_US_90",
                       digits_splits(), out=tmp_path, attacks=("pgd",), n=16)  # fmt: skip
    assert result.submission["taxonomy"] is None
    assert "not in the taxonomy" in result.submission["taxonomy_note"]


def test_cli(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "m" / "model.safetensors", pruned_digits_model())
    monkeypatch.setenv("ADVPRUNE_STORE", str(tmp_path / "shared.sqlite"))
    code = main(["benchmark", str(path), "--key", KEY, "--out", str(tmp_path / "o"),
                 "--attacks", "pgd", "--n", "16", "--no-progress"])  # fmt: skip
    assert code == 0
    assert "submission entry" in capsys.readouterr().out
    sub = json.loads((tmp_path / "o" / "submission.json").read_text())
    assert sub["checkpoint_sha256"] == sha256_file(path) and sub["n"] == 16
    # the store: --store, else $ADVPRUNE_STORE, else OUT/results.sqlite
    assert ResultsStore(tmp_path / "shared.sqlite").keys() == [KEY]
    assert not (tmp_path / "o" / "results.sqlite").exists()
    assert main(["benchmark", str(path), "--key", "bad", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "p").exists()
