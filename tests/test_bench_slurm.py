"""The Slurm executor through submitit: the job array run by submitit's LocalExecutor, the
sbatch script's resources (a fake sbatch records it), bench status, resubmitting."""

from __future__ import annotations

import json
import os
import stat

import pytest

from _grid_helpers import BIN90, BIN95, LWM90, LWM95, cli, job_held, stored_once, write_grid

FAKE_SBATCH = """#!/bin/bash
n=$(ls "$FAKE_SLURM"/script_*.sh 2>/dev/null | wc -l)
cp "$1" "$FAKE_SLURM/script_$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
FAKE_SACCT = """#!/bin/bash
cat "$FAKE_SLURM/sacct.txt"
"""


def test_submitit_local_cluster_runs_the_array_and_reruns_what_failed(tmp_path):
    grid = write_grid(
        tmp_path, sparsities={"unstructured": [0.9]}, executor="slurm",
        slurm={"cluster": "local", "gpus_per_job": 0, "time": 20},
    )  # fmt: skip
    out, store = tmp_path / "out", tmp_path / "out" / "results.sqlite"
    env = {"ADVPRUNE_POLL_S": "0.2"}
    with job_held(out, BIN90):  # "another process" runs the binary job: it fails
        res = cli("bench", "run", str(grid), "--out", str(out), "--wait", "--no-progress", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "submitted 2 job(s) (local job" in res.stdout
    assert f"{BIN90}: FAILED" in res.stdout and "is running in another process" in res.stdout
    assert "2 submitted, 0 already queued, 0 already stored, 0 skipped; 1 ran, 1 failed" in (
        res.stdout
    )
    assert stored_once(store) == {LWM90: 1}

    status = cli("bench", "status", str(grid), "--out", str(out))
    lines = status.stdout.splitlines()
    assert any(LWM90 in line and " done " in line for line in lines)
    failed = next(line for line in lines if BIN90 in line)
    assert "failed" in failed and "local job" in failed
    tail = [line for line in lines if line.startswith("        | ")]
    assert any("is running in another process" in line for line in tail), status.stdout

    res = cli("bench", "run", str(grid), "--out", str(out), "--wait", "--no-progress", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 submitted, 0 already queued, 1 already stored" in res.stdout
    assert stored_once(store) == {LWM90: 1, BIN90: 1}


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    """sbatch / srun / sacct on PATH: sbatch keeps each script and answers a job id."""
    folder = tmp_path / "slurm"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "srun": "#!/bin/sh\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    (folder / "sacct.txt").write_text("JobID|State|NodeList\n")
    env = {"FAKE_SLURM": str(folder), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return folder, env


def test_sbatch_script_resources_status_and_resubmission(tmp_path, fake_slurm):
    folder, env = fake_slurm
    grid = write_grid(
        tmp_path, executor="slurm",
        slurm={"partition": "cpu", "account": "lab", "time": 90, "cpus_per_job": 4,
               "setup": ["source /opt/venv/bin/activate"], "sbatch": {"constraint": "a100"}},
    )  # fmt: skip
    out = tmp_path / "out"
    res = cli(
        "bench", "run", str(grid), "--out", str(out), "--partition", "gpu", "--time", "2:00:00",
        "--gpus-per-job", "1", "--mem", "32G", "--sbatch", "exclusive", "--sbatch",
        "comment=advprune grid", env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "submitted 4 job(s) (slurm job 4242...)" in res.stdout
    assert "4 submitted, 0 already queued" in res.stdout
    script = (folder / "script_0.sh").read_text()
    for line in [
        "#SBATCH --partition=gpu",  # the command line wins over the grid file
        "#SBATCH --account=lab",
        "#SBATCH --time=120",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32G",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "#SBATCH --comment='advprune grid'",
        "#SBATCH --array=0-3%4",
        "#SBATCH --job-name=advprune-tiny",
        "source /opt/venv/bin/activate",
    ]:
        assert line in script.splitlines(), (line, script)
    assert "srun --unbuffered --output" in script and "-m submitit.core._submit" in script
    submissions = json.loads((out / "submissions.json").read_text())
    ids = {key: e["job_id"] for key, e in submissions.items()}
    assert ids == {LWM90: "4242_0", LWM95: "4242_1", BIN90: "4242_2", BIN95: "4242_3"}

    # Slurm says: pending, running, failed, timed out; the failed job's log holds its error
    (folder / "sacct.txt").write_text(
        "JobID|State|NodeList\n4242_0|PENDING|\n4242_1|RUNNING|n1\n4242_2|FAILED|n2\n"
        "4242_2.batch|FAILED|n2\n4242_3|TIMEOUT|n3\n"
    )
    err = submissions[BIN90]["stderr"]
    os.makedirs(os.path.dirname(err), exist_ok=True)
    with open(err, "w") as fh:
        fh.write("".join(f"line {i}\n" for i in range(30)) + "CUDA out of memory\n")
    status = cli("bench", "status", str(grid), "--out", str(out), "--lines", "3", env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()

    def state_of(key):
        return next(line for line in lines if key in line).split()[1]

    assert [state_of(k) for k in (LWM90, LWM95, BIN90, BIN95)] == [
        "pending", "running", "failed", "failed"
    ]  # fmt: skip
    at = next(i for i, line in enumerate(lines) if BIN90 in line)
    assert "FAILED" in lines[at] and lines[at + 1].strip() == f"log {err}:"
    assert [line.strip() for line in lines[at + 2 : at + 5]] == [
        "| line 28", "| line 29", "| CUDA out of memory"
    ]  # fmt: skip
    assert "1 pending, 1 running, 2 failed" in status.stdout

    # run again: only the two jobs that failed are submitted (as a new array)
    res = cli("bench", "run", str(grid), "--out", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 submitted, 2 already queued" in res.stdout
    script = (folder / "script_1.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=cpu" in script
    submissions = json.loads((out / "submissions.json").read_text())
    assert [submissions[k]["job_id"] for k in (BIN90, BIN95)] == ["4243_0", "4243_1"]
    assert submissions[LWM90]["job_id"] == "4242_0"


def test_no_slurm_here_is_one_line(tmp_path, capsys, monkeypatch):
    from advprune.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    grid = write_grid(tmp_path, executor="slurm")
    assert main(["bench", "run", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Slurm's sbatch and srun on PATH" in err
    assert not (tmp_path / "out").exists()
