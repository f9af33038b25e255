"""Every registered method's pruned model exports to a dense checkpoint that loads into the
plain architecture with ``strict=True`` and computes exactly what the pruned model computed.

Parametrised over :func:`advprune.methods.list_methods`, so a newly registered method is
covered without editing this file. Each method runs its real prune stage (one short epoch of
training where the method trains while pruning) on a small digits CNN.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advprune.checkpoint import export_checkpoint, load_checkpoint, read_card
from advprune.cli import main
from advprune.config import RunConfig
from advprune.methods import list_methods, method_class
from advprune.models import ModelSpec, create
from advprune.pipeline import prepare_data, prune_stage
from advprune.sparsity import layer_densities, sparsity_report

CASES = [  # structure "nm" as its usual text form, 2:4
    (name, "2:4" if structure == "nm" else structure)
    for name in list_methods()
    for structure in method_class(name).structures
]


@pytest.fixture(scope="module")
def data():
    cfg = RunConfig(dataset="digits", progress=False)
    return prepare_data(cfg)


@pytest.mark.parametrize("name,structure", CASES)
def test_export_loads_strictly_into_the_plain_model(tmp_path: Path, data, name, structure):
    sparsity = 0.9 if structure == "unstructured" else 0.5
    cfg = RunConfig(
        method=name,
        sparsity=sparsity,
        structure=structure,
        objective="natural",
        epochs=1,
        batch_size=256,
        lr=0.05,
        progress=False,
        device="cpu",
    )
    torch.manual_seed(0)
    model = create("digits_cnn", width=8)
    pruned, _ = prune_stage(cfg, data, model, out=tmp_path / "pruned")
    src = tmp_path / "pruned" / "model.safetensors"
    dst = export_checkpoint(src, tmp_path / "dense" / "model.safetensors")

    card = read_card(dst)
    assert not card["masks"] and card["sparsity"]["exported"]
    # the card keeps the method, its options and the per-layer density of the pruned model
    assert card["method"]["name"] == name and card["method"]["structure"] == structure
    assert card["method"]["options"] == read_card(src)["method"]["options"]
    measured = layer_densities(pruned)
    assert card["sparsity"]["masked_layers"] == pytest.approx(measured)
    assert set(card["sparsity"]["target_layers"]) == set(measured)

    # strict load into the plain architecture recorded in the card (variants included)
    plain = ModelSpec.from_dict(card["architecture"]).build()
    plain.load_state_dict(load_file(str(dst)), strict=True)
    assert not any("parametrizations" in k for k in plain.state_dict())
    plain.eval()
    pruned.eval()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), pruned(x))
    # the exported weights hold the pruned model's sparsity
    assert sparsity_report(plain).kept == sparsity_report(pruned).kept
    # and load_checkpoint agrees
    again, _ = load_checkpoint(dst)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), plain(x))


def test_cli_export(tmp_path: Path, data) -> None:
    cfg = RunConfig(method="lwm", sparsity=0.8, progress=False)
    torch.manual_seed(0)
    prune_stage(cfg, data, create("digits_cnn", width=8), out=tmp_path / "p")
    src = tmp_path / "p" / "model.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", str(src), "--out", str(tmp_path / "d")])
        bad = main(["export", str(src), "--out", str(tmp_path / "p")])
    assert rc == 0 and "exported" in out.getvalue()
    assert bad == 2 and "holds the input checkpoint" in err.getvalue()
    card = json.loads((tmp_path / "d" / "model.json").read_text())
    assert card["exported_from"]["sha256"] == read_card(src)["tensors"]["sha256"]
    assert card["sparsity"]["measured"] == pytest.approx(0.8, abs=1e-4)
