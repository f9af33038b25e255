"""The stages a user runs, as functions shared by the CLI and the quickstart.

``train`` (dense pretraining) -> ``prune`` (a method attaches masks) -> ``finetune`` (train
with the method's finetune parameter kinds) -> ``evaluate`` (clean and PGD accuracy). Each
stage writes ``OUT/model.safetensors`` + ``OUT/model.json``; training stages also write
``best`` / ``last`` / ``metrics.jsonl`` so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune.attacks import PGD
from advprune.checkpoint import load_checkpoint, read_card, save_checkpoint, write_json_atomic
from advprune.config import RunConfig
from advprune.data import DataSplits, RandomCropFlip, load_dataset, make_loader
from advprune.errors import CheckpointError, ConfigError
from advprune.methods import Method, create_method, method_from_config
from advprune.models import create
from advprune.sparsity import sparsity_report
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
    """``auto`` -> CUDA if available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass
class Data:
    """Loaded splits and their loaders."""

    splits: DataSplits
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    test: torch.utils.data.DataLoader


def prepare_data(cfg: RunConfig, *, with_val: bool = True) -> Data:
    """Load ``cfg.dataset`` and build seeded loaders (test limited to the first ``cfg.n``).

    ``with_val=False`` (stages that do not train) keeps the whole train split and no val split.
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
    return Data(
        splits=splits,
        train=make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed),
        val=make_loader(splits.val, cfg.batch_size) if splits.val is not None else None,
        test=make_loader(test, cfg.batch_size),
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
    model = model.to(device)
    objective = objective if objective is not None else make_objective(cfg)
    check = getattr(objective, "check_model", None)
    if callable(check):  # objectives that bound the model reject unsupported layers now
        check(model, tuple(data.splits.info.input_shape))
    no_attack = cfg.objective in ("natural", "smooth")
    # certified objectives keep their final epoch, where their eps / weight schedules end (as
    # the IBP, CROWN-IBP, MixTrain and smoothing references do): no best-epoch selection
    keep_last = cfg.objective in CERTIFIED_OBJECTIVES
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs,
        amp=cfg.amp,
        seed=cfg.seed,
        select_by="clean" if no_attack else "robust",
    )
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
    )
    run = _run_record(cfg, model, full_card, tcfg, kinds)
    _check_same_run(out, run)
    write_json_atomic(out / RUN_FILE, run)
    result = trainer.fit()
    if result.best_checkpoint is not None:
        load_best(trainer)
    for p in model.parameters():
        p.requires_grad_(True)
    full_card["training"] = {
        **tcfg.to_dict(),
        "best_epoch": result.best_epoch,
        "best_val_score": result.best_score,
    }
    save_checkpoint(out / MODEL_FILE, model, full_card)
    return model, full_card


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
        "training": tcfg.to_dict(),
        "trains": list(kinds),
    }
    return json.loads(json.dumps(record, default=str))


def _check_same_run(out: Path, run: dict[str, Any]) -> None:
    """Refuse to resume the run in ``out`` when it was started with other settings.

    The trainer resumes from ``out/last`` when it exists; resuming a run of another stage,
    objective, eps, dataset or input checkpoint would silently give a model that does not
    match the settings recorded in its card.
    """
    if not (out / "last.safetensors").exists():
        return
    try:
        before = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        raise ConfigError(
            f"{out} holds a training state of an unknown run (no readable {RUN_FILE}); "
            "pass a new --out folder"
        )
    changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
    if changed:
        raise ConfigError(
            f"{out} holds a {before.get('stage', 'training')} run with other settings "
            f"({', '.join(changed)} differ); rerun with the same settings to resume it, "
            "or pass a new --out folder"
        )


def make_method(cfg: RunConfig) -> Method:
    """The pruning method named by ``cfg.method`` with the config's settings and options."""
    return create_method(
        cfg.method,
        cfg.sparsity,
        structure=cfg.structure,
        scope=cfg.scope,
        keep_first=cfg.keep_first,
        keep_last=cfg.keep_last,
        allocation=cfg.allocation,
        allocation_params={} if cfg.allocation_p is None else {"p": cfg.allocation_p},
        **cfg.method_options,
    )


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
    pruned = method.prepare(copy.deepcopy(model))
    kinds = method.trainable("prune")
    card = _card(cfg, data, method=method.config(), sparsity={"target": cfg.sparsity})
    train = bool(kinds) and cfg.epochs > 0
    if train and out is None:
        raise ConfigError(f"method {method.name!r} trains while pruning; pass an output folder")
    targets: dict[str, float] = {}
    objective_record = None
    for r in range(method.rounds):
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
    if out is not None:
        save_checkpoint(out / MODEL_FILE, pruned, card)
    return pruned, card


def finetune_stage(
    cfg: RunConfig,
    data: Data,
    model: nn.Module,
    prune_card: dict[str, Any],
    *,
    out: Path,
    objective: Objective | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a pruned model with the parameter kinds its method trains in ``finetune``."""
    method_cfg = prune_card.get("method")
    if not method_cfg:
        raise CheckpointError("finetune needs a pruned checkpoint (its card names no method)")
    method = method_from_config(method_cfg)
    if "finetune" not in method.stages:
        raise ConfigError(f"method {method.name!r} has no finetune stage")
    kinds = method.trainable("finetune")
    targets = prune_card.get("sparsity") or {}
    card = {
        "method": method_cfg,
        "sparsity": {k: targets.get(k) for k in ("target", "target_layers")},
    }
    return train_stage(
        cfg,
        data,
        model,
        out=out,
        kinds=kinds,
        card=card,
        stage="finetune",
        regularizer=method.regularizer("finetune"),
        objective=objective,
    )


def evaluate(cfg: RunConfig, data: Data, model: nn.Module) -> dict[str, Any]:
    """Clean and PGD robust accuracy on the test split (first ``cfg.n`` samples)."""
    device = resolve_device(cfg.device)
    model = model.to(device)
    attack = eval_attack(cfg)
    clean, robust = evaluate_accuracy(
        model, data.test, attack, device=device, progress=cfg.progress, desc="evaluate"
    )
    report = sparsity_report(model, tuple(data.splits.info.input_shape))
    return {
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "attack": f"PGD-{attack.steps} ({attack.norm}, step {attack.step_size:.6g}, random start)",
        "eps": cfg.eps_text(),
        "eps_value": cfg.eps_value(),
        "norm": cfg.norm,
        "n": len(data.test.dataset),
        "measured_sparsity": report.sparsity,
    }


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write result rows as JSON, atomically."""
    write_json_atomic(path, rows)


__all__ = [
    "Data",
    "augmentation",
    "build_model",
    "eval_attack",
    "evaluate",
    "finetune_stage",
    "make_method",
    "make_objective",
    "prepare_data",
    "prune_stage",
    "resolve_device",
    "train_stage",
    "write_results",
]
