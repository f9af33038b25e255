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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advprune._validation import check_unit_range
from advprune.checkpoint import load_checkpoint, save_checkpoint
from advprune.distributed import SINGLE, DistContext
from advprune.errors import ConfigError, UnknownNameError
from advprune.io import load_state, save_state, tensor_path
from advprune.progress import Progress, ProgressSetting, note, progress, resolve
from advprune.sparsity.masks import MaskBase
from advprune.training.objectives import Objective
from advprune.training.optim import SCHEDULES, build_optimizer, lr_factor
from advprune.training.precision import Precision

PARAM_KINDS = ("weights", "scores", "rates", "bn")
SELECT_BY = ("robust", "clean")


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage.

    ``milestones`` are fractions of ``epochs`` at which the step schedule multiplies the
    learning rate by ``gamma``. ``warmup_epochs`` ramps the rate linearly from 0.
    ``select_by`` picks the best checkpoint by robust (default) or clean validation accuracy.
    """

    # ``help`` is the CLI's; RunConfig (YAML) and the CLI flags are generated from these fields
    epochs: int = field(default=10, metadata={"help": "training epochs of the stage"})
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (default), step, constant"})
    milestones: tuple[float, ...] = field(
        default=(0.5, 0.75), metadata={"help": "step schedule: fractions of epochs, e.g. 0.5,0.75"}
    )
    gamma: float = field(default=0.1, metadata={"help": "step schedule: lr factor per milestone"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear lr warm-up, in epochs"})
    amp: bool = field(default=False, metadata={"help": "mixed precision (autocast)"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm"})
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@torch.no_grad()
def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(1) == y).sum())


def evaluate_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: ProgressSetting = False,
    desc: str = "eval",
) -> tuple[float, float | None]:
    """Clean accuracy and, with ``attack``, robust accuracy, with the model in eval mode.

    A sample counts as robust only if the model classifies its adversarial example correctly
    (a clean mistake is never robust). Inputs must be in [0, 1].
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = robust = total = 0
    try:
        for x, y in _progress(loader, desc=desc, mode=progress):
            x, y = x.to(device), y.to(device)
            check_unit_range(x)
            with torch.no_grad():
                clean_ok = model(x).argmax(1) == y
            correct += int(clean_ok.sum())
            total += len(y)
            if attack is not None:
                x_adv = attack(model, x, y)
                with torch.no_grad():
                    robust += int(((model(x_adv).argmax(1) == y) & clean_ok).sum())
    finally:
        model.train(was_training)
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


class Trainer:
    """Train ``model`` with ``objective`` on ``train_loader``.

    Args:
        model: the network (masked or not); moved to ``device``.
        objective: batch loss (``advprune.training.objectives``).
        train_loader: yields ``(x, y)`` with x in [0, 1]. A DataLoader built with a
            ``generator`` is reseeded every epoch, so a resumed run sees the same order.
        config: :class:`TrainConfig`.
        val_loader: validation data; clean and robust accuracy are measured every epoch.
        val_attack: attack for robust validation accuracy (e.g. PGD at the objective's eps);
            None reports clean accuracy only (and selects by it).
        param_groups: optimizer groups (see :func:`parameter_groups`); default: every
            parameter that requires grad.
        augment: batch transform applied to training inputs (e.g. ``RandomCropFlip``).
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
        precision: :class:`~advprune.training.precision.Precision` (default: ``amp`` when
            ``config.amp``, else fp32).
        dist: the distributed context (default: one process); files are written on the main
            process only and the epoch's counts are summed over every process.
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
    ) -> None:
        self.config = config or TrainConfig()
        self.dist = dist or SINGLE
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model = model.to(self.device)
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
        self.precision = precision or Precision.from_amp(self.config.amp)
        self.scaler = self.precision.scaler(self.device)

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

    def _try_resume(self, result: FitResult) -> int:
        if not (self.resume and self.last_path is not None and self.last_path.exists()):
            return 0
        state = load_state(self.last_path)
        saved = dict(state["config"])
        saved["milestones"] = tuple(saved["milestones"])
        if saved != self.config.to_dict():
            raise ConfigError(
                f"{self.out_dir} holds a run with another training config; "
                "use a new --out folder or pass resume=False"
            )
        self.model.load_state_dict(state["model"], strict=True)
        opt_state = state["optimizer"]
        self.optimizer.load_state_dict(opt_state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.regularizer is not None:
            self.regularizer.load_state_dict(state.get("regularizer") or {})
        result.best_epoch = state["best_epoch"]
        result.best_score = state["best_score"]
        result.best_checkpoint = self.best_path if result.best_epoch is not None else None
        result.resumed_from = int(state["epoch"])
        # keep the metrics of the epochs that completed
        if self.metrics_path is not None and self.metrics_path.exists():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
            rows = [r for r in rows if r["epoch"] < result.resumed_from]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            result.history = [EpochResult(**r) for r in rows]
        return result.resumed_from

    # ------------------------------------------------------------------ training
    def _set_lr(self, progress: float) -> float:
        factor = lr_factor(self.config, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def _train_epoch(self, epoch: int) -> tuple[float, float, float]:
        cfg = self.config
        self.model.train()
        generator = getattr(self.train_loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        n_batches = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        total_loss = 0.0
        correct = seen = 0
        lr = self._set_lr(epoch)
        # make the iterator before the bar: tqdm may touch the loader (and its generator) itself
        bar = _progress(
            iter(self.train_loader),
            total=n_batches,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            mode=self.progress,
        )
        for i, (x, y) in enumerate(bar):
            done = epoch + (i / n_batches if n_batches else 0.0)
            if n_batches:
                lr = self._set_lr(done)
            self.objective.set_progress(done / cfg.epochs)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            check_unit_range(x, "training inputs")
            if self.augment is not None:
                x = self.augment(x)
            with self.precision.autocast(self.device):
                out = self.objective(self.model, x, y)
                extra = self.regularizer.loss(self.model) if self.regularizer else None
            loss = out.loss.float() if extra is None else out.loss.float() + extra.float()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, batch {i}; "
                    "lower the learning rate"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += float(loss.detach()) * len(y)
            correct += _accuracy(out.logits.detach(), y)
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if self.dist.distributed:  # the epoch's figures over every process
            sums = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
            total_loss, correct, seen = (float(v) for v in self.dist.reduce_sum(sums))
        if seen == 0:
            raise ConfigError("the training data is empty")
        return total_loss / seen, correct / seen, lr

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
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            loss, acc, lr = self._train_epoch(epoch)
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
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return result

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
            "epoch": row.epoch,
            "val_clean_accuracy": row.val_clean_accuracy,
            "val_robust_accuracy": row.val_robust_accuracy,
        }
        return card


def load_best(trainer: Trainer) -> dict[str, Any] | None:
    """Load the best checkpoint's weights back into the trainer's model; return its card."""
    if trainer.best_path is None or not tensor_path(trainer.best_path).exists():
        return None
    best, card = load_checkpoint(trainer.best_path, map_location=trainer.device)
    trainer.model.load_state_dict(best.state_dict(), strict=True)
    return card
