"""Run configuration: YAML files with explicit command-line overrides.

Precedence is ``defaults < YAML file < command-line flags the user actually gave``. Values the
user set are never changed: a value that cannot be used is an error, not a silent fix. Keys not
known to :class:`RunConfig` are errors (typos do not pass silently). eps and step sizes accept
exact fractions such as ``8/255``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from advprune._validation import check_eps, check_norm, check_sparsity, parse_number
from advprune.errors import ConfigError, UnknownNameError
from advprune.progress import check_mode
from advprune.training.trainer import TrainConfig

# Default attack radius per dataset (L∞, input units). Digits are 8x8 images whose pixels take
# the 17 values k/16: eps = 3/16 allows a change of three grey levels per pixel, small next to
# the strokes (value 1), and enough to bring an undefended CNN below chance (README, eps 3/16).
DEFAULT_EPS = {"digits": "3/16", "cifar10": "8/255", "cifar100": "8/255", "svhn": "8/255"}
FALLBACK_EPS = "8/255"


def _train_settings() -> type[BaseModel]:
    """A pydantic model of :class:`~advprune.training.TrainConfig`'s fields (all but the
    ones a run sets itself: ``seed``, ``select_by``): the one definition of the optimisation
    settings, from which RunConfig's YAML keys and the CLI's flags come."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(TrainConfig)
        if not f.metadata.get("run")
    }
    return create_model("TrainSettings", **fields)


TrainSettings = _train_settings()
TRAIN_FIELDS: tuple[str, ...] = tuple(TrainSettings.model_fields)


class RunConfig(TrainSettings):
    """Every setting of a train / prune / finetune / eval run.

    eps-like fields keep the user's text (``"8/255"``) for the record; use :meth:`eps_value`
    and :meth:`step_size_value` for the numbers.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    batch_size: int = 128  # the global batch: split evenly over the processes under torchrun
    augment: bool | None = None  # None: random crop + flip for 32x32 and larger, off for digits
    workers: int | None = None  # DataLoader workers per process for image folders; None: auto
    # model
    model: str = "digits_cnn"
    checkpoint: str | None = None
    # objective and its attack
    objective: str = "pgd"
    eps: str | None = None  # None: the dataset's default (DEFAULT_EPS)
    norm: str = "linf"
    step_size: str | None = None  # None: 2.5 * eps / steps
    attack_steps: int = 10
    beta: float = 6.0
    attack_mode: str = "eval"
    # certified objectives (smooth, ibp, crown-ibp, mixtrain; advprune.training.certified)
    sigma: float | None = None  # Gaussian noise std of smooth / smoothing; None: 0.25
    noise_samples: int | None = None  # noisy copies per input (smooth); None: the variant's
    smooth_variant: str = "gaussian"  # gaussian, stability, consistency, adversarial
    kappa_start: float | None = None  # natural-loss weight before / after the eps ramp-up;
    kappa_end: float | None = None  # None: the objective's (ibp 1 -> 0.5, crown-ibp 1 -> 0)
    ramp_start: float = 0.0  # eps ramp-up start and length, fractions of the stage
    ramp_length: float | None = None  # None: the objective's (ibp / crown-ibp 0.5)
    bound: str = "crown-ibp"  # mixtrain's verifiable bound: ibp, crown-ibp, crown
    ver_subset: int | None = None  # mixtrain: points bounded per batch; None: 5
    objective_options: dict[str, Any] = Field(
        default_factory=dict
    )  # the objective's other options, e.g. {eta: 0.5}
    # optimisation: epochs, optimizer, lr, momentum, weight_decay, nesterov, betas, schedule,
    # milestones, gamma, cycle_peak, warmup_epochs, precision, amp, grad_clip, sync_bn,
    # channels_last, compile come from TrainConfig (TrainSettings)
    seed: int = 0
    # pruning
    method: str = "lwm"
    sparsity: float = 0.9
    structure: str = "unstructured"
    scope: str = "local"
    allocation: str | None = None  # layer allocation; None: the method's default
    allocation_p: float | None = None  # p of the n^p allocation rule
    keep_first: bool = False
    keep_last: bool = False
    method_options: dict[str, Any] = Field(
        default_factory=dict
    )  # the method's own options, e.g. {freeze_bn: true}
    # evaluation
    eval_steps: int = 20
    n: int | None = None
    # run
    out: str = "runs/advprune"
    device: str = "auto"
    # auto / bar / lines / off; None (also YAML true): $ADVPRUNE_PROGRESS, else auto; false: off
    progress: str | None = None

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _fraction_text(cls, value: Any) -> Any:
        if value is None:
            return None
        parse_number(value)  # raises ConfigError on garbage
        return str(value).strip()

    @field_validator("progress", mode="before")
    @classmethod
    def _progress(cls, value: Any) -> str | None:
        return check_mode(value)

    @field_validator("norm")
    @classmethod
    def _norm(cls, value: str) -> str:
        return check_norm(value)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, value: Any) -> float:
        return check_sparsity(value)

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"val_fraction={value} must be in [0, 1)")
        return value

    @field_validator("batch_size", "attack_steps", "eval_steps")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ConfigError(f"must be >= 1, got {value}")
        return value

    @field_validator("epochs", "seed")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ConfigError(f"must be >= 0, got {value}")
        return value

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < float("inf"):
            raise ConfigError(f"sigma must be > 0 (the std of the Gaussian noise), got {value}")
        return value

    @field_validator("kappa_start", "kappa_end", "ramp_start", "ramp_length")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {value}")
        return value

    @field_validator("noise_samples", "ver_subset")
    @classmethod
    def _optional_count(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ConfigError(f"must be >= 1, got {value}")
        return value

    @field_validator("smooth_variant")
    @classmethod
    def _smooth_variant(cls, value: str) -> str:
        variants = ("gaussian", "stability", "consistency", "adversarial")
        if value not in variants:
            raise UnknownNameError("smoothing variant", value, variants)
        return value

    @field_validator("bound")
    @classmethod
    def _bound(cls, value: str) -> str:
        methods = ("ibp", "crown-ibp", "crown")
        if value not in methods:
            raise UnknownNameError("bound method", value, methods)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ConfigError(f"workers must be >= 0, got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ConfigError(f"n must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check_eps(self) -> RunConfig:
        check_eps(self.eps_text(), self.norm)
        if self.ramp_start + (self.ramp_length or 0.0) > 1.0 + 1e-9:
            raise ConfigError(
                f"ramp_start + ramp_length = {self.ramp_start + (self.ramp_length or 0):g} > 1: "
                "the eps ramp-up must end within the stage"
            )
        if self.step_size is not None:
            # same rule as eps: an L-inf step above 1 is a pixel value meant as k/255
            step = check_eps(self.step_size, self.norm, "step_size")
            if step <= 0:
                raise ConfigError(f"step_size must be > 0, got {self.step_size}")
        return self

    @model_validator(mode="after")
    def _check_training(self) -> RunConfig:
        self.train_config()  # TrainConfig's own checks (schedule, warm-up, milestones, ...)
        return self

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`~advprune.training.TrainConfig` of these settings (``overrides``:
        ``select_by``, ...)."""
        values = {name: getattr(self, name) for name in TRAIN_FIELDS}
        return TrainConfig(**values, seed=self.seed, **overrides)

    def eps_text(self) -> str:
        """eps as written (or the dataset default), e.g. ``"8/255"``."""
        return self.eps if self.eps is not None else DEFAULT_EPS.get(self.dataset, FALLBACK_EPS)

    def eps_value(self) -> float:
        """eps as a number in input units."""
        return check_eps(self.eps_text(), self.norm)

    def step_size_value(self, steps: int | None = None) -> float:
        """Attack step: as set, or ``2.5 * eps / steps`` (Madry et al.)."""
        if self.step_size is not None:
            return parse_number(self.step_size, "step_size")
        return 2.5 * self.eps_value() / (steps or self.attack_steps)


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            close = difflib.get_close_matches(where.replace("-", "_"), RunConfig.model_fields, 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown key; {hint}valid keys: {', '.join(RunConfig.model_fields)}"
        # model-level checks (eps, step_size) already name the setting in their message
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (fractions such as ``8/255`` stay strings)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file; pass a YAML file such as run.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path} ({exc})") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    if "methods" in data and "sparsities" in data:
        raise ConfigError(f"{path} is a benchmark grid; run it with `advprune bench run {path}`")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            f"{path}: key {bad[0]!r} is not a setting name; valid keys: "
            + ", ".join(RunConfig.model_fields)
        )
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """``base`` (command defaults) < YAML file at ``path`` < explicit ``overrides``.

    ``overrides`` should hold only values the user gave (``None`` entries are dropped).
    """
    values: dict[str, Any] = dict(base or {})
    if path is not None:
        values.update(read_yaml(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(source + _format_validation_error(exc)) from None
