"""The local executor: K job processes at once, pinning, a failing job, kill and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from _grid_helpers import (
    BIN90,
    BIN95,
    LWM90,
    LWM95,
    cli,
    gone,
    job_held,
    mtimes,
    stored_once,
    wait_for,
    write_grid,
)
from advprune.bench.executors import default_workers, job_command, slot_env
from advprune.bench.grid import jobs, load_grid


def test_pinning_and_default_workers(monkeypatch, tmp_path):
    gpus = ["0", "1"]
    pins = [slot_env(slot, 4, gpus, 8) for slot in range(4)]
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == ["0", "1", "0", "1"]
    assert {p["OMP_NUM_THREADS"] for p in pins} == {"2"}
    assert "CUDA_VISIBLE_DEVICES" not in slot_env(0, 4, [], 2)
    assert slot_env(0, 4, [], 2)["OMP_NUM_THREADS"] == "1"  # never 0 threads
    assert slot_env(1, 4, gpus, 8, threads=1)["OMP_NUM_THREADS"] == "1"  # --threads wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert default_workers() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert default_workers() == max(1, len(os.sched_getaffinity(0)) // 2)
    # the multi-GPU hook: a job of G GPUs is G processes under torchrun
    job = jobs(load_grid(write_grid(tmp_path)))[0]
    cmd = job_command("g.yaml", job, "out", gpus=4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[5:7] == ["-m", "advprune.cli"] and cmd[cmd.index("--job") + 1] == "0"


def test_two_workers_kill_failure_and_rerun(tmp_path):
    """Killed at a random moment, rerun with a failing job, rerun: every job stored once and
    no finished job redone."""
    grid = write_grid(tmp_path)
    out, store = tmp_path / "out", tmp_path / "out" / "results.sqlite"
    run = [sys.executable, "-m", "advprune.cli", "bench", "run", str(grid), "--out", str(out),
           "--workers", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        run, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:  # kill the run (its parent process only) once the first job has finished
        wait_for(lambda: mtimes(out), what="a finished job")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        first_output = proc.communicate()[0].decode()
    workers = [e["pid"] for e in json.loads((out / "submissions.json").read_text()).values()]
    assert len(workers) >= 2, first_output  # two jobs were running at once
    wait_for(lambda: all(gone(pid) for pid in workers), 30, "the job processes to end")
    finished = mtimes(out)
    unfinished = sorted({LWM90, LWM95, BIN90, BIN95} - set(finished))
    assert unfinished, "every job finished before the kill"

    # rerun while "another process" holds one unfinished job: it fails, the others finish
    held = unfinished[0]
    with job_held(out, held):
        res = cli("bench", "run", str(grid), "--out", str(out), "--workers", "2", "--no-progress")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{held}: FAILED (exit 2)" in res.stdout
    assert "is running in another process" in res.stdout  # the last lines of its log
    assert f"{len(unfinished) - 1} ran," in res.stdout and "1 failed" in res.stdout
    assert set(stored_once(store)) == {LWM90, LWM95, BIN90, BIN95} - {held}
    assert all(mtimes(out)[key] == t for key, t in finished.items())  # none redone

    status = cli("bench", "status", str(grid), "--out", str(out))
    line = next(s for s in status.stdout.splitlines() if held in s)
    assert "failed" in line and "exit 2" in line
    assert "| error: job" in status.stdout and "is running in another process" in status.stdout

    res = cli("bench", "run", str(grid), "--out", str(out), "--workers", "2", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 ran, 3 already stored" in res.stdout
    assert stored_once(store) == dict.fromkeys([LWM90, LWM95, BIN90, BIN95], 1)
    assert all(mtimes(out)[key] == t for key, t in finished.items())
    # each job process was pinned to its share of the cores
    log = (out / "logs" / f"{held}.log").read_text()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"{threads} CPU thread(s)" in log and f"OMP_NUM_THREADS={threads}" in log
    status = cli("bench", "status", str(grid), "--out", str(out))
    assert status.stdout.strip().endswith("4 done")


def test_bad_executor_settings_one_line(tmp_path, capsys):
    from advprune.cli import main

    grid = write_grid(tmp_path)
    for args, message in [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--executor", "slurm", "--threads", "2"], "Slurm jobs get --cpus-per-job"),
        (["--partition", "gpu"], "need --executor slurm"),
        (["--executor", "slurm", "--time", "soon"], "minutes or [D-]HH:MM:SS"),
        (["--executor", "slurm", "--mem", "lots"], "memory text like 32G"),
        (["--executor", "slurm", "--sbatch", "array=0-3"], "may not set array"),
        (["--executor", "slurm", "--gpus-per-job", "2"], "train on one GPU for now"),
    ]:
        assert main(["bench", "run", str(grid), "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match=r"slurm\.time"):
        load_grid(write_grid(tmp_path, slurm={"time": "0"}))
