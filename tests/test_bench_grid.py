"""Grid runs: jobs, job folders and the store, skipping, resuming after a crash, one process
per job."""

from __future__ import annotations

import fcntl
import json

import pytest
import yaml

from _grid_helpers import TINY
from advprune.bench.collect import ingest
from advprune.bench.grid import jobs, load_grid, run_job
from advprune.bench.store import ResultsStore
from advprune.cli import main
from advprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY's base and pretrain (tests/_grid_helpers.py) with HYDRA and a structured sparsity added
GRID = {
    **TINY,
    "methods": {
        "lwm": TINY["methods"]["lwm"],
        "hydra": {"prune": {"epochs": 1}, "finetune": {"epochs": 1}},
        "binary": TINY["methods"]["binary"],
    },
    "structures": ["unstructured", "filters"],
    "sparsities": {"unstructured": [0.9], "filters": [0.5]},
}
LWM = "LWM_Han2015Learning_DCNN_DIGITS_US_90"


def write(tmp_path, grid=GRID, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_jobs_keys_and_skips(tmp_path, capsys):
    grid = load_grid(write(tmp_path))
    all_jobs = jobs(grid)
    assert [j.key for j in all_jobs] == [
        LWM,
        "LWM_Han2015Learning_DCNN_DIGITS_S_50",
        "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_90",
        "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_S_50",
        "Binary_Liu2022Robust_DCNN_DIGITS_US_90",
        "Binary_Liu2022Robust_DCNN_DIGITS_S_50",
    ]
    assert [j.skip is not None for j in all_jobs] == [False] * 5 + [True]
    assert main(["bench", "run", str(write(tmp_path)), "--list", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and "not-started" in lines[0] and "skip" in lines[5]
    assert "does not support filters" in lines[5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: g["methods"].update(magic={}), "unknown method"),
        (lambda g: g.update(colour=1), "colour"),
        (lambda g: g["methods"]["lwm"]["finetune"].update(lr="fast"), "methods.lwm.finetune"),
        (lambda g: g.update(structures=["channels"]), "none for structure"),
        (lambda g: g["methods"]["hydra"].update(options={"colour": 1}), "hydra.prune.*colour"),
        (lambda g: g["evaluation"].update(attacks=["pgd", "magic"]), "unknown attack 'magic'"),
        (lambda g: g["evaluation"].update(options={"pgd_step": 5}), "options.*pgd_step"),
        (lambda g: g["evaluation"].update(eps="8/0"), "evaluation.eps"),
        (lambda g: g.update(architectures=["lenet"]), "lenet"),
    ],
)
def test_bad_grid_rejected_before_anything(tmp_path, change, message, capsys):
    grid = yaml.safe_load(yaml.safe_dump(GRID, sort_keys=False))
    change(grid)
    path = write(tmp_path, grid)
    with pytest.raises(ConfigError, match=message):
        load_grid(path)
    assert main(["bench", "run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_run_store_skip_and_resume_after_crash(tmp_path, monkeypatch):
    grid = load_grid(write(tmp_path))
    out, store = tmp_path / "out", tmp_path / "out" / "results.sqlite"
    lwm, hydra = jobs(grid)[0], jobs(grid)[2]
    record = run_job(grid, lwm, out, progress=False)
    assert record["key"] == LWM and record["protocol"] == "linf-3/16"
    assert not store.exists()  # a job writes its folder, never the store
    assert ingest(grid, lwm, out, store) is True
    rows = ResultsStore(store).results(key=LWM)
    assert rows[-1].n == 24 and rows[-1].protocol == "linf-3/16"
    dense = out / "dense" / "digits_cnn_digits" / "model.safetensors"
    dense_mtime = dense.stat().st_mtime_ns
    # a crash after the prune stage: the rerun reuses it (and the dense model), then finetunes
    monkeypatch.setenv("ADVPRUNE_GRID_CRASH", "after-prune")
    with pytest.raises(RuntimeError, match="test hook"):
        run_job(grid, hydra, out, progress=False)
    folder = out / "jobs" / hydra.key
    pruned = (folder / "prune" / "model.safetensors").stat().st_mtime_ns
    assert not (folder / "finetune").exists() and ingest(grid, hydra, out, store) is None
    monkeypatch.delenv("ADVPRUNE_GRID_CRASH")
    run_job(grid, hydra, out, progress=False)
    assert ingest(grid, hydra, out, store) is True
    assert (folder / "prune" / "model.safetensors").stat().st_mtime_ns == pruned
    assert (folder / "finetune" / "done").exists()
    assert dense.stat().st_mtime_ns == dense_mtime
    assert ResultsStore(store).keys() == sorted([LWM, hydra.key])
    # the model evaluated is the exported finetuned one, at the job's sparsity
    report = ResultsStore(store).report(hydra.key, "linf-3/16")
    assert report["model"]["measured_sparsity"] == pytest.approx(0.9, abs=0.01)
    exported = json.loads((folder / "export" / "model.json").read_text())
    assert exported["exported_from"]["path"].endswith("finetune/model.safetensors")
    # a grid changed since: the finished stage of other settings is refused, not reused
    changed = yaml.safe_load(yaml.safe_dump(GRID, sort_keys=False))
    changed["methods"]["hydra"]["finetune"]["epochs"] = 2
    changed_grid = load_grid(write(tmp_path, changed, "changed.yaml"))
    with pytest.raises(ConfigError, match=r"finished job with other settings \(stages.finetune.ep"):
        run_job(changed_grid, hydra, out)
    (folder / "done").unlink()  # without the job's record, the finished stage's guard holds
    with pytest.raises(ConfigError, match=r"finished finetune stage with other settings \(epochs"):
        run_job(changed_grid, hydra, out)


def test_one_process_per_job_failure_and_rerun(tmp_path, capfd):
    grid = yaml.safe_load(yaml.safe_dump(GRID, sort_keys=False))
    grid["methods"] = {"binary": grid["methods"]["binary"], "lwm": grid["methods"]["lwm"]}
    grid["structures"] = ["unstructured"]
    path = write(tmp_path, grid)
    out = tmp_path / "out"
    binary = "Binary_Liu2022Robust_DCNN_DIGITS_US_90"
    # the binary job is held by "another process" (this one): it fails, the lwm job still runs
    (out / "jobs").mkdir(parents=True)
    with open(out / "jobs" / f"{binary}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(["bench", "run", str(path), "--out", str(out), "--no-progress"]) == 1
    text = capfd.readouterr()
    assert f"{binary}: FAILED (exit 2)" in text.out
    assert "is running in another process" in text.out  # the last lines of its log
    assert "1 ran, 0 already stored, 0 skipped, 1 failed" in text.out
    store = ResultsStore(out / "results.sqlite")
    assert store.keys() == [LWM]
    assert main(["bench", "run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "1 ran, 1 already stored" in capfd.readouterr().out
    assert store.keys() == sorted([binary, LWM])
    added = [r.added for r in store.results()]
    assert main(["bench", "run", str(path), "--out", str(out), "--list"]) == 0
    assert [line.split()[1] for line in capfd.readouterr().out.splitlines()] == ["done"] * 2
    assert main(["bench", "run", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "0 ran, 2 already stored" in capfd.readouterr().out
    assert [r.added for r in store.results()] == added
