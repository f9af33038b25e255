"""``advprune profile`` and ``eval --profile``: parameter, MAC and file-size figures against
hand-computed values, latency bookkeeping, the results store (version 1 stores stay readable and
migrate on the next write) and the leaderboard's cost columns."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
import torch

from advprune.bench.leaderboard import collect, markdown
from advprune.bench.store import ResultsStore
from advprune.checkpoint import compact_checkpoint, save_checkpoint
from advprune.cli import main
from advprune.evaluation import Entry, Report
from advprune.models import create
from advprune.sparsity import FixedMask, attach_mask, prune_magnitude
from advprune.sparsity.profiling import compressed_bytes, state_dict_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE_PARAMS, DENSE_MACS = 226_794, 2_511_360  # digits CNN, by hand in tests/test_profiling.py


def _conv(h: int, w: int, c_in: int, c_out: int, k: int = 3) -> int:
    return h * w * c_out * c_in * k * k


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _profile(path: Path, *extra: str) -> dict:
    code, out, err = _run(["profile", str(path), "--json", *extra])
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def channels(tmp_path_factory) -> Path:
    """The hand-computed case: the second conv reads 16 of its 32 input channels."""
    torch.manual_seed(0)
    model = create("digits_cnn")
    conv = model.features[3]
    mask = torch.zeros(32)
    mask[:16] = 1
    attach_mask(conv, FixedMask(conv.weight.shape, "channels", mask))
    return save_checkpoint(tmp_path_factory.mktemp("profile") / "masked" / "model", model, {})


def test_profile_of_a_dense_model_by_hand(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "model", create("digits_cnn"), {})
    data = _profile(path, "--no-latency")
    s = data["summary"]
    assert (s["base_params"], s["kept_params"]) == (DENSE_PARAMS, DENSE_PARAMS)
    assert s["base_macs"] == s["macs"] == s["kept_macs"] == DENSE_MACS
    assert s["timed"] == "plain (as stored)" and s["latency"] == []
    layers = {r["name"]: r["flops_dense"] for r in data["profile"]["layers"]}
    assert layers == {"features.0": _conv(8, 8, 1, 32), "features.3": _conv(8, 8, 32, 64),
                      "features.7": _conv(4, 4, 64, 128), "classifier.0": 512 * 256,
                      "classifier.2": 256 * 10}  # fmt: skip
    assert s["files"]["checkpoint"] == path.stat().st_size
    assert s["files"]["dense"] == state_dict_bytes(create("digits_cnn").state_dict())


def test_profile_of_resnet18_by_hand(tmp_path: Path) -> None:
    model = create("resnet18")
    prune_magnitude(model, 0.9)  # unstructured: dense kernels, ideal MACs counted
    path = save_checkpoint(tmp_path / "model", model, {})
    s = _profile(path, "--no-latency")["summary"]
    assert (s["base_params"], s["base_macs"]) == (11_173_962, 555_422_720)  # by hand
    assert s["timed"] == "masks folded" and s["macs"] == 555_422_720
    assert s["kept_macs"] < 0.11 * s["macs"] and s["notes"]


def test_profile_of_a_channel_pruned_model_by_hand(channels: Path, tmp_path: Path) -> None:
    kept_params = DENSE_PARAMS - 16 * 64 * 9 - 16 * 9 - 2 * 16  # conv 3 inputs, conv 0 filters
    kept_macs = DENSE_MACS - _conv(8, 8, 16, 64) - _conv(8, 8, 1, 16)
    data = _profile(channels, "--batch-sizes", "1,4", "--repeats", "2", "--warmup", "1",
                    "--threads", "1", "--device", "cpu")  # fmt: skip
    s = data["summary"]
    assert s["timed"] == "compacted in memory"
    assert (s["base_params"], s["kept_params"]) == (DENSE_PARAMS, kept_params)
    assert (s["base_macs"], s["macs"], s["kept_macs"]) == (DENSE_MACS, kept_macs, kept_macs)
    assert s["params_fraction"] == kept_params / DENSE_PARAMS
    assert s["macs_fraction"] == kept_macs / DENSE_MACS
    assert set(s["files"]) == {"checkpoint", "dense", "compressed", "compacted"}
    assert s["files"]["compacted"] < s["files"]["dense"]
    assert [(r["device"], r["batch_size"], r["threads"]) for r in s["latency"]] == [
        ("cpu", 1, 1), ("cpu", 4, 1)]  # fmt: skip
    for r in s["latency"]:
        assert r["speedup"] == pytest.approx(r["baseline_median_ms"] / r["median_ms"])
        assert r["repeats"] == 2 and r["warmup"] == 1
    # the compacted checkpoint: the same figures, timed as stored
    thin, _ = compact_checkpoint(channels, tmp_path / "thin" / "model")
    t = _profile(thin, "--no-latency")["summary"]
    assert t["timed"] == "compacted" and t["kept_params"] == kept_params
    assert t["macs"] == kept_macs and t["files"]["checkpoint"] == thin.stat().st_size
    # text output: per-layer MACs, the figures, the file written with --out
    code, out, _ = _run(["profile", str(channels), "--no-latency", "--out",
                         str(tmp_path / "p.json")])  # fmt: skip
    assert code == 0 and "features.3" in out and f"{kept_params:,} kept of" in out
    assert json.loads((tmp_path / "p.json").read_text())["summary"] == s | {
        "latency": [], "files": s["files"]}  # fmt: skip
    for bad in (["--batch-sizes", "0,4"], ["--device", "tpu"], ["--repeats", "0"]):
        code, _, err = _run(["profile", str(channels), *bad])
        assert code == 2 and err.count("\n") == 1


def test_compressed_size_is_the_file_size(channels: Path, tmp_path: Path) -> None:
    s = _profile(channels, "--no-latency")["summary"]
    code, _, err = _run(["export", str(channels), "--out", str(tmp_path / "c"), "--compressed"])
    assert code == 0, err
    assert s["files"]["compressed"] == (tmp_path / "c" / "model.safetensors").stat().st_size
    assert compressed_bytes({"w": torch.zeros(100)}) < state_dict_bytes({"w": torch.zeros(100)})


def test_eval_profile_reaches_report_store_and_leaderboard(channels: Path, tmp_path: Path):
    code, out, err = _run(["eval", str(channels), "--attacks", "pgd", "--n", "32",
                           "--eval-steps", "2", "--profile", "--out", str(tmp_path / "e"),
                           "--progress", "off"])  # fmt: skip
    assert code == 0, err
    assert "  cost: params " in out and "speed-up vs dense" in out
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    profile = report["model"]["profile"]
    assert profile["timed"] == "compacted in memory"
    assert [r["batch_size"] for r in profile["latency"]] == [1, 256]
    key = "LWM_Han2015Learning_DCNN_DIGITS_S_50"
    store = ResultsStore(tmp_path / "results.sqlite")
    rows = store.add_report(tmp_path / "e" / "report.json", key)
    assert all(r.profile == profile for r in rows)
    board = collect(store, reference=False)
    (row,) = board.measured
    assert row.params_kept == pytest.approx(100 * profile["params_fraction"])
    text = markdown(board)
    assert "What the pruning bought" in text
    line = next(x for x in text.splitlines() if x.startswith(f"| `{key}`"))
    cpu256 = next(r for r in profile["latency"] if r["batch_size"] == 256)
    assert f"{100 * profile['params_fraction']:.2f}" in line
    assert f"{cpu256['speedup']:.2f}x (cpu, batch 256)" in line


def _report(clean: float) -> Report:
    return Report(n=10, clean_accuracy=clean, robust_accuracy=0.5, eps="3/16", eps_value=3 / 16,
                  norm="linf", dataset="digits",
                  entries=[Entry("pgd", "empirical", {}, 1.0, 0.5)])  # fmt: skip


def test_a_version_1_store_stays_readable_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    old = "LWM_Han2015Learning_DCNN_DIGITS_US_90"
    store.add_report(_report(0.9), old)
    con = sqlite3.connect(path)  # the store as advprune 0.1 wrote it: no profile column
    con.execute("ALTER TABLE results DROP COLUMN profile")
    con.execute("UPDATE advprune_store SET version = 1")
    con.commit()
    con.close()
    v1 = ResultsStore(path)
    assert [r.profile for r in v1.results()] == [None, None]
    assert "What the pruning bought" not in markdown(collect(v1, reference=False))
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(results)")]
    assert "profile" not in columns  # reading did not change the file
    new = _report(0.8)
    new.model = {"profile": {"params_fraction": 0.25, "macs_fraction": 0.3, "latency": [],
                             "timed": "compacted"}}  # fmt: skip
    v1.add_report(new, "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_90")  # the write migrates
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM advprune_store").fetchone() == (2,)
    con.close()
    again = ResultsStore(path)
    assert {r.key: r.profile is None for r in again.results(attack="pgd")} == {
        old: True, "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_90": False}  # fmt: skip
    con = sqlite3.connect(path)
    con.execute("UPDATE advprune_store SET version = 3")
    con.commit()
    con.close()
    with pytest.raises(Exception, match="store version 3; this advprune reads versions 1, 2"):
        ResultsStore(path).results()
