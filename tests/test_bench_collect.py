"""Ingesting finished job folders: idempotent, once under concurrent collects, refusing
folders that do not match their record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _grid_helpers import BIN90, LWM90, cli, stored_once, write_grid
from advprune.bench.collect import JobRefusedError, collect, ingest
from advprune.bench.grid import jobs, load_grid, run_job
from advprune.bench.store import ResultsStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished jobs (LWM and binary at 90 %) in their folders."""
    tmp = tmp_path_factory.mktemp("collect")
    path = write_grid(tmp, sparsities={"unstructured": [0.9]})
    grid = load_grid(path)
    out = tmp / "out"
    for job in jobs(grid):
        run_job(grid, job, out, progress=False)
    return path, out


def test_collect_twice_and_concurrently_stores_each_job_once(finished, tmp_path):
    path, out = finished
    grid = load_grid(path)
    store = tmp_path / "a.sqlite"
    first = collect(grid, out, store)
    assert [j.key for j in first.stored] == [LWM90, BIN90] and not first.refused
    added = [r.added for r in ResultsStore(store).results()]
    second = collect(grid, out, store)
    assert not second.stored and [j.key for j in second.already] == [LWM90, BIN90]
    assert [r.added for r in ResultsStore(store).results()] == added  # left untouched
    assert stored_once(store) == {LWM90: 1, BIN90: 1}

    # two processes collect into one new store at once: each job is stored by exactly one
    store = tmp_path / "b.sqlite"
    cmd = [sys.executable, "-m", "advprune.cli", "bench", "collect", str(path), "--out",
           str(out), "--store", str(store)]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = [int(o.split("grid tiny: ")[1].split(" stored")[0]) for o in outputs]
    assert sum(counts) == 2, outputs
    assert stored_once(store) == {LWM90: 1, BIN90: 1}


def test_ingest_at_once_from_many_threads_stores_once(finished, tmp_path):
    """The check and the write are one transaction: of 8 writers released together, exactly
    one stores the report (a check outside the write transaction lets several through)."""
    import threading

    _, out = finished
    report = out / "jobs" / LWM90 / "eval" / "report.json"
    store = ResultsStore(tmp_path / "d.sqlite")
    store.add_report(report, BIN90)  # the file exists: the writers only race on the rows
    start = threading.Barrier(8)
    results = []

    def writer():
        start.wait()
        results.append(store.add_report_once(report, LWM90))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert stored_once(store.path) == {LWM90: 1, BIN90: 1}


def test_tampered_or_changed_job_folders_are_refused(finished, tmp_path):
    path, out = finished
    grid = load_grid(path)
    lwm, binary = jobs(grid)
    store = tmp_path / "c.sqlite"
    report = out / "jobs" / LWM90 / "eval" / "report.json"
    record_file = out / "jobs" / BIN90 / "done"
    original_report, original_record = report.read_text(), record_file.read_text()
    try:
        data = json.loads(original_report)
        data["clean_accuracy"] = 1.0
        report.write_text(json.dumps(data))
        with pytest.raises(JobRefusedError, match=r"eval/report.json changed since the job fin"):
            ingest(grid, lwm, out, store)
        record = json.loads(original_record)
        record["settings"]["evaluation"]["n"] = 10_000
        record_file.write_text(json.dumps(record))
        with pytest.raises(JobRefusedError, match="done record was altered"):
            ingest(grid, binary, out, store)
        res = cli("bench", "collect", str(path), "--out", str(out), "--store", str(store))
        assert res.returncode == 1
        refused = [line for line in res.stdout.splitlines() if "REFUSED" in line]
        assert len(refused) == 2 and f"remove {out / 'jobs' / LWM90 / 'done'}" in refused[0]
        assert "0 stored, 0 already stored, 2 refused" in res.stdout
        assert not store.exists() or ResultsStore(store).keys() == []
    finally:
        report.write_text(original_report)
        record_file.write_text(original_record)
    # the grid file changed since the jobs ran: their folders hold other settings
    changed = write_grid(
        tmp_path, "changed.yaml", sparsities={"unstructured": [0.9]},
        evaluation={"attacks": ["pgd"], "n": 30},
    )  # fmt: skip
    done = collect(load_grid(changed), out, store)
    assert len(done.refused) == 2 and not done.stored
    assert "with other settings (evaluation.n differ)" in done.refused[0][1]
    assert [j.key for j in collect(grid, out, store).stored] == [LWM90, BIN90]  # as they were
