"""The layers hold: the import-linter contract passes, and loading a checkpoint of any method
imports no method, benchmark, certification or training code (nor scipy, nor more of torch.fx
than ``import torch`` loads itself)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advprune.checkpoint import save_checkpoint
from advprune.methods import create_method
from advprune.models import create

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_passes() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "advprune layers KEPT" in done.stdout
    assert "0 broken" in done.stdout


_PROBE = """
import json, sys
import torch  # the baseline: what torch itself imports
before = set(sys.modules)
from advprune.checkpoint import load_checkpoint
kinds = []
for path in sys.argv[1:]:
    model, card = load_checkpoint(path)
    model(torch.zeros(1, 1, 8, 8))
    kinds += sorted({s["kind"] for s in card["masks"].values()})
new = sorted(set(sys.modules) - before)
print(json.dumps({"kinds": kinds, "new": new}))
"""


def test_loading_hydra_and_harp_checkpoints_imports_no_method_code(tmp_path: Path) -> None:
    paths = []
    for name in ("hydra", "harp"):
        torch.manual_seed(0)
        model = create("digits_cnn", num_classes=10, in_channels=1)
        create_method(name, 0.8).prune(model)
        paths.append(str(save_checkpoint(tmp_path / f"{name}.safetensors", model, {})))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["hydra", "harp"]
    new = result["new"]
    for forbidden in ("advprune.methods", "advprune.bench", "advprune.certify",
                      "advprune.training", "advprune.evaluation", "scipy", "torch.fx"):  # fmt: skip
        hits = [m for m in new if m == forbidden or m.startswith(forbidden + ".")]
        assert not hits, f"load_checkpoint imported {hits[:5]}"
    assert "advprune.checkpoint" in new and "advprune.sparsity.masks" in new  # the probe works


@pytest.mark.parametrize("planted", ["advprune.methods", "advprune.evaluation"])
def test_the_probe_sees_a_planted_import(tmp_path: Path, planted: str) -> None:
    """The check above would fail if checkpoint loading pulled in a higher layer again."""
    model = create("digits_cnn", num_classes=10, in_channels=1)
    path = str(save_checkpoint(tmp_path / "m.safetensors", model, {}))
    code = _PROBE.replace("kinds = []", f"import {planted}\nkinds = []")
    done = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, check=False
    )
    new = json.loads(done.stdout.strip().splitlines()[-1])["new"]
    assert any(m == planted for m in new)


def test_no_import_cycle_between_modules() -> None:
    """Within a layer too: no two advprune modules import each other, even from inside a
    function (grimp reads function-level imports). tools/import_graph.py prints the graph."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("advprune", cache_dir=None)
    modules = [m for m in graph.modules if m.startswith("advprune.")]
    cycles = set()
    for m in modules:
        for other in graph.find_modules_directly_imported_by(m):
            if other.startswith("advprune.") and graph.chain_exists(other, m, as_packages=False):
                cycles.add(tuple(sorted((m, other))))
    assert not cycles, f"modules in an import cycle: {sorted(cycles)}"
