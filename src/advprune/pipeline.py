"""The one stage pipeline: every stage of every method, for the CLI, the API, the quickstart
and the benchmark grid.

A method's ``stages`` (:attr:`advprune.methods.Method.stages`) are its sequence, e.g.
``pretrain -> prune -> finetune``; :meth:`~advprune.methods.Method.stage_kind` says what each
one does: ``pretrain`` (dense training, :func:`train_stage`), ``prune`` (the method attaches /
updates masks in its rounds and trains what it trains then, :func:`prune_stage`) or ``train``
(masks fixed, the parameter kinds the method trains in that stage, :func:`finetune_stage`).
:func:`run_stage` runs one stage (``advprune train|prune|finetune``, one grid or torchrun
job), :func:`run_method` the whole sequence, each stage in its folder with a ``done`` record
of the settings it ran with (the benchmark grid). A method with another sequence changes only
its own file.

Each stage writes ``OUT/model.safetensors`` + ``OUT/model.json``; training stages also write
``best`` / ``last`` / ``metrics.jsonl`` and ``run.json`` (their settings), so an interrupted
run resumes, and a folder holding another run's settings is refused
(:func:`advprune.io.check_same_settings`, the one resumable-folder guard).

Under ``torchrun`` every process runs the same stage on its share of the data
(:func:`advprune.distributed.init_distributed` joins them; ``batch_size`` is the global batch,
split evenly); the main process writes every file.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.attacks import PGD
from advprune.checkpoint import load_checkpoint, read_card, save_checkpoint
from advprune.config import RunConfig
from advprune.data import DataSplits, RandomCropFlip, fast_loader, load_dataset
from advprune.distributed import DistContext
from advprune.errors import CheckpointError, ConfigError
from advprune.io import check_same_settings, read_json_record, write_json_atomic
from advprune.methods import Method, create_method, method_from_config
from advprune.models import create
from advprune.sparsity import parse_structure, sparsity_report
from advprune.training import (
    Objective,
    Regularizer,
    TrainConfig,
    Trainer,
    create_objective,
    evaluate_accuracy,
    load_best,
    parameter_groups,
)
from advprune.training.certified import CERTIFIED_OBJECTIVES, objective_from_config

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"  # the settings of the training run in a folder, to refuse a wrong resume


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; otherwise the named device. Under torchrun
    (several processes), ``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""
    dist = DistContext.from_env()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and dist.distributed:
        if device.index is not None and device.index != dist.local_rank:
            raise ConfigError(
                f"device {name!r} under torchrun: each process uses its own GPU "
                "(cuda:LOCAL_RANK); pass --device cuda or auto"
            )
        device = torch.device("cuda", dist.local_rank)
    return device


def process_batch_size(cfg: RunConfig, dist: DistContext) -> int:
    """Each process's batch: the global ``batch_size`` split evenly over the processes."""
    if cfg.batch_size % dist.world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch; it must be divisible by the "
            f"{dist.world_size} processes"
        )
    return cfg.batch_size // dist.world_size


Loader = Any  # an iterable of (x, y) batches: advprune.data.DeviceLoader or a DataLoader


@dataclass
class Data:
    """Loaded splits and their loaders (this process's share of them under torchrun)."""

    splits: DataSplits
    train: Loader
    val: Loader | None
    test: Loader


def prepare_data(cfg: RunConfig, *, with_val: bool = True) -> Data:
    """Load ``cfg.dataset`` and build seeded loaders (test limited to the first ``cfg.n``).

    ``with_val=False`` (stages that do not train) keeps the whole train split and no val split.
    The loaders are :func:`advprune.data.fast_loader`'s: in-memory datasets live on the
    device, others use ``cfg.workers`` DataLoader workers; each process of a torchrun job
    gets its share of every split.
    """
    splits = load_dataset(
        cfg.dataset,
        cfg.data_root,
        download=cfg.download,
        val_fraction=cfg.val_fraction if with_val else 0.0,
        seed=cfg.seed,
    )
    test = splits.test
    if cfg.n is not None:
        test = torch.utils.data.Subset(test, range(min(cfg.n, len(test))))
    dist = DistContext.from_env()
    device = resolve_device(cfg.device)
    batch = process_batch_size(cfg, dist)

    def loader(dataset: Any, shuffle: bool = False) -> Loader:
        return fast_loader(dataset, batch, shuffle=shuffle, seed=cfg.seed, device=device,
                           rank=dist.rank, world_size=dist.world_size,
                           workers=cfg.workers)  # fmt: skip

    return Data(
        splits=splits,
        train=loader(splits.train, shuffle=True),
        val=loader(splits.val) if splits.val is not None else None,
        test=loader(test),
    )


def augmentation(cfg: RunConfig, data: Data) -> RandomCropFlip | None:
    """Random crop (padding 4) + flip for inputs of 32x32 and larger unless ``cfg.augment``
    says otherwise; digits (8x8) are not augmented by default (flips change digits)."""
    use = cfg.augment
    if use is None:
        use = min(data.splits.info.input_shape[1:]) >= 32
    return RandomCropFlip(padding=4, flip=True) if use else None


def build_model(cfg: RunConfig, data: Data) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to train: from ``cfg.checkpoint`` if given, else a fresh ``cfg.model``."""
    info = data.splits.info
    if cfg.checkpoint:
        model, card = load_checkpoint(cfg.checkpoint)
        spec = model.spec
        if "model" in cfg.model_fields_set and cfg.model != spec.name:
            raise CheckpointError(
                f"model {cfg.model!r} was set but {cfg.checkpoint} holds a {spec.name!r}; "
                "drop the model setting or pass a checkpoint of that architecture"
            )
        if spec.num_classes != info.num_classes or spec.in_channels != info.input_shape[0]:
            dataset = card.get("dataset")
            trained_on = dataset.get("name") if isinstance(dataset, dict) else None
            hint = f"pass --dataset {trained_on}" if trained_on else "pass its dataset"
            raise CheckpointError(
                f"{cfg.checkpoint} is a {spec.name} for {spec.num_classes} classes and "
                f"{spec.in_channels} channels; {info.name} has {info.num_classes} classes "
                f"and {info.input_shape[0]} channels; {hint} (the one it was trained on)"
            )
        return model, card
    # the initial weights depend on cfg.seed only (not on whatever used torch's RNG before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create(
            cfg.model,
            num_classes=info.num_classes,
            in_channels=info.input_shape[0],
            mean=info.mean,
            std=info.std,
        )
    return model, None


def make_objective(cfg: RunConfig):
    """The training objective named by ``cfg.objective`` with the config's attack settings
    (and ``cfg.objective_options``); certified objectives are built by
    :func:`advprune.training.certified.objective_from_config`."""
    if cfg.objective in CERTIFIED_OBJECTIVES:
        return objective_from_config(cfg)
    options = dict(cfg.objective_options)
    if cfg.objective == "natural":
        return create_objective("natural", **options)
    kwargs: dict[str, Any] = {"eps": cfg.eps_text(), "norm": cfg.norm}
    if cfg.objective == "fast":
        if cfg.step_size is not None:
            kwargs["step_size"] = cfg.step_size
        return create_objective("fast", **kwargs, **options)
    kwargs.update(
        steps=cfg.attack_steps,
        step_size=cfg.step_size_value(cfg.attack_steps),
        attack_mode=cfg.attack_mode,
    )
    if cfg.objective in ("trades", "mart"):
        kwargs["beta"] = cfg.beta
    return create_objective(cfg.objective, **{**kwargs, **options})


def eval_attack(cfg: RunConfig, steps: int | None = None) -> PGD:
    """PGD with ``steps`` (default ``cfg.eval_steps``) at the config's eps, step 2.5·eps/steps."""
    return PGD(eps=cfg.eps_text(), steps=steps or cfg.eval_steps, norm=cfg.norm, model_mode="eval")


def _card(cfg: RunConfig, data: Data, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": data.splits.info.to_dict(),
        "input_shape": list(data.splits.info.input_shape),
        "eps": cfg.eps_text(),
        "eps_value": cfg.eps_value(),
        "norm": cfg.norm,
        "seed": cfg.seed,
        **extra,
    }


def train_stage(
    cfg: RunConfig,
    data: Data,
    model: nn.Module,
    *,
    out: Path,
    kinds: tuple[str, ...] = ("weights", "bn"),
    card: dict[str, Any] | None = None,
    stage: str = "pretrain",
    regularizer: Regularizer | None = None,
    objective: Objective | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (the parameter ``kinds`` only) and save ``out/model.safetensors``.

    ``objective`` replaces the one ``cfg`` names (API use with a ready-made objective).

    The best epoch by robust validation accuracy is kept when there is validation data (and,
    with a ``regularizer``, only among epochs where it is ready, e.g. the target is met);
    certified objectives keep the final epoch.
    """
    device = resolve_device(cfg.device)
    dist = DistContext.from_env()
    model = model.to(device)
    objective = objective if objective is not None else make_objective(cfg)
    check = getattr(objective, "check_model", None)
    if callable(check):  # objectives that bound the model reject unsupported layers now
        check(model, tuple(data.splits.info.input_shape))
    no_attack = cfg.objective in ("natural", "smooth")
    # certified objectives keep their final epoch, where their eps / weight schedules end (as
    # the IBP, CROWN-IBP, MixTrain and smoothing references do): no best-epoch selection
    keep_last = cfg.objective in CERTIFIED_OBJECTIVES
    tcfg = cfg.train_config(select_by="clean" if no_attack else "robust")
    full_card = _card(cfg, data, **(card or {}), stage=stage, objective=objective.config())
    trainer = Trainer(
        model,
        objective,
        data.train,
        tcfg,
        val_loader=None if keep_last else data.val,
        # validation (model selection) uses the training attack's step count; the final
        # evaluation uses the stronger eval attack
        val_attack=None if no_attack else eval_attack(cfg, cfg.attack_steps),
        param_groups=parameter_groups(model, kinds),
        augment=augmentation(cfg, data),
        device=device,
        out_dir=out,
        card=full_card,
        progress=cfg.progress,
        regularizer=regularizer,
        dist=dist,
    )
    run = _run_record(cfg, model, full_card, tcfg, kinds)
    if dist.is_main:
        if (out / "last.safetensors").exists():  # the trainer would resume the run in ``out``
            before = read_json_record(out / RUN_FILE, what="training run")
            what = f"a {(before or {}).get('stage', 'training')} run"
            recorded = _with_defaults(before) if before is not None else []
            check_same_settings(out, recorded, run, what=what)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, run)
    result = trainer.fit()
    if result.best_checkpoint is not None:
        load_best(trainer)
    for p in model.parameters():
        p.requires_grad_(True)
    full_card["training"] = {
        **tcfg.to_dict(),
        "precision": trainer.precision.resolved(device),
        "world_size": dist.world_size,
        "best_epoch": result.best_epoch,
        "best_val_score": result.best_score,
    }
    if dist.is_main:
        save_checkpoint(out / MODEL_FILE, model, full_card)
    dist.barrier()
    return model, full_card


def _with_defaults(record: Any) -> Any:
    """An earlier ``run.json`` with the training settings added since at their defaults (so
    a run started before they existed resumes)."""
    if isinstance(record, dict) and isinstance(record.get("training"), dict):
        training = TrainConfig.settings_of(record["training"])
        record = {**record, "training": json.loads(json.dumps(training))}
    return record


def _run_record(
    cfg: RunConfig, model: nn.Module, card: dict[str, Any], tcfg: TrainConfig, kinds: tuple
) -> dict[str, Any]:
    """Everything that decides what a training run computes (JSON-normalised)."""
    init = None
    if cfg.checkpoint:
        init = (read_card(cfg.checkpoint).get("tensors") or {}).get("sha256")
    record = {
        **card,
        "architecture": model.spec.to_dict(),
        "init_checkpoint_sha256": init,
        "data": {
            "batch_size": cfg.batch_size,
            "val_fraction": cfg.val_fraction,
            "augment": cfg.augment,
        },
        "training": tcfg.settings(),
        "trains": list(kinds),
    }
    return json.loads(json.dumps(record, default=str))


def make_method(cfg: RunConfig) -> Method:
    """The pruning method named by ``cfg.method`` with the config's settings and options.

    A structure that fixes the density (``2:4``: sparsity 0.5) sets the sparsity when the
    settings do not give one."""
    chosen = ("structure", "scope", "keep_first", "keep_last", "allocation")
    params = {} if cfg.allocation_p is None else {"p": cfg.allocation_p}
    settings = {name: getattr(cfg, name) for name in chosen}
    sparsity = cfg.sparsity
    fixed = parse_structure(cfg.structure).density
    if fixed is not None and "sparsity" not in cfg.model_fields_set:
        sparsity = 1.0 - fixed
    return create_method(
        cfg.method, sparsity, **settings, allocation_params=params, **cfg.method_options
    )


@contextlib.contextmanager
def _seeded(seed: int, *salt: int) -> Iterator[None]:
    """torch's RNG seeded from ``(seed, *salt)`` inside, restored after: what a method draws
    (initial scores, random masks) depends on the run's seed only, never on what this process
    drew before (which differs between the CLI, a grid job and a torchrun rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if not salt else hash((seed, *salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        yield


def prune_stage(
    cfg: RunConfig,
    data: Data,
    model: nn.Module,
    *,
    out: Path | None,
    objective: Objective | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Run ``cfg.method``'s prune stage on a copy of ``model``; save if ``out`` is set.

    The method prepares the model, then for each of its rounds attaches / updates masks and,
    if it trains in this stage (HYDRA's and HARP's scores, iterative LWM's weights), trains
    for ``cfg.epochs`` with the run's objective and the method's regularizer. Multi-round
    training goes to ``out/round_R`` folders, so an interrupted stage resumes.
    """
    method = make_method(cfg)
    with _seeded(cfg.seed):
        pruned = method.prepare(copy.deepcopy(model))
    kinds = method.trainable("prune")
    card = _card(cfg, data, method=method.config(), sparsity={"target": method.sparsity})
    train = bool(kinds) and cfg.epochs > 0
    if train and out is None:
        raise ConfigError(f"method {method.name!r} trains while pruning; pass an output folder")
    targets: dict[str, float] = {}
    objective_record = None
    for r in range(method.rounds):
        with _seeded(cfg.seed, r):  # random scores (binary, HYDRA) depend on the seed only
            targets = method.prune_round(pruned, r)
        card["sparsity"]["target_layers"] = targets
        if train:
            assert out is not None
            folder = out if method.rounds == 1 else out / f"round_{r}"
            pruned, trained_card = train_stage(
                cfg,
                data,
                pruned,
                out=folder,
                kinds=kinds,
                card=card,
                stage="prune",
                regularizer=method.regularizer("prune"),
                objective=objective,
            )
            card["training"] = trained_card.get("training")
            objective_record = trained_card.get("objective")
    if train:  # the objective the method trained with
        card["objective"] = objective_record
    card["stage"] = "prune"
    card["sparsity"]["target_layers"] = method.finish(pruned, targets)
    if method.skipped_layers:  # layers the structure cannot take (N:M), and why
        card["sparsity"]["skipped_layers"] = dict(method.skipped_layers)
    dist = DistContext.from_env()
    if out is not None and dist.is_main:
        save_checkpoint(out / MODEL_FILE, pruned, card)
    dist.barrier()
    return pruned, card


def finetune_stage(
    cfg: RunConfig,
    data: Data,
    model: nn.Module,
    prune_card: dict[str, Any],
    *,
    out: Path,
    objective: Objective | None = None,
    stage: str = "finetune",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a pruned model, masks fixed, with the parameter kinds its method trains in
    ``stage`` (``finetune``, or any other stage of kind ``train`` the method declares)."""
    method_cfg = prune_card.get("method")
    if not method_cfg:
        raise CheckpointError(f"{stage} needs a pruned checkpoint (its card names no method)")
    method = method_from_config(method_cfg)
    if stage not in method.stages:
        raise ConfigError(f"method {method.name!r} has no {stage} stage")
    if method.stage_kind(stage) != "train":
        raise ConfigError(
            f"stage {stage!r} of method {method.name!r} is a {method.stage_kind(stage)} stage, "
            "not one that trains a pruned model"
        )
    kinds = method.trainable(stage)
    targets = prune_card.get("sparsity") or {}
    card = {
        "method": method_cfg,
        "sparsity": {
            **{k: targets.get(k) for k in ("target", "target_layers")},
            **{k: targets[k] for k in ("skipped_layers",) if k in targets},
        },
    }
    return train_stage(
        cfg,
        data,
        model,
        out=out,
        kinds=kinds,
        card=card,
        stage=stage,
        regularizer=method.regularizer(stage),
        objective=objective,
    )


def evaluate(cfg: RunConfig, data: Data, model: nn.Module) -> dict[str, Any]:
    """Clean and PGD robust accuracy on the test split (first ``cfg.n`` samples), in fp32
    (each process of a torchrun job attacks its share; the counts are summed)."""
    device = resolve_device(cfg.device)
    model = model.to(device)
    attack = eval_attack(cfg)
    dist = DistContext.from_env()
    clean, robust = evaluate_accuracy(
        model, data.test, attack, device=device, progress=cfg.progress, desc="evaluate",
        dist=dist,
    )  # fmt: skip
    report = sparsity_report(model, tuple(data.splits.info.input_shape))
    return {
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "attack": f"PGD-{attack.steps} ({attack.norm}, step {attack.step_size:.6g}, random start)",
        "eps": cfg.eps_text(),
        "eps_value": cfg.eps_value(),
        "norm": cfg.norm,
        "n": len(data.test.dataset),
        "precision": "fp32",
        "measured_sparsity": report.sparsity,
    }


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write result rows as JSON, atomically."""
    write_json_atomic(path, rows)


# ---------------------------------------------------------------------------- the stage sequence


def run_stage(
    stage: str,
    cfg: RunConfig,
    data: Data,
    model: nn.Module,
    card: dict[str, Any] | None = None,
    *,
    out: Path | None,
    objective: Objective | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Run one stage of ``cfg.method`` (after the prune stage: of the method the ``card``
    records) on ``model``; return the stage's model and card.

    ``pretrain`` trains ``model`` dense, a ``prune`` stage prunes a copy, a ``train`` stage
    trains the pruned ``model`` (its ``card`` from the prune stage) with masks fixed.
    """
    recorded = (card or {}).get("method")
    method = method_from_config(recorded) if recorded else make_method(cfg)
    kind = method.stage_kind(stage)
    if stage not in method.stages:
        raise ConfigError(
            f"method {method.name!r} has no stage {stage!r}; its stages: {', '.join(method.stages)}"
        )
    if kind == "pretrain":
        if out is None:
            raise ConfigError("the pretrain stage trains; pass an output folder")
        return train_stage(cfg, data, model, out=out, objective=objective, stage=stage)
    if kind == "prune":
        return prune_stage(cfg, data, model, out=out, objective=objective)
    if out is None:
        raise ConfigError(f"the {stage} stage trains; pass an output folder")
    return finetune_stage(cfg, data, model, card or {}, out=out, objective=objective, stage=stage)


DONE = "done"  # a finished stage's record of its settings, in its folder (run_method)


# settings that decide where and how fast a run goes, not what it computes
PLACEMENT_FIELDS = ("progress", "out", "device", "workers", "channels_last", "compile")


def stage_settings(cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """What decides a stage's result: its RunConfig (without display / placement fields)."""
    record = cfg.model_dump(mode="json", exclude=set(PLACEMENT_FIELDS))
    return json.loads(json.dumps({**record, **extra}, default=str))


def cached_stage(
    folder: Path, stage: str, settings: dict[str, Any], run: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Reuse the finished stage in ``folder`` (its ``done`` record holds the settings it ran
    with), else ``run()`` it and record them; an interrupted training stage resumes from its
    last epoch. A finished stage of other settings is a :class:`ConfigError` (never a stale
    model reused)."""
    before = read_json_record(folder / DONE, what=f"the {stage} stage's record")
    if before is not None:
        check_same_settings(
            folder, before, settings, what=f"a finished {stage} stage",
            hint="remove it or use another --out",
        )  # fmt: skip
        return load_checkpoint(folder / MODEL_FILE)
    result = run()
    if DistContext.from_env().is_main:
        write_json_atomic(folder / DONE, settings)
    return result


def run_method(
    config_for: Callable[[str], RunConfig],
    folder_for: Callable[[str], Path],
    *,
    data: Data | None = None,
    start: tuple[nn.Module, dict[str, Any] | None] | None = None,
    lock_for: Callable[[str], Any] | None = None,
    after_stage: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any], Path]:
    """Run every stage of the method ``config_for(stage).method`` names, in its order.

    ``config_for(stage)`` gives each stage's settings, ``folder_for(stage)`` its folder (the
    stage's ``done`` record makes a rerun reuse it, see :func:`cached_stage`); ``lock_for``
    a lock to hold around a stage (a dense model shared between jobs); ``start`` the model
    the first stage starts from (default: a fresh, seeded ``cfg.model``). A training stage
    with 0 epochs after the prune stage is skipped. Returns the final model, its card and its
    checkpoint path.
    """
    first = config_for("prune")
    method = make_method(first)
    data = data if data is not None else prepare_data(first)
    model, card = start if start is not None else build_model(first, data)
    origin = "fresh" if start is None else None
    final: Path | None = None
    for stage in method.stages:
        cfg = config_for(stage)
        kind = method.stage_kind(stage)
        if kind == "train" and cfg.epochs == 0:
            continue
        folder = folder_for(stage)
        stage_data = data if kind == "prune" else prepare_data(cfg)
        if kind == "pretrain":
            model, card = build_model(cfg, stage_data)
        start_sha = origin if final is None else read_card(final)["tensors"]["sha256"]
        settings = (
            stage_settings(cfg) if kind == "pretrain" else stage_settings(cfg, start=start_sha)
        )
        prev_model, prev_card = model, card

        def go(stage=stage, cfg=cfg, stage_data=stage_data, m=prev_model, c=prev_card, f=folder):
            return run_stage(stage, cfg, stage_data, m, c, out=f)

        lock = lock_for(stage) if lock_for is not None else contextlib.nullcontext()
        with lock:
            model, card = cached_stage(folder, stage, settings, go)
        final = folder / MODEL_FILE
        if after_stage is not None:
            after_stage(stage)
    assert final is not None, "a method has at least one stage"
    return model, card, final


__all__ = [
    "DONE",
    "MODEL_FILE",
    "Data",
    "augmentation",
    "build_model",
    "cached_stage",
    "eval_attack",
    "evaluate",
    "finetune_stage",
    "make_method",
    "make_objective",
    "prepare_data",
    "process_batch_size",
    "prune_stage",
    "resolve_device",
    "run_method",
    "run_stage",
    "stage_settings",
    "train_stage",
    "write_results",
]
