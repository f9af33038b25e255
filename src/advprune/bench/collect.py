"""Ingest finished grid jobs into the results store (``advprune bench collect GRID``).

A grid job writes its report, per-sample file and ``done`` record into its own folder
(:func:`advprune.bench.grid.run_job`) and never the store; the machine that submitted the grid
ingests the finished folders. Only the submitting machine writes the SQLite file, so no store
is written concurrently from compute nodes over a shared file system.

A folder is ingested only if its ``done`` record holds the settings the grid file gives the
job now (and their sha256), and the report and per-sample file still have the sha256 the
record names, and the report is of the job's key and protocol; otherwise it is refused with one
line that names what differs. Ingesting is idempotent: a report already stored is left as it
is (:meth:`~advprune.bench.store.ResultsStore.add_report_once`, one transaction), so collects
run twice, or by two processes at once, store each job once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advprune.bench.grid import (
    Grid,
    Job,
    job_folder,
    job_settings,
    jobs,
    protocol,
    read_job_record,
    settings_sha256,
)
from advprune.errors import AdvpruneError, ConfigError

__all__ = ["Collected", "JobRefusedError", "check_job_folder", "collect", "ingest"]


class JobRefusedError(ConfigError):
    """A finished job folder the store does not take (its one line says why)."""


@dataclass
class Collected:
    """What a collect did: jobs newly stored, already stored, refused (with the reason) and
    not finished."""

    stored: list[Job] = field(default_factory=list)
    already: list[Job] = field(default_factory=list)
    refused: list[tuple[Job, str]] = field(default_factory=list)
    unfinished: list[Job] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.stored)} stored, {len(self.already)} already stored, "
            f"{len(self.refused)} refused, {len(self.unfinished)} not finished"
        )


def check_job_folder(grid: Grid, job: Job, out: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The valid ``done`` record of ``job`` and its report path; None when the job has not
    finished. A record that does not match (settings, hashes, key, protocol) raises
    :class:`JobRefusedError`."""
    from advprune.bench.store import protocol_of
    from advprune.checkpoint import sha256_file
    from advprune.evaluation import load_report
    from advprune.io import check_same_settings

    folder = job_folder(out, job)
    rerun = f"remove {folder / 'done'} to rerun the job"
    try:
        record = read_job_record(folder)
    except ConfigError as exc:
        raise JobRefusedError(str(exc)) from None
    if record is None:
        return None

    def refuse(why: str) -> JobRefusedError:
        return JobRefusedError(f"{folder}: {why}; not stored ({rerun})")

    settings = record.get("settings")
    if record.get("key") != job.key:
        raise refuse(f"its done record is of job {record.get('key')!r}, not {job.key!r}")
    if not isinstance(settings, dict) or record.get("settings_sha256") != settings_sha256(settings):
        raise refuse("its done record was altered (the sha256 of its settings differs)")
    try:
        check_same_settings(
            folder, settings, job_settings(grid, job), what="a job", hint=f"not stored ({rerun})"
        )
    except ConfigError as exc:
        raise JobRefusedError(str(exc)) from None
    files = {"report": record.get("report"), "per_sample": record.get("per_sample")}
    for name, rel in files.items():
        if rel is None and name == "per_sample":
            continue
        path = folder / str(rel)
        if rel is None or not path.is_file():
            raise refuse(f"{name} file {rel} is missing")
        if sha256_file(path) != record.get(f"{name}_sha256"):
            raise refuse(f"{rel} changed since the job finished (sha256 differs)")
    report_path = folder / str(record["report"])
    try:
        report = load_report(report_path)
    except (AdvpruneError, ValueError, OSError) as exc:
        raise refuse(f"unreadable report ({exc})") from None
    key = (report.model or {}).get("key")
    if key != job.key:
        raise refuse(f"its report is of model {key!r}, not {job.key!r}")
    if protocol_of(report) != protocol(grid, job):
        raise refuse(f"its report's protocol is {protocol_of(report)}, not {protocol(grid, job)}")
    return record, report_path


def ingest(grid: Grid, job: Job, out: str | Path, store: str | Path) -> bool | None:
    """Store the finished ``job``'s report unless it is stored already; returns True (stored
    now), False (already stored) or None (not finished). Raises :class:`JobRefusedError`."""
    from advprune.bench.store import ResultsStore

    found = check_job_folder(grid, job, out)
    if found is None:
        return None
    _, report_path = found
    return ResultsStore(store).add_report_once(report_path, job.key)


def collect(
    grid: Grid, out: str | Path, store: str | Path, selected: list[Job] | None = None
) -> Collected:
    """Ingest every finished job folder of ``grid`` under ``out`` (or of ``selected``)."""
    done = Collected()
    for job in selected if selected is not None else jobs(grid):
        if job.skip:
            continue
        try:
            stored = ingest(grid, job, out, store)
        except JobRefusedError as exc:
            done.refused.append((job, str(exc)))
            continue
        if stored is None:
            done.unfinished.append(job)
        else:
            (done.stored if stored else done.already).append(job)
    return done
