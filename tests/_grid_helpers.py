"""Tiny digits grids and helpers shared by the grid executor tests (one job: a few seconds)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from advprune.bench.store import ResultsStore

TINY = {
    "name": "tiny",
    "base": {"dataset": "digits", "model": "digits_cnn", "objective": "pgd", "eps": "3/16",
             "attack_steps": 1, "batch_size": 256, "device": "cpu", "progress": False},
    "pretrain": {"epochs": 1, "lr": 0.05},
    "methods": {
        "lwm": {"prune": {"epochs": 0}, "finetune": {"epochs": 1, "lr": 0.01}},
        "binary": {"prune": {"epochs": 1}},
    },
    "structures": ["unstructured"],
    "sparsities": {"unstructured": [0.9, 0.95]},
    "evaluation": {"attacks": ["pgd"], "n": 24},
}  # fmt: skip
LWM90 = "LWM_Han2015Learning_DCNN_DIGITS_US_90"
LWM95 = "LWM_Han2015Learning_DCNN_DIGITS_US_95"
BIN90 = "Binary_Liu2022Robust_DCNN_DIGITS_US_90"
BIN95 = "Binary_Liu2022Robust_DCNN_DIGITS_US_95"


def write_grid(folder: Path, name: str = "grid.yaml", **changes: Any) -> Path:
    """TINY with top-level ``changes``, written as YAML."""
    grid = json.loads(json.dumps(TINY))
    grid.update(changes)
    path = folder / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``advprune ARGS`` in a new process (one CPU thread per job process)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "advprune.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=600)


def stored_once(store: Path) -> dict[str, int]:
    """How many worst-case rows each key has (one per job stored once)."""
    counts: dict[str, int] = {}
    for row in ResultsStore(store).results(attack="worst-case"):
        counts[row.key] = counts.get(row.key, 0) + 1
    return counts


@contextlib.contextmanager
def job_held(out: Path, key: str) -> Iterator[None]:
    """Hold a job's lock as another process running it would (the job then fails)."""
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    with open(out / "jobs" / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_for(check: Callable[[], Any], timeout: float = 300.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}")


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


def mtimes(out: Path) -> dict[str, int]:
    """The modification time of each job's done record."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/done")}
