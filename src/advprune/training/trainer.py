"""One training loop for every stage of every method.

:class:`Trainer` runs SGD (momentum, weight decay) on the parameter groups its caller chooses
(:func:`parameter_groups` selects weights, mask scores, rates and BatchNorm by kind), with a
cosine / step / constant schedule and linear warm-up, optional AMP, validation of clean and
robust accuracy every epoch, the best checkpoint by robust validation accuracy, a JSON-lines
metrics log, and resume from the last completed epoch after a crash. It holds no global
state beyond seeding torch's RNG per epoch (so a resumed run replays the same randomness).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune._validation import check_unit_range
from advprune.checkpoint import load_checkpoint, save_checkpoint
from advprune.data.loaders import inputs_checked
from advprune.distributed import SINGLE, DistContext, local_module
from advprune.errors import ConfigError, UnknownNameError
from advprune.io import load_state, save_state, tensor_path
from advprune.progress import Progress, ProgressSetting, note, progress, resolve
from advprune.sparsity.masks import MaskBase, cached_masks
from advprune.training.objectives import Objective
from advprune.training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_factor
from advprune.training.precision import PRECISIONS, Precision

PARAM_KINDS = ("weights", "scores", "rates", "bn")
SELECT_BY = ("robust", "clean")
EPOCH_SEED_STRIDE = 100_003  # a loader's order in epoch e: seed * stride + e (data.loaders)
RANK_SEED_STRIDE = 7_919  # process r seeds torch's RNG (augmentation, attack starts) apart


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage.

    ``milestones`` are fractions of ``epochs`` at which the step schedule multiplies the
    learning rate by ``gamma``. ``warmup_epochs`` ramps the rate linearly from 0.
    ``select_by`` picks the best checkpoint by robust (default) or clean validation accuracy.
    ``precision``: ``fp32``, ``bf16`` or ``fp16`` (CUDA; ``amp: true`` is the earlier name of
    mixed precision). Fields marked ``runtime`` (``channels_last``, ``compile``) change how
    fast a run goes, not what it computes: a run resumes across a change of them.
    """

    # ``help`` is the CLI's; RunConfig (YAML) and the CLI flags are generated from these fields
    epochs: int = field(default=10, metadata={"help": "training epochs of the stage"})
    optimizer: str = field(
        default="sgd", metadata={"help": "sgd (default), sgd-nesterov, adam, adamw"}
    )
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum"})
    betas: tuple[float, ...] = field(
        default=(0.9, 0.999), metadata={"help": "Adam / AdamW betas, e.g. 0.9,0.999"}
    )
    schedule: str = field(
        default="cosine", metadata={"help": "cosine (default), step, constant, onecycle"}
    )
    milestones: tuple[float, ...] = field(
        default=(0.5, 0.75), metadata={"help": "step schedule: fractions of epochs, e.g. 0.5,0.75"}
    )
    gamma: float = field(default=0.1, metadata={"help": "step schedule: lr factor per milestone"})
    cycle_peak: float = field(
        default=0.3, metadata={"help": "onecycle schedule: fraction of the stage at peak lr"}
    )
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear lr warm-up, in epochs"})
    precision: str = field(
        default="fp32", metadata={"help": "training precision: fp32 (default), bf16, fp16 (CUDA)"}
    )
    amp: bool = field(
        default=False, metadata={"help": "mixed precision (old name: fp16 on CUDA, bf16 on CPU)"}
    )
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm"})
    sync_bn: bool = field(
        default=False,
        metadata={"help": "SyncBatchNorm over the processes (CUDA; default: local BatchNorm)"},
    )
    channels_last: bool | None = field(
        default=None,
        metadata={"help": "channels-last memory format (default: on for CUDA)", "runtime": True},
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the model", "runtime": True}
    )
    seed: int = field(default=0, metadata={"help": "seed", "run": True})
    select_by: str = field(default="robust", metadata={"run": True})

    def __post_init__(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise ConfigError(f"epochs must be an integer >= 0, got {self.epochs}")
        if self.lr < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr and weight_decay must be >= 0 and momentum in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("schedule", self.schedule, SCHEDULES)
        if self.select_by not in SELECT_BY:
            raise UnknownNameError("selection", self.select_by, SELECT_BY)
        if self.warmup_epochs < 0 or self.warmup_epochs > max(self.epochs, 0):
            raise ConfigError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0 <= m <= 1 for m in self.milestones):
            raise ConfigError(
                f"milestones are fractions of epochs in [0, 1], got {self.milestones}"
            )
        if self.gamma < 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ConfigError("gamma must be >= 0 and grad_clip > 0")
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZERS.names())
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or any(not 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas are two numbers in [0, 1), got {self.betas}")
        if not 0 < self.cycle_peak < 1:
            raise ConfigError(f"cycle_peak must be in (0, 1), got {self.cycle_peak}")
        if self.precision not in PRECISIONS:
            raise UnknownNameError("precision", self.precision, PRECISIONS)
        Precision.from_config(self)  # amp and another precision at once

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """:meth:`to_dict` without the ``runtime`` fields: what decides the result (a resumed
        run must match these)."""
        runtime = {f.name for f in fields(self) if f.metadata.get("runtime")}
        return {k: v for k, v in self.to_dict().items() if k not in runtime}

    @classmethod
    def settings_of(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The :meth:`settings` recorded in an earlier run's ``saved`` dict, with the defaults
        of fields it predates (JSON lists back to tuples)."""
        out = {}
        for f in fields(cls):
            if f.metadata.get("runtime"):
                continue
            value = saved.get(f.name, f.default)
            out[f.name] = tuple(value) if isinstance(value, list) else value
        return out


def _param_kind(module: nn.Module, name: str) -> str:
    if isinstance(module, MaskBase):
        return "rates" if "rate" in name else "scores"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    return "weights"


def parameter_groups(
    model: nn.Module,
    train: Iterable[str] = ("weights", "bn"),
    *,
    lr: Mapping[str, float] | None = None,
    weight_decay: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups for the chosen kinds; every other parameter is frozen.

    Kinds: ``weights`` (conv / linear weights and biases, and any other parameter),
    ``scores`` (mask scores), ``rates`` (mask rates, e.g. HARP), ``bn`` (BatchNorm affine).
    ``lr`` / ``weight_decay`` override the trainer's values per kind. Sets ``requires_grad``
    so frozen parameters cost no gradient.
    """
    train = tuple(train)
    for kind in train:
        if kind not in PARAM_KINDS:
            raise UnknownNameError("parameter kind", kind, PARAM_KINDS)
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in PARAM_KINDS}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            groups[_param_kind(module, name)].append(param)
    out = []
    for kind, params in groups.items():
        on = kind in train
        for p in params:
            p.requires_grad_(on)
        if on and params:
            group: dict[str, Any] = {"params": params, "kind": kind}
            if lr and kind in lr:
                group["lr"] = float(lr[kind])
            if weight_decay and kind in weight_decay:
                group["weight_decay"] = float(weight_decay[kind])
            out.append(group)
    if not out:
        raise ConfigError(f"no parameters of kind {', '.join(train)} to train in this model")
    return out


class Regularizer:
    """An extra loss term a method adds to the objective's loss (e.g. HARP's hinge loss).

    The trainer adds :meth:`loss` to every batch's loss, calls :meth:`end_epoch` after every
    epoch (schedules update there; the returned numbers go to ``metrics.jsonl``), keeps an
    epoch as the best checkpoint only if :meth:`ready` (e.g. the target sparsity is met), and
    saves :meth:`state_dict` with the training state so a resumed run continues the schedule.
    """

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        """The term to add to this batch's loss (None: nothing)."""
        return None

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Update the schedule after ``epoch``; return numbers to log."""
        return {}

    def ready(self, model: nn.Module) -> bool:
        """May the model as it is now be kept as the best checkpoint?"""
        return True

    def state_dict(self) -> dict[str, Any]:
        """JSON-able schedule state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class EpochResult:
    """Metrics of one epoch (train loss/accuracy; validation clean/robust accuracy)."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_clean_accuracy: float | None = None
    val_robust_accuracy: float | None = None
    seconds: float = 0.0
    best: bool = False
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns."""

    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None
    best_checkpoint: Path | None = None
    resumed_from: int | None = None


class _RangeCheck:
    """The [0, 1] check of the inputs of a loader that does not guarantee it: the first batch
    at once (one synchronisation, a clear error before any work), every later one on the
    device, read with the epoch's figures (:meth:`pending` / :meth:`raise_if_bad`)."""

    def __init__(self, loader: object, name: str, device: torch.device) -> None:
        self.active = not inputs_checked(loader)
        self.name = name
        self.lo = torch.zeros((), device=device)
        self.hi = torch.ones((), device=device)

    def __call__(self, x: torch.Tensor, first: bool) -> None:
        if not self.active or x.numel() == 0:
            return
        if first:
            check_unit_range(x, self.name)
            return
        with torch.no_grad():
            self.lo = torch.minimum(self.lo, x.min().float())
            self.hi = torch.maximum(self.hi, x.max().float())

    def values(self) -> torch.Tensor:
        """How far below 0 and above 1 the inputs went (>= 0 each; summed over processes
        they stay 0 only if every process saw inputs in range)."""
        return torch.stack([-self.lo, self.hi - 1.0]).double()

    def raise_if_bad(self, below: float, above: float) -> None:
        """Raise the one-line error if :meth:`values` (summed) show inputs out of range."""
        if below > 0.0 or above > 0.0:
            raise ConfigError(
                f"{self.name} must be in [0, 1] (got min {-below:.4g}, max {1 + above:.4g}); "
                "pass unnormalised images: normalisation is the model's first layer"
            )


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: ProgressSetting = False,
    desc: str = "eval",
    dist: DistContext | None = None,
) -> tuple[float, float | None]:
    """Clean accuracy and, with ``attack``, robust accuracy, with the model in eval mode, in
    fp32.

    A sample counts as robust only if the model classifies its adversarial example correctly
    (a clean mistake is never robust). Inputs must be in [0, 1]. With several processes
    (``dist``), each evaluates its share of the data (a sharded loader) and the counts are
    summed over all of them. Counts stay on the device until the end.
    """
    dist = dist or SINGLE
    model = local_module(model)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # clean, robust, total
    check = _RangeCheck(loader, "inputs", device)
    try:
        for i, (x, y) in enumerate(_progress(loader, desc=desc, mode=progress)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            check(x, first=i == 0)
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
            counts[0] += clean_ok.sum()
            counts[2] += y.shape[0]
            if attack is not None:
                x_adv = attack(model, x, y)
                with torch.no_grad():
                    counts[1] += ((model(x_adv).argmax(1) == y) & clean_ok).sum()
    finally:
        model.train(was_training)
    summed = dist.reduce_sum(torch.cat([counts.double(), check.values()]))
    correct, robust, total, below, above = summed.tolist()  # the one read of the evaluation
    check.raise_if_bad(below, above)
    if total == 0:
        raise ConfigError("evaluation data is empty")
    return correct / total, (robust / total if attack is not None else None)


def _progress(
    iterable: Iterable[Any], *, desc: str, mode: ProgressSetting, total: int | None = None
) -> Progress:
    """A per-batch loop's progress: a bar that goes away, or a line only if it runs long."""
    return progress(iterable, desc=desc, total=total, leave=False, mode=mode)


def _epoch_line(row: EpochResult, epochs: int) -> str:
    """One line of an epoch's figures (what ``lines`` mode prints per epoch)."""
    text = (
        f"epoch {row.epoch + 1}/{epochs}: loss {row.train_loss:.4f}, acc {row.train_accuracy:.4f}"
    )
    if row.val_clean_accuracy is not None:
        text += f", val clean {row.val_clean_accuracy:.4f}"
    if row.val_robust_accuracy is not None:
        text += f", val robust {row.val_robust_accuracy:.4f}"
    text += "".join(f", {k} {v:.4g}" for k, v in row.extra.items())
    text += f", lr {row.lr:.4g}, {row.seconds:.1f} s"
    return text + (" (best)" if row.best else "")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _use_sync_bn(model: nn.Module) -> dict[str, nn.Module]:
    """Swap every BatchNorm of ``model`` for a ``SyncBatchNorm`` sharing its parameters and
    buffers; return the originals by name (:func:`_restore_modules` puts them back)."""
    originals = {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
    return originals


def _restore_modules(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    for name, module in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


class Trainer:
    """Train ``model`` with ``objective`` on ``train_loader``.

    Args:
        model: the network (masked or not); moved to ``device``. It stays the plain module
            (checkpoints and the training state hold its state dict); the trainer wraps it
            for the duration of :meth:`fit` (SyncBatchNorm, ``torch.compile``, DDP).
        objective: batch loss (``advprune.training.objectives``).
        train_loader: yields ``(x, y)`` with x in [0, 1]. A loader with ``set_epoch`` (or a
            sampler with one: :func:`advprune.data.fast_loader`) is told the epoch; a
            DataLoader built with a ``generator`` is reseeded every epoch instead. Either
            way a resumed run sees the same order.
        config: :class:`TrainConfig`.
        val_loader: validation data (sharded over the processes); clean and robust accuracy
            are measured every epoch.
        val_attack: attack for robust validation accuracy (e.g. PGD at the objective's eps);
            None reports clean accuracy only (and selects by it).
        param_groups: optimizer groups (see :func:`parameter_groups`); default: every
            parameter that requires grad.
        augment: batch transform applied to training inputs on the device (e.g.
            ``RandomCropFlip``).
        out_dir: where ``last`` (training state), ``best`` (checkpoint) and ``metrics.jsonl``
            go; None keeps everything in memory (no resume, best weights restored at the end).
        card: extra checkpoint-card fields (dataset, method, objective, ...).
        resume: continue from ``out_dir/last`` if it exists.
        progress: ``auto``, ``bar``, ``lines``, ``off``, or True / None (the default mode) /
            False (off); see :mod:`advprune.progress`. Bars or lines per batch, and one line
            per epoch with its figures.
        on_epoch_end: called with every epoch's :class:`EpochResult`.
        regularizer: a method's extra loss term and best-checkpoint rule (:class:`Regularizer`).
        optimizer: the optimizer to step (its groups carry ``base_lr`` for the schedule, see
            :func:`~advprune.training.optim.build_optimizer`); default: the one ``config``
            describes, over ``param_groups``.
        precision: :class:`~advprune.training.precision.Precision` (default: the config's
            ``precision``, or ``amp``).
        dist: the distributed context (default: one process); files are written on the main
            process only and the epoch's counts are summed over every process.
        report_every: steps between two reads of the running loss and accuracy (the progress
            postfix and the non-finite check); the epoch's figures are read at its end.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        config: TrainConfig | None = None,
        *,
        val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        val_attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        param_groups: Sequence[dict[str, Any]] | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        out_dir: str | Path | None = None,
        card: Mapping[str, Any] | None = None,
        resume: bool = True,
        progress: ProgressSetting = True,
        on_epoch_end: Callable[[EpochResult], None] | None = None,
        regularizer: Regularizer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        precision: Precision | None = None,
        dist: DistContext | None = None,
        report_every: int = 50,
    ) -> None:
        self.config = config or TrainConfig()
        self.dist = dist or SINGLE
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.precision = precision or Precision.from_config(self.config)
        self.precision.check(self.device)
        if self.dist.distributed and not getattr(objective, "distributed", True):
            raise ConfigError(
                f"objective {objective.name!r} does not train on several processes yet "
                "(its bounds bypass the model's forward); run it in one process"
            )
        if self.config.sync_bn and self.dist.distributed and self.device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA (SyncBatchNorm runs on GPUs); drop --sync-bn")
        self.model = model.to(self.device)
        cl = self.config.channels_last
        self.channels_last = self.device.type == "cuda" if cl is None else bool(cl)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-D weights; in place
        self.objective = objective
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.val_attack = val_attack
        self.augment = augment
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.card = dict(card or {})
        self.resume = resume
        self.progress = resolve(progress) if self.dist.is_main else "off"  # one rank reports
        self.on_epoch_end = on_epoch_end
        self.regularizer = regularizer
        if isinstance(report_every, bool) or not isinstance(report_every, int) or report_every < 1:
            raise ConfigError(f"report_every must be an integer >= 1, got {report_every!r}")
        self.report_every = report_every
        if optimizer is None:
            if param_groups is None:
                params = [p for p in model.parameters() if p.requires_grad]
                if not params:
                    raise ConfigError("the model has no trainable parameters")
                param_groups = [{"params": params}]
            optimizer = build_optimizer(param_groups, self.config)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.optimizer = optimizer
        self.scaler = self.precision.scaler(self.device)
        self.train_module: nn.Module = self.model  # what the objective calls during fit()

    # ------------------------------------------------------------------ paths and state
    @property
    def last_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "last.safetensors"

    @property
    def best_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "best.safetensors"

    @property
    def metrics_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "metrics.jsonl"

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (an ``out_dir``, main process)."""
        return self.out_dir is not None and self.dist.is_main

    def _state(self, epoch: int, result: FitResult) -> dict[str, Any]:
        opt = self.optimizer.state_dict()
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": opt,
            "scaler": self.scaler.state_dict(),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "config": self.config.to_dict(),
            "regularizer": self.regularizer.state_dict() if self.regularizer else {},
        }

    def _read_resume_state(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The last training state and the metrics rows of its completed epochs, read by the
        main process (and trimmed there) and sent to the others."""
        found: tuple[dict[str, Any] | None, list[dict[str, Any]]] = (None, [])
        if self.dist.is_main and self.last_path is not None and self.last_path.exists():
            state = load_state(self.last_path)
            rows: list[dict[str, Any]] = []
            if self.metrics_path is not None and self.metrics_path.exists():
                rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
                rows = [r for r in rows if r["epoch"] < int(state["epoch"])]
            found = (state, rows)
        return self.dist.broadcast_object(found) if self.dist.distributed else found

    def _try_resume(self, result: FitResult) -> int:
        if not (self.resume and self.last_path is not None):
            return 0
        state, rows = self._read_resume_state()
        if state is None:
            return 0
        if TrainConfig.settings_of(state["config"]) != self.config.settings():
            raise ConfigError(
                f"{self.out_dir} holds a run with another training config; "
                "use a new --out folder or pass resume=False"
            )
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.regularizer is not None:
            self.regularizer.load_state_dict(state.get("regularizer") or {})
        result.best_epoch = state["best_epoch"]
        result.best_score = state["best_score"]
        result.best_checkpoint = self.best_path if result.best_epoch is not None else None
        result.resumed_from = int(state["epoch"])
        # keep the metrics of the epochs that completed
        if self.writes and self.metrics_path.exists():
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        result.history = [EpochResult(**r) for r in rows]
        return result.resumed_from

    # ------------------------------------------------------------------ training
    def _set_lr(self, progress: float) -> float:
        factor = lr_factor(self.config, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def _seed_epoch(self, epoch: int) -> None:
        """The order and randomness of ``epoch``: a function of the seed, the epoch and the
        process only (so a resumed run replays them)."""
        cfg = self.config
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        else:
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(cfg.seed * EPOCH_SEED_STRIDE + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch + RANK_SEED_STRIDE * self.dist.rank)

    def _wrap(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        """The module the objective calls: the model, with SyncBatchNorm (``sync_bn`` on
        several processes), compiled (``compile``) and in DDP (several processes)."""
        module: nn.Module = self.model
        originals: dict[str, nn.Module] = {}
        if self.config.sync_bn and self.dist.distributed:
            originals = _use_sync_bn(module)
        if self.config.compile:
            module = torch.compile(module)
        if self.dist.distributed:
            cuda = self.device.type == "cuda"
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index or 0] if cuda else None
            )
        return module, originals

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """Train one epoch; return its mean loss, accuracy (over every process) and last lr.

        :meth:`fit` calls it (with the model wrapped); a benchmark may call it directly.
        """
        cfg = self.config
        module = self.train_module
        module.train()
        self._seed_epoch(epoch)
        loader = self.train_loader
        n_batches = len(loader) if hasattr(loader, "__len__") else None
        dev = self.device
        # loss sum, correct, seen, first non-finite batch (-1: none), on the device
        stats = torch.zeros(3, dtype=torch.float64, device=dev)
        first_bad = torch.full((), -1.0, dtype=torch.float64, device=dev)
        check = _RangeCheck(loader, "training inputs", dev)
        lr = self._set_lr(epoch)
        # make the iterator before the bar: tqdm may touch the loader (and its generator) itself
        bar = _progress(iter(loader), total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        mode=self.progress)  # fmt: skip
        for i, (x, y) in enumerate(bar):
            done = epoch + (i / n_batches if n_batches else 0.0)
            if n_batches:
                lr = self._set_lr(done)
            self.objective.set_progress(done / cfg.epochs)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            check(x, first=i == 0)
            if self.augment is not None:
                x = self.augment(x)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with cached_masks(self.model), self.precision.autocast(dev):
                out = self.objective(module, x, y)
                extra = self.regularizer.loss(self.model) if self.regularizer else None
            loss = out.loss.float() if extra is None else out.loss.float() + extra.float()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            with torch.no_grad():
                value = loss.detach().double()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(value), i, first_bad)
                stats[0] += value * y.shape[0]  # python numbers: no host-to-device copy
                stats[1] += (out.logits.detach().argmax(1) == y).sum()
                stats[2] += y.shape[0]
            if (i + 1) % self.report_every == 0:  # a read every report_every steps only
                figures = self._read(stats, first_bad, check, epoch)
                bar.set_postfix(loss=f"{figures[0] / figures[2]:.3f}",
                                acc=f"{figures[1] / figures[2]:.3f}")  # fmt: skip
        total_loss, correct, seen = self._read(stats, first_bad, check, epoch)
        if seen == 0:
            raise ConfigError("the training data is empty")
        return total_loss / seen, correct / seen, lr

    def _read(
        self, stats: torch.Tensor, first_bad: torch.Tensor, check: _RangeCheck, epoch: int
    ) -> tuple[float, float, float]:
        """Sum the running figures over the processes and read them (one synchronisation);
        raise if the loss became non-finite or inputs left [0, 1]."""
        bad = (first_bad >= 0).double()
        values = torch.cat([stats, bad.view(1), first_bad.view(1), check.values()])
        summed = self.dist.reduce_sum(values).tolist()
        total_loss, correct, seen, n_bad, _, below, above = summed
        if n_bad > 0:
            local = int(values[4])  # this process's first bad batch (-1: another process's)
            where = f", batch {local}" if local >= 0 else " (on another process)"
            raise FloatingPointError(
                f"training loss became non-finite (nan or inf) at epoch {epoch + 1}{where}; "
                "lower the learning rate"
            )
        check.raise_if_bad(below, above)
        return total_loss, correct, seen

    def fit(self) -> FitResult:
        """Train for ``config.epochs`` epochs (resuming if possible) and return the history.

        With an ``out_dir``, the best checkpoint is saved as ``best.safetensors`` + card and
        the training state after every epoch as ``last``; without one, the best weights are
        restored into the model at the end.
        """
        cfg = self.config
        result = FitResult()
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start = self._try_resume(result)
        best_state: dict[str, torch.Tensor] | None = None
        self.train_module, originals = self._wrap()
        try:
            for epoch in range(start, cfg.epochs):
                best_state = self._fit_epoch(epoch, result, best_state)
        finally:
            self.train_module = self.model
            _restore_modules(self.model, originals)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return result

    def _fit_epoch(
        self, epoch: int, result: FitResult, best_state: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor] | None:
        cfg = self.config
        t0 = time.perf_counter()
        loss, acc, lr = self.train_epoch(epoch)
        if self.dist.distributed:  # every process holds rank 0's BatchNorm statistics
            self.dist.broadcast_module(self.model, parameters=False)
        row = EpochResult(epoch=epoch, lr=lr, train_loss=loss, train_accuracy=acc)
        ready = True
        if self.regularizer is not None:
            row.extra = dict(self.regularizer.end_epoch(self.model, epoch))
            ready = self.regularizer.ready(self.model)
        if self.val_loader is not None:
            clean, robust = evaluate_accuracy(
                self.model,
                self.val_loader,
                self.val_attack,
                device=self.device,
                progress=self.progress,
                desc="validate",
                dist=self.dist,
            )
            row.val_clean_accuracy, row.val_robust_accuracy = clean, robust
        score = self._score(row)
        better = result.best_score is None or (score is not None and score >= result.best_score)
        if ready and score is not None and better:
            result.best_score, result.best_epoch, row.best = score, epoch, True
            if self.best_path is not None:
                result.best_checkpoint = self.best_path
                if self.dist.is_main:
                    save_checkpoint(self.best_path, self.model, self._card(row))
            else:
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        row.seconds = time.perf_counter() - t0
        note(_epoch_line(row, cfg.epochs), self.progress)
        result.history.append(row)
        if self.writes:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(asdict(row)) + "\n")
            save_state(self.last_path, self._state(epoch + 1, result))
        self.dist.barrier()
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)
        return best_state

    def _score(self, row: EpochResult) -> float | None:
        if self.config.select_by == "robust" and row.val_robust_accuracy is not None:
            return row.val_robust_accuracy
        return row.val_clean_accuracy

    def _card(self, row: EpochResult) -> dict[str, Any]:
        card = dict(self.card)
        card.setdefault("objective", self.objective.config())
        card["training"] = {
            **dict(card.get("training") or {}),
            **self.config.to_dict(),
            "precision": self.precision.resolved(self.device),
            "world_size": self.dist.world_size,
            "epoch": row.epoch,
            "val_clean_accuracy": row.val_clean_accuracy,
            "val_robust_accuracy": row.val_robust_accuracy,
        }
        return card


def load_best(trainer: Trainer) -> dict[str, Any] | None:
    """Load the best checkpoint's weights back into the trainer's model; return its card.

    With several processes the main one reads it and sends the weights to the others.
    """
    card = None
    path = trainer.best_path
    if trainer.dist.is_main and path is not None and tensor_path(path).exists():
        best, card = load_checkpoint(path, map_location=trainer.device)
        trainer.model.load_state_dict(best.state_dict(), strict=True)
    if trainer.dist.distributed:
        card = trainer.dist.broadcast_object(card)
        if card is not None:
            trainer.dist.broadcast_module(trainer.model)
    return card
