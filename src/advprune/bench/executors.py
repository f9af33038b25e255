"""Executors of a grid: ``local`` (K job processes at once on this machine) and ``slurm`` (a
job array through submitit); the state of every job (``advprune bench status``).

Both start the same job command, ``advprune bench run GRID --job K`` (:func:`job_command`),
which runs one job in its folder and writes its ``done`` record
(:func:`advprune.bench.grid.run_job`); only the submitting process writes the results store,
by ingesting finished job folders (:mod:`advprune.bench.collect`). A rerun ingests what
finished meanwhile and runs (or submits) only the jobs that are not done.

- ``local``: a :class:`concurrent.futures.ThreadPoolExecutor` of K threads, each waiting on one
  job process; process ``k`` is pinned to GPU ``k mod G`` (``CUDA_VISIBLE_DEVICES``) when there
  are GPUs, and gets ``cores // K`` threads (``OMP_NUM_THREADS``). Chosen over submitit's
  ``LocalExecutor``, which starts every job of an array at once (no limit of K) and pins no
  threads. Each job's output goes to ``OUT/logs/<key>.log``. Killing the run (Ctrl-C,
  ``kill``) stops its job processes too (they die with their parent, Linux).
- ``slurm``: :class:`submitit.SlurmExecutor`, one array of the pending jobs with the grid's
  ``slurm`` resources (partition, time, GPUs, CPUs, memory, extra ``#SBATCH`` flags, setup
  lines); logs in ``OUT/submitit/<job id>/``. ``slurm.cluster: local`` submits the same array
  through submitit's ``LocalExecutor`` on this machine.

The jobs started are recorded in ``OUT/submissions.json`` (by the submitting process only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advprune.bench.grid import Grid, Job, SlurmSpec, _locked, jobs, load_grid, protocol
from advprune.errors import ConfigError
from advprune.progress import ProgressSetting, resolve

__all__ = [
    "MULTI_GPU_JOBS",
    "JobState",
    "default_workers",
    "job_command",
    "job_states",
    "run_grid",
    "run_local",
    "submit_slurm",
]

SUBMISSIONS = "submissions.json"
# Hook for multi-GPU jobs (issue 14): a job of gpus_per_job > 1 starts as
# `torchrun --nproc-per-node G -m advprune.cli bench run GRID --job K` (see job_command). Set
# True once `bench run --job K` trains with DDP under torchrun and only rank 0 writes the job
# folder; until then such a grid is refused before anything is submitted.
MULTI_GPU_JOBS = False
_QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


# ---------------------------------------------------------------------------- job processes


def job_command(
    grid_file: str | Path, job: Job, out: str | Path, *, progress: str = "lines", gpus: int = 1
) -> list[str]:
    """The command that runs ``job`` (``advprune bench run GRID --job K``); with ``gpus`` > 1
    under torchrun, one process per GPU."""
    args = ["-m", "advprune.cli", "bench", "run", str(grid_file), "--job", str(job.index),
            "--out", str(out), "--progress", progress]  # fmt: skip
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={gpus}", *args]  # fmt: skip
    return [sys.executable, *args]


def run_command(argv: list[str], threads: int | None = None) -> int:
    """Run a job command inside a submitit job with ``threads`` CPU threads (default: the
    Slurm allocation's). Its output goes to the job's stdout log; a non-zero exit raises, so
    the scheduler records the job as failed, with the job's last lines in the error (the end
    of the stderr log, which ``bench status`` shows)."""
    import collections

    env = dict(os.environ)
    cpus = str(threads) if threads else env.get("SLURM_CPUS_PER_TASK")
    if cpus:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = cpus
    last: collections.deque[str] = collections.deque(maxlen=8)
    sys.stdout.flush()
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last.append(line.rstrip())
    if proc.returncode:
        lines = "\n".join(f"  {line}" for line in last)
        code = proc.returncode
        raise RuntimeError(f"the job exited with status {code}; its last lines:\n{lines}")
    return 0


def die_with_parent() -> None:
    """Ask Linux to end this process when its parent dies (a killed ``bench run`` takes its
    job processes with it); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the request
            os._exit(143)


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else every CUDA device)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cpus() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One job per visible GPU, else one per two CPU cores."""
    gpus = visible_gpus()
    return len(gpus) if gpus else max(1, usable_cpus() // 2)


def slot_env(
    slot: int, workers: int, gpus: list[str], cpus: int, threads: int | None = None
) -> dict[str, str]:
    """The pinning of worker ``slot`` of ``workers``: its GPU and ``threads`` CPU threads
    (default: its share of the ``cpus`` cores)."""
    count = str(threads or max(1, cpus // workers))
    env = {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def grid_snapshot(grid_file: str | Path, out: Path) -> Path:
    """A copy of the grid file in ``OUT/grids/`` (named by its sha256), which the job
    processes read: editing the grid file while jobs run changes none of them."""
    text = Path(grid_file).read_bytes()
    copy = out / "grids" / f"{hashlib.sha256(text).hexdigest()[:16]}.yaml"
    if not copy.is_file():
        from advprune.io import atomic_path

        with atomic_path(copy) as tmp:
            tmp.write_bytes(text)
    return copy.resolve()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tail(path: str | Path | None, lines: int = 10) -> list[str]:
    """The last ``lines`` non-empty lines of a text file (none if it does not exist)."""
    if path is None or not Path(path).is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode("utf-8", "replace")
    kept = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return kept[-lines:]


# ---------------------------------------------------------------------------- submissions


_RECORD_LOCK = threading.Lock()


def read_submissions(out: str | Path) -> dict[str, dict[str, Any]]:
    """``OUT/submissions.json``: how each job was last started (empty when none was)."""
    path = Path(out) / SUBMISSIONS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable; remove it (jobs already done are kept)") from None
    return data if isinstance(data, dict) else {}


def record_submissions(out: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` (by job key) into ``OUT/submissions.json`` (locked, atomic)."""
    from advprune.io import write_json_atomic

    with _RECORD_LOCK, _locked(out / f"{SUBMISSIONS}.lock", wait=True):
        data = read_submissions(out)
        for key, entry in entries.items():
            data[key] = {**data.get(key, {}), **entry}
        write_json_atomic(out / SUBMISSIONS, data)


# ---------------------------------------------------------------------------- what to run


@dataclass
class Plan:
    """The grid's jobs sorted by what a run does with them."""

    todo: list[Job] = field(default_factory=list)
    done: list[Job] = field(default_factory=list)
    skip: list[Job] = field(default_factory=list)
    refused: list[tuple[Job, str]] = field(default_factory=list)
    newly_stored: list[Job] = field(default_factory=list)


def _plan(grid: Grid, out: Path, store: Path, say: Callable[[str], None]) -> Plan:
    """Ingest what finished since the last run, then sort the jobs."""
    from advprune.bench.collect import collect
    from advprune.bench.store import ResultsStore

    collected = collect(grid, out, store)
    refused = {job.key: why for job, why in collected.refused}
    stored = ResultsStore(store)
    plan = Plan(refused=collected.refused, newly_stored=collected.stored)
    for job in jobs(grid):
        if job.skip:
            plan.skip.append(job)
        elif job.key in refused:
            say(f"[{job.index}] {job.key}: REFUSED: {refused[job.key]}")
        elif stored.has(job.key, protocol(grid, job)):
            plan.done.append(job)
        else:
            plan.todo.append(job)
    if collected.stored:
        say(f"stored {len(collected.stored)} job(s) that finished since the last run")
    return plan


# ---------------------------------------------------------------------------- local


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the pool runs (so its job processes are stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_local(
    grid_file: str | Path,
    grid: Grid,
    out: str | Path,
    store: str | Path,
    *,
    workers: int | None = None,
    threads: int | None = None,
    progress: ProgressSetting = True,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, list[Job]]:
    """Run every job of ``grid`` not done yet, ``workers`` processes at once (default
    :func:`default_workers`) of ``threads`` CPU threads each (default: cores // workers),
    and store each as it finishes; a failed job is reported (with the last lines of its
    log) and the others go on.

    Returns the jobs by outcome: ``done`` (stored before), ``ran``, ``failed``, ``skip``,
    ``refused`` (a finished folder the store refused).
    """
    from advprune.bench.collect import JobRefusedError, ingest

    out, store = Path(out), Path(store)
    plan = _plan(grid, out, store, say)
    outcome: dict[str, list[Job]] = {
        "done": plan.done + plan.newly_stored, "ran": [], "failed": [], "skip": plan.skip,
        "refused": [job for job, _ in plan.refused],
    }  # fmt: skip
    if not plan.todo:
        return outcome
    workers = workers or default_workers()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    snapshot = grid_snapshot(grid_file, out)
    mode = resolve(progress)
    mode = "lines" if mode == "bar" else mode  # job output goes to log files
    gpus, cpus = visible_gpus(), usable_cpus()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()

    def work(job: Job) -> tuple[int, float, Path]:
        slot = slots.get()
        try:
            pins = slot_env(slot, workers, gpus, cpus, threads)
            env = {**os.environ, **pins, "ADVPRUNE_DIE_WITH_PARENT": "1"}
            log = out / "logs" / f"{job.key}.log"
            cmd = job_command(snapshot, job, out, progress=mode)
            where = ", ".join(f"{k}={v}" for k, v in pins.items() if k != "MKL_NUM_THREADS")
            say(f"[{job.index}] {job.key}: running (worker {slot}, {where})")
            start = time.perf_counter()
            with open(log, "a") as fh:
                fh.write(f"--- {_now()} worker {slot} ({where}): {shlex.join(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                with lock:
                    running.add(proc)
                record_submissions(out, {job.key: {
                    "executor": "local", "pid": proc.pid, "host": host, "log": str(log),
                    "submitted": _now(), "exit": None}})  # fmt: skip
                code = proc.wait()
                with lock:
                    running.discard(proc)
            record_submissions(out, {job.key: {"exit": code}})
            return code, time.perf_counter() - start, log
        finally:
            slots.put(slot)

    pool = ThreadPoolExecutor(max_workers=min(workers, len(plan.todo)))
    futures = {pool.submit(work, job): job for job in plan.todo}
    finished = 0
    try:
        with _sigterm_as_interrupt():
            for future in as_completed(futures):
                job = futures[future]
                code, seconds, log = future.result()
                finished += 1
                count = f"[{finished}/{len(plan.todo)}]"
                if code != 0:
                    outcome["failed"].append(job)
                    say(f"[{job.index}] {job.key}: FAILED (exit {code}) {count}; log {log}:")
                    for line in tail(log):
                        say(f"    {line}")
                    continue
                try:
                    ingest(grid, job, out, store)
                except JobRefusedError as exc:
                    outcome["failed"].append(job)
                    say(f"[{job.index}] {job.key}: REFUSED: {exc}")
                    continue
                outcome["ran"].append(job)
                say(f"[{job.index}] {job.key}: done in {seconds:.1f} s {count}")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        _stop(running, lock)
        raise
    pool.shutdown(wait=True)
    return outcome


def _stop(running: set[subprocess.Popen], lock: threading.Lock) -> None:
    """Stop the job processes still running (SIGTERM, then SIGKILL after 10 s)."""
    with lock:
        procs = list(running)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------- slurm


def _require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"--executor slurm needs Slurm's {' and '.join(missing)} on PATH; run it on the "
            "cluster's login node (or set slurm.cluster: local to try the grid on this machine)"
        )


def _executor(spec: SlurmSpec, folder: Path, grid: Grid) -> Any:
    """The submitit executor of ``spec`` (Slurm, or submitit's LocalExecutor)."""
    import submitit

    if spec.cluster == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(
            timeout_min=spec.time, gpus_per_node=spec.gpus_per_job, tasks_per_node=1, nodes=1
        )
        return ex
    _require_slurm()
    ex = submitit.SlurmExecutor(folder)
    params: dict[str, Any] = {
        "job_name": f"advprune-{grid.name}",
        "time": spec.time,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": spec.cpus_per_job,
        "gpus_per_node": spec.gpus_per_job or None,
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "mem": spec.mem,
        "array_parallelism": spec.array_parallelism,
        "setup": list(spec.setup) or None,
        "additional_parameters": dict(spec.sbatch) or None,
    }
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def _slurm_job(entry: dict[str, Any]) -> Any:
    import submitit

    return submitit.SlurmJob(folder=entry["folder"], job_id=entry["job_id"])


def submit_slurm(
    grid_file: str | Path,
    grid: Grid,
    out: str | Path,
    store: str | Path,
    spec: SlurmSpec,
    *,
    progress: ProgressSetting = True,
    wait: bool = False,
    poll_s: float = 30.0,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, list[Job]]:
    """Submit the jobs of ``grid`` that are not done, queued or running as one job array;
    with ``wait``, wait for them and store their results.

    Returns the jobs by outcome: ``done`` (stored), ``submitted``, ``queued`` (already queued
    or running, not resubmitted), ``skip``, ``refused``, and with ``wait`` ``ran`` / ``failed``.
    """
    out, store = Path(out).resolve(), Path(store)
    if spec.gpus_per_job > 1 and not MULTI_GPU_JOBS:
        raise ConfigError(
            f"slurm.gpus_per_job {spec.gpus_per_job}: advprune's grid jobs train on one GPU "
            "for now (multi-GPU jobs wait for DDP training); use gpus_per_job 1"
        )
    if spec.cluster == "slurm":
        _require_slurm()  # before anything is written
    plan = _plan(grid, out, store, say)
    states = {s.job.key: s for s in job_states(grid, out, store, collect_first=False)}
    outcome: dict[str, list[Job]] = {
        "done": plan.done + plan.newly_stored, "submitted": [], "queued": [], "skip": plan.skip,
        "refused": [job for job, _ in plan.refused],
    }  # fmt: skip
    todo = []
    for job in plan.todo:
        if states[job.key].state in ("pending", "running", "submitted"):
            outcome["queued"].append(job)
        else:
            todo.append(job)
    if outcome["queued"]:
        say(f"{len(outcome['queued'])} job(s) already queued or running: not resubmitted")
    if not todo:
        return outcome
    snapshot = grid_snapshot(grid_file, out)
    folder = out / "submitit" / ("%j" if spec.cluster == "slurm" else "")
    ex = _executor(spec, folder, grid)
    mode = resolve(progress)
    mode = "lines" if mode == "bar" else mode
    argvs = [job_command(snapshot, job, out, progress=mode, gpus=spec.gpus_per_job) for job in todo]
    # submitit's LocalExecutor starts every job at once: they share this machine's cores
    local = min(spec.cpus_per_job, max(1, usable_cpus() // len(todo)))
    threads = [None if spec.cluster == "slurm" else local] * len(todo)
    try:
        submitted = ex.map_array(run_command, argvs, threads)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the job array was not submitted: {last}") from None
    entries = {}
    for job, sub in zip(todo, submitted):
        entries[job.key] = {
            "executor": "slurm", "cluster": spec.cluster, "job_id": str(sub.job_id),
            "folder": str(folder), "host": socket.gethostname(),
            "stdout": str(sub.paths.stdout), "stderr": str(sub.paths.stderr),
            "submitted": _now(), "exit": None, "pid": None, "log": None,
        }  # fmt: skip
    record_submissions(out, entries)
    outcome["submitted"] = todo
    first = str(submitted[0].job_id).split("_")[0]
    say(f"submitted {len(todo)} job(s) ({spec.cluster} job {first}...); logs in {out / 'submitit'}")
    if wait:
        outcome.update(_wait(grid, out, store, todo, submitted, poll_s, say))
    return outcome


def _wait(
    grid: Grid,
    out: Path,
    store: Path,
    todo: list[Job],
    submitted: list[Any],
    poll_s: float,
    say: Callable[[str], None],
) -> dict[str, list[Job]]:
    """Wait for submitted jobs, storing each as it finishes."""
    from advprune.bench.collect import JobRefusedError, ingest

    left = dict(zip(todo, submitted))
    result: dict[str, list[Job]] = {"ran": [], "failed": []}
    while left:
        for job, sub in list(left.items()):
            if not sub.done():
                continue
            del left[job]
            try:
                stored = ingest(grid, job, out, store)
            except JobRefusedError as exc:
                stored, why = None, str(exc)
            else:
                why = "it left no done record"
            if stored is None:
                result["failed"].append(job)
                say(f"[{job.index}] {job.key}: FAILED ({why}); log {sub.paths.stderr}:")
                for line in tail(sub.paths.stderr) or tail(sub.paths.stdout):
                    say(f"    {line}")
            else:
                result["ran"].append(job)
                say(f"[{job.index}] {job.key}: done [{len(todo) - len(left)}/{len(todo)}]")
        if left:
            time.sleep(poll_s)
    return result


# ---------------------------------------------------------------------------- status


@dataclass
class JobState:
    """What ``bench status`` says of one job: ``done`` (stored), ``pending`` (queued),
    ``running``, ``submitted`` (queued; the scheduler tells no state), ``failed``,
    ``interrupted`` (its process is gone without a result), ``refused``, ``not started`` or
    ``skip``; ``detail`` and the last lines of its log where there are any."""

    job: Job
    state: str
    detail: str = ""
    log: str | None = None
    tail: list[str] = field(default_factory=list)


def _alive(pid: Any, host: Any) -> bool:
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scheduler_states(entries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Slurm's state of each submitted job id (one sacct call; UNKNOWN where it tells none)."""
    ids = [e["job_id"] for e in entries.values() if e.get("cluster") == "slurm"]
    if not ids:
        return {}
    import submitit

    watcher = submitit.SlurmJob.watcher
    for job_id in ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: watcher.get_state(job_id, mode="cache").split()[0].upper() for job_id in ids}


def job_states(
    grid: Grid, out: str | Path, store: str | Path, *, collect_first: bool = True,
    tail_lines: int = 10,
) -> list[JobState]:  # fmt: skip
    """The state of every job of ``grid`` (after ingesting the finished ones)."""
    from advprune.bench.collect import collect
    from advprune.bench.store import ResultsStore

    out = Path(out)
    refused: dict[str, str] = {}
    if collect_first:
        refused = {job.key: why for job, why in collect(grid, out, store).refused}
    else:
        from advprune.bench.collect import JobRefusedError, check_job_folder

        for job in jobs(grid):
            if not job.skip:
                try:
                    check_job_folder(grid, job, out)
                except JobRefusedError as exc:
                    refused[job.key] = str(exc)
    submissions = read_submissions(out)
    sched = _scheduler_states({k: e for k, e in submissions.items() if e.get("job_id")})
    stored = ResultsStore(store)
    states = []
    for job in jobs(grid):
        entry = submissions.get(job.key, {})
        if job.skip:
            states.append(JobState(job, "skip", job.skip))
        elif job.key in refused:
            states.append(JobState(job, "refused", refused[job.key]))
        elif stored.has(job.key, protocol(grid, job)):
            states.append(JobState(job, "done"))
        elif not entry:
            states.append(JobState(job, "not started"))
        else:
            states.append(_submitted_state(job, entry, sched, tail_lines))
    return states


def _submitted_state(
    job: Job, entry: dict[str, Any], sched: dict[str, str], tail_lines: int
) -> JobState:
    """The state of a started job that is not done."""
    if entry.get("executor") == "local":
        log = entry.get("log")
        if entry.get("exit") is None:
            if _alive(entry.get("pid"), entry.get("host")):
                return JobState(job, "running", f"pid {entry['pid']}", log)
            return JobState(job, "interrupted", "its process is gone", log, tail(log, tail_lines))
        return JobState(job, "failed", f"exit {entry['exit']}", log, tail(log, tail_lines))
    stderr, stdout = entry.get("stderr"), entry.get("stdout")
    logs = tail(stderr, tail_lines) or tail(stdout, tail_lines)
    if entry.get("cluster") == "local":  # submitit's LocalExecutor: the job id is a pid
        with contextlib.suppress(ValueError):
            if _alive(int(entry["job_id"]), entry.get("host")):
                return JobState(job, "running", f"local job {entry['job_id']}", stdout)
        return JobState(job, "failed", f"local job {entry['job_id']} ended", stderr, logs)
    state = sched.get(entry["job_id"], "UNKNOWN")
    detail = f"slurm job {entry['job_id']}: {state}"
    if state in _QUEUED:
        return JobState(job, "pending", detail, stdout)
    if state in _RUNNING:
        return JobState(job, "running", detail, stdout)
    if state == "UNKNOWN":
        return JobState(job, "submitted", f"{detail} (sacct tells no state yet)", stdout)
    return JobState(job, "failed", detail, stderr, logs)


def run_grid(
    path: str | Path,
    out: str | Path,
    store: str | Path,
    *,
    progress: ProgressSetting = True,
    workers: int | None = None,
) -> Any:
    """Run every job of the grid file ``path`` not yet done with the local executor
    (``workers`` processes at once) and store the results; see :func:`run_local`."""
    grid = load_grid(path)
    return run_local(path, grid, out, store, workers=workers or grid.workers, progress=progress)
