"""Compacted checkpoints (``advprune compact``): saved with every layer's width, rebuilt by
``load_checkpoint`` without Torch-Pruning, and accepted by ``eval``, ``export`` and the
benchmark (compliance: the base architecture resized to the recorded widths)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from advprune.bench.contribute import check_compliance
from advprune.bench.keys import parse_key
from advprune.checkpoint import (
    compact_checkpoint,
    export_checkpoint,
    load_checkpoint,
    load_weights,
    read_card,
    save_checkpoint,
)
from advprune.cli import main
from advprune.config import RunConfig
from advprune.errors import CheckpointError
from advprune.io import write_json_atomic
from advprune.models import create
from advprune.pipeline import prepare_data, prune_stage
from advprune.sparsity import count_params, sparsity_report
from advprune.sparsity.compaction import LOGITS_RTOL, logits_close
from advprune.sparsity.profiling import sparsity_vs_base

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "LWM_Han2015Learning_DCNN_DIGITS_S_50"


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    """A digits CNN with LWM channel masks at 50 %, as `advprune prune` saves it."""
    folder = tmp_path_factory.mktemp("compact")
    cfg = RunConfig(method="lwm", structure="channels", sparsity=0.5, progress=False, device="cpu")
    data = prepare_data(cfg, with_val=False)
    torch.manual_seed(0)
    prune_stage(cfg, data, create("digits_cnn", width=16), out=folder / "masked")
    return folder / "masked" / "model.safetensors"


@pytest.fixture(scope="module")
def compacted(masked: Path) -> Path:
    code, out, err = _run(["compact", str(masked), "--out", str(masked.parent.parent / "thin")])
    assert code == 0, err
    assert "compacted" in out and "% of the dense" in out
    return masked.parent.parent / "thin" / "model.safetensors"


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_compacted_checkpoint_round_trip(masked: Path, compacted: Path) -> None:
    parent, parent_card = load_checkpoint(masked)
    thin, card = load_checkpoint(compacted)
    record = card["compaction"]
    # every conv / linear / BatchNorm layer's width is recorded; the rebuilt model has them
    modules = dict(thin.named_modules())
    for name, width in record["widths"].items():
        module = modules[name]
        if "features" in width:
            assert module.num_features == width["features"]
        else:
            shape = module.weight.shape
            assert (shape[0], shape[1]) == (width["out"], width["in"]), name
    assert any(w.get("in", 0) < r["in_before"] for w, r in zip(record["widths"].values(),
                                                               record["layers"]))  # fmt: skip
    assert card["compacted_from"]["sha256"] == parent_card["tensors"]["sha256"]
    assert card["method"] == parent_card["method"] and not card["masks"]
    assert record["params"]["compacted"] == count_params(thin)[0] < count_params(parent)[0]
    assert record["sparsity_vs_base"] == pytest.approx(sparsity_vs_base(thin))
    # the per-layer record says which masked channels stayed and why
    kept = [r for r in record["layers"] if r["kept_masked"]]
    assert all(r["notes"] for r in kept)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ok, diff = logits_close(_logits(thin, x), _logits(parent, x))
    assert ok, f"compacted logits differ by {diff} (relative tolerance {LOGITS_RTOL})"
    code, out, _ = _run(["info", str(compacted)])
    assert code == 0 and "compacted" in out and "widths are in the card" in out
    with pytest.raises(CheckpointError, match=r"compacted .* load it with load_checkpoint"):
        load_weights(create("digits_cnn", width=16), compacted)


def test_loading_needs_no_torch_pruning(compacted: Path, tmp_path: Path) -> None:
    """In a fresh interpreter where importing torch_pruning fails, the model still loads."""
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch_pruning":
            raise ImportError("torch_pruning is blocked in this test")
sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file, save_file
from advprune.checkpoint import load_checkpoint
model, card = load_checkpoint({str(compacted)!r})
assert "torch_pruning" not in sys.modules
with torch.no_grad():
    y = model.eval()(load_file({str(tmp_path / "x.safetensors")!r})["x"])
save_file({{"y": y}}, {str(tmp_path / "y.safetensors")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    thin, _ = load_checkpoint(compacted)
    # same weights and operations in both processes (one thread here; the subprocess may use
    # more, which can reorder float sums): agree to float rounding
    torch.testing.assert_close(load_file(str(tmp_path / "y.safetensors"))["y"], _logits(thin, x))


def test_nothing_to_compact_is_one_line(masked: Path, compacted: Path, tmp_path: Path) -> None:
    model = create("digits_cnn", width=16)
    from advprune.sparsity import prune_magnitude

    prune_magnitude(model, 0.9)  # unstructured
    unstructured = save_checkpoint(tmp_path / "u" / "model", model, {})
    dense = save_checkpoint(tmp_path / "d" / "model", create("digits_cnn", width=16), {})
    for path, what in [(unstructured, "only unstructured masks"),
                       (dense, "no filters / channels masks"),
                       (compacted, "already compacted")]:  # fmt: skip
        code, out, err = _run(["compact", str(path), "--out", str(tmp_path / "c")])
        assert code == 2 and out == "" and err.count("\n") == 1 and what in err
    assert (
        "use `advprune export --compressed`"
        in _run(["compact", str(unstructured), "--out", str(tmp_path / "c")])[2]
    )
    code, _, err = _run(["compact", str(masked), "--out", str(masked.parent)])
    assert code == 2 and "holds the input checkpoint" in err
    assert not (tmp_path / "c").exists()


def test_round_to_and_an_exported_parent(masked: Path, tmp_path: Path) -> None:
    path, record = compact_checkpoint(masked, tmp_path / "r" / "model", round_to=8)
    assert load_checkpoint(path)[1]["compaction"]["round_to"] == 8
    last = record.layers[-1].name  # the logits: never removed, never rounded
    for layer in record.layers:
        if layer.type == "Conv2d" or (layer.type == "Linear" and layer.name != last):
            assert layer.out_after % 8 == 0, layer.name
    # an exported (masks folded) channels-pruned checkpoint compacts too: its card's method
    exported = export_checkpoint(masked, tmp_path / "e" / "model")
    again, record2 = compact_checkpoint(exported, tmp_path / "e2" / "model")
    assert record2.widths() == compact_checkpoint(masked, tmp_path / "m2" / "model")[1].widths()
    assert load_checkpoint(again)[1]["compacted_from"]["path"] == str(exported)


def test_damaged_widths_are_one_line(compacted: Path, tmp_path: Path) -> None:
    import shutil

    for name, edit, match in [
        ("type", lambda w: w["features.3"].update(type="Linear"), "recorded as 'Linear'"),
        ("width", lambda w: w["features.3"].update(out=3), "does not match architecture"),
        ("layer", lambda w: w.update({"nonsense.9": {"type": "Conv2d"}}), "not a conv"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        for suffix in (".safetensors", ".json"):
            shutil.copy(compacted.with_suffix(suffix), folder / f"model{suffix}")
        card = json.loads((folder / "model.json").read_text())
        edit(card["compaction"]["widths"])
        write_json_atomic(folder / "model.json", card)
        with pytest.raises(CheckpointError, match=match) as err:
            load_checkpoint(folder / "model.safetensors")
        assert "\n" not in str(err.value)


def test_eval_and_export_accept_compacted_checkpoints(masked: Path, compacted: Path, tmp_path):
    args = ["--attacks", "pgd", "--n", "64", "--eval-steps", "3", "--json", "--progress", "off"]
    code, out, err = _run(["eval", str(compacted), *args, "--profile"])
    assert code == 0, err
    report = json.loads(out)
    thin, _ = load_checkpoint(compacted)
    assert report["model"]["compacted"] is True
    assert report["model"]["measured_sparsity"] == pytest.approx(sparsity_vs_base(thin))
    profile = report["model"]["profile"]
    assert profile["timed"] == "compacted"
    assert profile["kept_params"] == count_params(thin)[1]
    assert profile["macs"] == sparsity_report(thin, (1, 8, 8)).flops_dense
    assert profile["files"]["checkpoint"] == compacted.stat().st_size
    assert report["model"]["key_parts"]["structure"] == "channels"
    code, out, err = _run(["eval", str(masked), *args])
    parent = json.loads(out)
    # the two models' logits agree to float rounding: at most a near-tie sample may differ
    assert abs(parent["clean_accuracy"] - report["clean_accuracy"]) <= 1 / 64
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for compressed in (False, True):
        out_dir = tmp_path / f"export_{compressed}"
        flag = ["--compressed"] if compressed else []
        code, out, err = _run(["export", str(compacted), "--out", str(out_dir), *flag])
        assert code == 0, err
        model, card = load_checkpoint(out_dir / "model.safetensors")
        assert card["compaction"]["widths"] == read_card(compacted)["compaction"]["widths"]
        assert torch.equal(_logits(model, x), _logits(thin, x))  # the same tensors, exactly


def test_benchmark_compliance_of_a_compacted_model(compacted: Path, tmp_path: Path) -> None:
    thin, _ = load_checkpoint(compacted)
    result = check_compliance(thin, parse_key(KEY))
    assert result["compliant"] and result["compacted"]["layers_changed"]
    assert "features.3" in result["compacted"]["layers_changed"]
    wider = create("digits_cnn", width=16)  # not the base with thinner layers: refused
    wider.features[0] = torch.nn.Conv2d(1, 40, 3, padding=1)
    bad = check_compliance(wider, parse_key(KEY))
    assert not bad["compliant"] and bad["compacted"] is None and bad["mismatched"]
    # under an unstructured key the same thinner model is not a compacted one: refused
    us = check_compliance(thin, parse_key(KEY.replace("_S_", "_US_")))
    assert not us["compliant"] and us["compacted"] is None and "features.3.weight" in (
        us["mismatched"])  # fmt: skip
    code, _, err = _run(["benchmark", str(compacted), "--key", KEY, "--attacks", "pgd", "--n",
                         "32", "--out", str(tmp_path / "b"), "--progress", "off"])  # fmt: skip
    assert code == 0, err
    submission = json.loads((tmp_path / "b" / "submission.json").read_text())
    assert submission["compliance"]["compliant"] and submission["compliance"]["compacted"]
