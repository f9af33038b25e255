"""The embedded quickstart, run in full, and the example configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advprune.checkpoint import load_checkpoint
from advprune.config import load_config
from advprune.quickstart import format_table, run_quickstart

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_results(tmp_path) -> None:
    rows = run_quickstart(tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["sparsity"] for r in saved] == [0.0, 0.9, 0.95, 0.99]
    assert [r["method"] for r in saved] == ["dense", "lwm", "lwm", "lwm"]
    keys = {"method", "sparsity", "measured_sparsity", "clean_accuracy", "robust_accuracy",
            "attack", "eps", "checkpoint"}  # fmt: skip
    for row in saved:
        assert keys <= set(row)
        assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-3)
        assert 0 <= row["robust_accuracy"] <= row["clean_accuracy"] <= 1
        assert row["eps"] == "3/16" and row["attack"].startswith("PGD-20")
        _, card = load_checkpoint(row["checkpoint"])
        assert card["sparsity"]["measured"] == pytest.approx(row["sparsity"], abs=1e-3)
    dense = saved[0]
    # far above chance (10 %) under PGD-20 at 3/16
    assert dense["clean_accuracy"] > 0.9 and dense["robust_accuracy"] > 0.4
    assert "lwm" in format_table(rows)


def test_example_configs_load() -> None:
    paths = [
        p for p in sorted((ROOT / "configs").glob("*.yaml")) if "sparsities" not in p.read_text()
    ]
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert 0 < cfg.eps_value() <= 1
