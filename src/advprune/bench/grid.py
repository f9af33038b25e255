"""Grid runs: prune, finetune and evaluate every (method x architecture x dataset x sparsity).

A grid file (YAML) names the jobs::

    name: bench_digits
    base: {dataset: digits, model: digits_cnn, objective: pgd, eps: 3/16, ...}  # RunConfig
    pretrain: {epochs: 15}              # the shared dense model, per (architecture, dataset)
    methods:
      hydra: {options: {}, prune: {epochs: 3, lr: 0.05}, finetune: {epochs: 3, lr: 0.01}}
      lwm: {finetune: {epochs: 6}}
    architectures: [digits_cnn]         # default: base.model
    datasets: [digits]                  # default: base.dataset
    structures: [unstructured]
    sparsities: {unstructured: [0.9, 0.95, 0.99]}
    evaluation: {attacks: [autoattack, hofmn], eps: 3/16, n: null}   # certify: [ibp] too
    executor: local                     # or slurm (advprune.bench.executors); --executor wins
    workers: 4                          # local: jobs at once (default: one per GPU / 2 cores)
    slurm: {partition: gpu, time: "12:00:00", gpus_per_job: 1, cpus_per_job: 8, mem: 32G}

A method's other stages take their settings from ``methods.NAME.stages.STAGE``; every stage
of the method runs through :func:`advprune.pipeline.run_method`, in the method's order.

Each job runs in ``OUT/jobs/<model key>/``: ``prune/`` and ``finetune/`` (the method's
stages), ``export/`` (the plain dense checkpoint) and ``eval/`` (the report; resumes per
batch); last, the job writes its ``done`` record (the job's settings and their sha256, the
sha256 of its report and per-sample file), atomically. A job never writes the results store:
the submitting machine ingests finished job folders (:mod:`advprune.bench.collect`), so no
SQLite file is written from many compute nodes. A finished stage is reused (its ``done``
marker records the settings it ran with; a grid file changed since is an error, not a stale
model), an interrupted one resumes from its last epoch; a job whose ``done`` record is valid
is never redone. The dense model of each (architecture, dataset) is trained once in
``OUT/dense/<arch>_<dataset>/`` under a file lock. The whole file (methods and their options,
attacks, keys, executor settings) is validated before any job runs.

:func:`run_job` runs one job in this process (``advprune bench run GRID --job K``, what every
executor starts); the executors (:mod:`advprune.bench.executors`) run many: ``local`` (K
processes at once on this machine) or ``slurm`` (a submitit job array).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from advprune._validation import first_validation_error
from advprune.bench.keys import make_key
from advprune.errors import AdvpruneError, ConfigError
from advprune.progress import ProgressSetting

__all__ = [
    "JOB_DONE",
    "Grid",
    "Job",
    "SlurmSpec",
    "job_folder",
    "job_settings",
    "jobs",
    "load_grid",
    "read_job_record",
    "run_job",
]

JOB_DONE = "done"  # a finished job's record, in its folder (written last, atomically)
JOB_RECORD_FORMAT = "advprune-grid-job"


class MethodSpec(BaseModel):
    """One method of a grid: its options and the settings of its stages (``prune``,
    ``finetune``, and in ``stages`` those of any other stage the method declares)."""

    model_config = ConfigDict(extra="forbid")
    options: dict[str, Any] = {}
    prune: dict[str, Any] = {}
    finetune: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}

    def stage(self, name: str) -> dict[str, Any]:
        """The settings of stage ``name``."""
        if name in ("prune", "finetune"):
            return {**self.stages.get(name, {}), **getattr(self, name)}
        return dict(self.stages.get(name, {}))


def default_attacks() -> tuple[str, ...]:
    """The protocol's default attacks (:data:`advprune.evaluation.attacks.DEFAULT_ATTACKS`)."""
    from advprune.evaluation.attacks import DEFAULT_ATTACKS

    return DEFAULT_ATTACKS


class EvaluationSpec(BaseModel):
    """How each job's final model is evaluated (``advprune.evaluation.evaluate``)."""

    model_config = ConfigDict(extra="forbid")
    attacks: list[str] = Field(default_factory=lambda: list(default_attacks()))
    eps: str | None = None  # None: the base setting, else the dataset's default
    n: int | None = None
    batch_size: int = 128
    seed: int = 0
    options: dict[str, Any] = {}  # further evaluate() keywords (aa_version, hofmn_trials, ...)
    certify: list[str] = []  # certifiers after the attacks (ibp, crown-ibp, crown, smoothing)
    certify_options: dict[str, Any] = {}  # sigma, radii, n0, smoothing_n, alpha

    @model_validator(mode="after")
    def _certifiers(self) -> EvaluationSpec:
        if self.certify:
            from advprune.evaluation.certifiers import certifier_settings

            opts = {k: v for k, v in self.certify_options.items() if k != "sigma"}
            try:
                certifier_settings(self.certify, **opts)
            except TypeError:
                valid = "sigma, radii, n0, smoothing_n, alpha"
                raise ConfigError(f"certify_options: valid options: {valid}") from None
        return self

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_text(cls, value: Any) -> Any:
        from advprune._validation import parse_number

        if value is None:
            return None
        if parse_number(value, "eps") <= 0:  # the norm's range: checked in load_grid
            raise ConfigError(f"eps must be > 0 for an evaluation, got {value!r}")
        return str(value).strip()

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, value: list[str]) -> list[str]:
        from advprune.errors import UnknownNameError
        from advprune.evaluation import parse_attacks

        try:
            return list(parse_attacks(value))
        except UnknownNameError as exc:  # a KeyError: pydantic reports ValueErrors only
            raise ConfigError(str(exc)) from None

    @field_validator("n", "batch_size")
    @classmethod
    def _positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        from advprune.attacks.pgd import check_steps

        return None if value is None else check_steps(value, str(info.field_name))

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        import inspect

        from advprune.evaluation import evaluate

        own = {"model", "data", "eps", "norm", "attacks", "n", "batch_size", "seed", "out",
               "progress", "model_info"}  # fmt: skip
        valid = sorted(set(inspect.signature(evaluate).parameters) - own)
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        return value


def minutes(value: int | str, what: str = "time") -> int:
    """Slurm time as whole minutes: ``90``, ``"90"``, ``"12:00:00"``, ``"1-00:00:00"``."""
    text = str(value).strip()
    try:
        days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
        parts = [int(p) for p in clock.split(":")]
        if len(parts) == 1:
            h, m, sec = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, sec = parts[0], parts[1], 0
        elif len(parts) == 3:
            h, m, sec = parts
        else:
            raise ValueError
        total = int(days) * 24 * 60 + h * 60 + m + (1 if sec > 0 else 0)
    except ValueError:
        raise ConfigError(
            f"{what} must be minutes or [D-]HH:MM:SS (e.g. 90, 12:00:00), got {value!r}"
        ) from None
    if total <= 0 or min(parts) < 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    return total


class SlurmSpec(BaseModel):
    """Resources of each job of a Slurm job array (``advprune bench run --executor slurm``).

    ``time`` is minutes or ``[D-]HH:MM:SS``; ``mem`` is Slurm's text (``32G``, ``500M``);
    ``sbatch`` adds any other ``#SBATCH --KEY=VALUE`` (``{constraint: a100, exclusive: true}``);
    ``setup`` are shell lines run before the job (``module load ...``, ``source venv``).
    ``cluster: local`` runs the same submission through submitit's LocalExecutor on this
    machine, to try a Slurm grid without a cluster.
    """

    model_config = ConfigDict(extra="forbid")
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | str = 24 * 60
    gpus_per_job: int = Field(default=1, ge=0)
    cpus_per_job: int = Field(default=8, ge=1)
    mem: str | None = None
    array_parallelism: int = Field(default=256, ge=1)
    setup: list[str] = []
    sbatch: dict[str, str | int | bool] = {}

    @field_validator("time")
    @classmethod
    def _time(cls, value: int | str) -> int:
        return minutes(value, "slurm.time")

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        import re

        if value is None:
            return None
        if not re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", str(value).strip(), re.I):
            raise ConfigError(f"slurm.mem must be memory text like 32G or 500M, got {value!r}")
        return str(value).strip().upper()

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, value: dict[str, Any]) -> dict[str, Any]:
        own = {"array", "output", "error", "job-name", "job_name", "wckey", "open-mode"}
        taken = sorted(k for k in value if k.replace("_", "-") in own)
        if taken:
            raise ConfigError(f"slurm.sbatch may not set {', '.join(taken)} (submitit sets them)")
        return value


class Grid(BaseModel):
    """A validated grid file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "grid"
    base: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    methods: dict[str, MethodSpec]
    architectures: list[str] | None = None
    datasets: list[str] | None = None
    structures: list[str] = ["unstructured"]
    sparsities: dict[str, list[float]]
    evaluation: EvaluationSpec = EvaluationSpec()
    executor: Literal["local", "slurm"] = "local"
    workers: int | None = Field(default=None, ge=1)
    slurm: SlurmSpec = SlurmSpec()

    def config(self, **overrides: Any) -> Any:
        """A RunConfig of the base settings with ``overrides`` (validated)."""
        from advprune.config import load_config

        return load_config(None, overrides=overrides, base=self.base)


@dataclass(frozen=True)
class Job:
    """One grid job; ``skip`` says why it does not run (an unsupported combination)."""

    index: int
    key: str
    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: float
    skip: str | None = None


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file; every method, structure and setting is checked first."""
    import yaml

    from advprune._validation import check_eps
    from advprune.methods import list_methods, method_class

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read grid file {path} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid file is a mapping (name, base, methods, sparsities)")
    try:
        grid = Grid(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_validation_error(exc)}") from None
    unknown = sorted(set(grid.methods) - set(list_methods()))
    if unknown:
        raise ConfigError(
            f"{path}: unknown method(s) {', '.join(unknown)}; valid: {', '.join(list_methods())}"
        )
    missing = [s for s in grid.structures if s not in grid.sparsities]
    if missing:
        raise ConfigError(f"{path}: sparsities gives none for structure(s) {', '.join(missing)}")
    from advprune.pipeline import make_method

    for name, spec in grid.methods.items():  # every stage's settings must be valid RunConfigs
        stages = [s for s in method_class(name).stages if s != "pretrain"]
        extra = sorted(set(spec.stages) - set(stages))
        if extra:
            raise ConfigError(
                f"{path}: methods.{name}.stages: method {name!r} has no stage(s) "
                f"{', '.join(extra)}; its stages: {', '.join(method_class(name).stages)}"
            )
        for stage in dict.fromkeys(["prune", "finetune", *stages]):
            settings = {**spec.stage(stage), "method": name, "method_options": spec.options}
            try:
                grid.config(**settings)
                for structure in grid.structures:  # the method's options at every sparsity
                    for sparsity in grid.sparsities[structure]:
                        if stage == "prune" and method_class(name).supports_structure(structure):
                            cfg = grid.config(**settings, structure=structure, sparsity=sparsity)
                            make_method(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{path}: methods.{name}.{stage}: {exc}") from None
    try:
        grid.config(**grid.pretrain)
        if grid.evaluation.eps is not None:
            check_eps(grid.evaluation.eps, grid.config().norm, "evaluation.eps")
        jobs(grid)  # architecture / dataset names and their key codes
    except AdvpruneError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return grid


def jobs(grid: Grid) -> list[Job]:
    """Every job of the grid in a fixed order; unsupported combinations carry ``skip``."""
    from advprune.bench.taxonomy import method_ap_key
    from advprune.methods import method_class

    base = grid.config()
    out: list[Job] = []
    for dataset in grid.datasets or [base.dataset]:
        for arch in grid.architectures or [base.model]:
            for method in grid.methods:
                cls = method_class(method)
                ap_key = method_ap_key(method)
                for structure in grid.structures:
                    for sparsity in grid.sparsities[structure]:
                        skip = None
                        if not cls.supports_structure(structure):
                            skip = f"{method} does not support {structure} pruning"
                        key = make_key(ap_key, arch, dataset, structure, sparsity)
                        out.append(
                            Job(len(out), key, method, arch, dataset, structure, sparsity, skip)
                        )
    return out


def protocol(grid: Grid, job: Job) -> str:
    """The protocol a job is stored under (see :func:`advprune.bench.store.protocol_of`)."""
    cfg = grid.config(dataset=job.dataset, model=job.arch)
    eps = grid.evaluation.eps or cfg.eps_text()
    return f"{cfg.norm}-{eps}"


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False when ``wait`` is off and it is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def job_folder(out: str | Path, job: Job) -> Path:
    """The folder of ``job`` under the grid's output folder ``out``."""
    return Path(out) / "jobs" / job.key


def _stage_config(grid: Grid, job: Job, stage: str, progress: ProgressSetting = False) -> Any:
    """The RunConfig of one stage of ``job`` (``pretrain``: the shared dense model's)."""
    place = dict(dataset=job.dataset, model=job.arch, progress=progress)
    if stage == "pretrain":
        return grid.config(**{**place, **grid.pretrain})
    spec = grid.methods[job.method]
    common = dict(
        place,
        method=job.method,
        sparsity=job.sparsity,
        structure=job.structure,
        method_options=spec.options,
    )
    return grid.config(**{**common, **spec.stage(stage)})


def job_settings(grid: Grid, job: Job) -> dict[str, Any]:
    """Everything that decides a job's result (JSON): its key and protocol, every stage's
    settings and the evaluation; its ``done`` record must hold exactly these."""
    from advprune.methods import method_class
    from advprune.pipeline import stage_settings

    names = method_class(job.method).stages
    stages = {s: stage_settings(_stage_config(grid, job, s)) for s in names}
    return json.loads(
        json.dumps(
            {
                "key": job.key,
                "protocol": protocol(grid, job),
                "stages": stages,
                "evaluation": grid.evaluation.model_dump(mode="json"),
            },
            default=str,
        )
    )


def settings_sha256(settings: Any) -> str:
    """sha256 of the canonical JSON of ``settings`` (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_job_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``done`` record of a job folder (None when there is none); an unreadable one is a
    :class:`ConfigError`."""
    from advprune.io import read_json_record

    record = read_json_record(
        Path(folder) / JOB_DONE, what="a finished job's record",
        hint=f"remove {Path(folder) / JOB_DONE} to rerun the job",
    )  # fmt: skip
    if record is not None and (
        not isinstance(record, dict) or record.get("format") != JOB_RECORD_FORMAT
    ):
        raise ConfigError(
            f"{Path(folder) / JOB_DONE} is not an advprune job record; remove it to rerun the job"
        )
    return record


def run_job(
    grid: Grid, job: Job, out: str | Path, *, progress: ProgressSetting = True
) -> dict[str, Any]:
    """Run one job (pretrain if needed, its method's stages, export, evaluate) in its folder
    and write its ``done`` record; never touches the results store.

    Returns the ``done`` record (that of the earlier run when the job is already finished
    with the same settings). Raises :class:`ConfigError` if the job is running in another
    process, or its folder holds a finished job of other settings.
    """
    from advprune.checkpoint import export_checkpoint, load_checkpoint, read_card, sha256_file
    from advprune.evaluation import evaluate
    from advprune.io import check_same_settings, write_json_atomic
    from advprune.pipeline import MODEL_FILE, cached_stage, prepare_data, run_method

    if job.skip:
        raise ConfigError(f"job {job.index} ({job.key}) is not runnable: {job.skip}")
    out = Path(out)
    folder = job_folder(out, job)
    dense = f"{job.arch}_{job.dataset}"  # the dense model shared by the jobs of (arch, dataset)
    settings = job_settings(grid, job)

    def config_for(stage: str) -> Any:
        return _stage_config(grid, job, stage, progress)

    def folder_for(stage: str) -> Path:
        return out / "dense" / dense if stage == "pretrain" else folder / stage

    def lock_for(stage: str) -> Any:
        if stage == "pretrain":
            return _locked(out / "dense" / f"{dense}.lock", wait=True)
        return contextlib.nullcontext()

    def after_stage(stage: str) -> None:
        if _crash_point() == f"after-{stage}":
            raise RuntimeError(f"ADVPRUNE_GRID_CRASH=after-{stage} (test hook)")

    with _locked(out / "jobs" / f"{job.key}.lock", wait=False) as mine:
        if not mine:
            raise ConfigError(f"job {job.index} ({job.key}) is running in another process")
        before = read_job_record(folder)
        if before is not None:
            check_same_settings(
                folder, before.get("settings"), settings, what="a finished job",
                hint="remove it or use another --out",
            )  # fmt: skip
            return before
        started = datetime.now(timezone.utc)
        data = prepare_data(config_for("prune"))
        _, _, final = run_method(
            config_for, folder_for, data=data, lock_for=lock_for, after_stage=after_stage
        )
        source = read_card(final)["tensors"]["sha256"]
        exported = folder / "export" / MODEL_FILE

        def export():
            return load_checkpoint(export_checkpoint(final, exported))

        model, card = cached_stage(folder / "export", "export", {"source": source}, export)
        after_stage("export")
        ev = grid.evaluation
        ecfg = grid.config(
            dataset=job.dataset, model=job.arch, method=job.method, sparsity=job.sparsity,
            structure=job.structure, method_options=grid.methods[job.method].options,
        )  # fmt: skip
        report = evaluate(
            model,
            data.splits,
            eps=ev.eps or ecfg.eps_text(),
            norm=ecfg.norm,
            attacks=ev.attacks,
            n=ev.n,
            batch_size=ev.batch_size,
            seed=ev.seed,
            out=folder / "eval",
            progress=progress,
            model_info={
                "key": job.key,
                "name": card["architecture"]["name"],
                "checkpoint": str(exported),
                "checkpoint_sha256": (card.get("tensors") or {}).get("sha256"),
                "measured_sparsity": (card.get("sparsity") or {}).get("measured"),
                "method": job.method,
            },
            **ev.options,
        )
        if ev.certify:  # certified entries join the same report (and the store)
            from advprune.evaluation.certifiers import add_certified, certifier_settings

            opts = dict(ev.certify_options)
            sigma = opts.pop("sigma", 0.25)
            add_certified(
                report, model, data.splits.test, out=folder / "eval",
                num_classes=data.splits.info.num_classes, eps=ev.eps or ecfg.eps_text(),
                norm=ecfg.norm, n=ev.n, sigma=sigma, batch_size=ev.batch_size, seed=ev.seed,
                progress=progress, **certifier_settings(ev.certify, **opts),
            )  # fmt: skip
        after_stage("eval")
        report_file = folder / "eval" / "report.json"
        per_sample = (report.files or {}).get("per_sample")
        record = {
            "format": JOB_RECORD_FORMAT,
            "version": 1,
            "key": job.key,
            "index": job.index,
            "protocol": settings["protocol"],
            "settings": settings,
            "settings_sha256": settings_sha256(settings),
            "report": "eval/report.json",
            "report_sha256": sha256_file(report_file),
            "per_sample": f"eval/{per_sample}" if per_sample else None,
            "per_sample_sha256": sha256_file(folder / "eval" / per_sample) if per_sample else None,
            "clean_accuracy": report.clean_accuracy,
            "robust_accuracy": report.robust_accuracy,
            "host": socket.gethostname(),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(folder / JOB_DONE, record)
        return record


def _crash_point() -> str | None:
    """Test hook: ``ADVPRUNE_GRID_CRASH=after-<stage>`` raises once that stage is finished."""
    return os.environ.get("ADVPRUNE_GRID_CRASH")
