"""Model registry: ``@register_model`` factories, :func:`create` and :class:`ModelSpec`.

Factories follow the timm convention ``fn(num_classes, in_channels, **kwargs) -> nn.Module``.
:func:`create` validates the arguments, builds the model, installs the input normalisation in
``model.normalize`` and records how the model was made in ``model.spec`` so that checkpoints
can rebuild the same architecture.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.models.layers import Normalize, Stats, as_float_tuple
from advprune.registry import Registry, signature_options

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    fn: Factory
    input_size: tuple[int, int, int]


_REGISTRY: Registry[_Entry] = Registry("model")


def register_model(
    name: str, input_size: tuple[int, int, int] = (3, 32, 32)
) -> Callable[[Factory], Factory]:
    """Decorator registering ``fn(num_classes, in_channels, **kwargs)`` under ``name``.

    ``input_size`` is the model's natural ``(C, H, W)`` input. Registering a name twice raises
    :class:`ConfigError`.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(s, Integral) and s >= 1 for s in size):
        raise ConfigError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")

    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise ConfigError(f"model {name!r} is already registered")
        _REGISTRY.add(name, _Entry(fn, (int(size[0]), int(size[1]), int(size[2]))))
        return fn

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the fnmatch ``pattern``."""
    return _REGISTRY.names(pattern)


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise UnknownNameError("model", str(name), list_models())
    return _REGISTRY.get(name)


def model_options(name: str) -> type:
    """The typed options of model ``name``: its factory's keyword arguments (a pydantic
    model; the values are checked by :func:`create`)."""
    return signature_options(_entry(name).fn, "model")


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def default_input_size(name: str, in_channels: int | None = None) -> tuple[int, int, int]:
    """The natural ``(C, H, W)`` input of model ``name``; ``in_channels`` overrides ``C``."""
    c, h, w = _entry(name).input_size
    if in_channels is not None:
        c = _check_positive_int(in_channels, "in_channels")
    return (c, h, w)


def _channel_stats(value: Stats | None, default: float, name: str, channels: int) -> tuple:
    if value is None:
        return (default,) * channels
    values = as_float_tuple(value, name)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(
            f"{name} has {len(values)} values but the model has in_channels={channels}; "
            "give one value per channel or a single value"
        )
    return values


@dataclass(frozen=True)
class ModelSpec:
    """How a model was created; enough to rebuild the same architecture."""

    name: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` inverts it)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "kwargs": json.loads(json.dumps(self.kwargs)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict` output (e.g. read from a checkpoint)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a model spec must be a mapping, got {type(d).__name__}")
        known = {"name", "num_classes", "in_channels", "mean", "std", "kwargs"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model spec keys {unknown}; valid: {sorted(known)}")
        if "name" not in d:
            raise ConfigError("model spec has no 'name'")
        name = d["name"]
        _entry(name)
        in_channels = d.get("in_channels")
        if in_channels is None:
            in_channels = _entry(name).input_size[0]
        in_channels = _check_positive_int(in_channels, "in_channels")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"model spec 'kwargs' must be a mapping, got {kwargs!r}")
        return cls(
            name=name,
            num_classes=_check_positive_int(d.get("num_classes", 10), "num_classes"),
            in_channels=in_channels,
            mean=_channel_stats(d.get("mean"), 0.0, "mean", in_channels),
            std=_channel_stats(d.get("std"), 1.0, "std", in_channels),
            kwargs=dict(kwargs),
        )

    def to_create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`create` that rebuild this model."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "mean": self.mean,
            "std": self.std,
            **self.kwargs,
        }

    def build(self) -> nn.Module:
        """A freshly initialised model of this architecture."""
        return create(**self.to_create_kwargs())

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The model's natural ``(C, H, W)`` input (a model built with an ``image_size``
        keyword, such as ``cnn7`` for 8x8 digits, takes ``image_size`` x ``image_size``)."""
        c, h, w = default_input_size(self.name, self.in_channels)
        side = self.kwargs.get("image_size")
        return (c, int(side), int(side)) if side is not None else (c, h, w)


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name`` taking inputs in [0, 1].

    ``in_channels`` defaults to the model's registered input channels (3, or 1 for
    ``digits_cnn``). ``mean``/``std`` (one value, or one per channel; default identity) go into
    ``model.normalize``; other ``kwargs`` go to the factory. ``model.spec`` records the call.
    Every model also takes the variant arguments ``bn_affine`` and ``head``
    (:mod:`advprune.models.variants`), applied after the factory builds it.
    """
    entry = _entry(name)
    num_classes = _check_positive_int(num_classes, "num_classes")
    if in_channels is None:
        in_channels = entry.input_size[0]
    in_channels = _check_positive_int(in_channels, "in_channels")
    mean_t = _channel_stats(mean, 0.0, "mean", in_channels)
    std_t = _channel_stats(std, 1.0, "std", in_channels)
    if any(s <= 0 for s in std_t):
        raise ConfigError(f"std must be > 0 for every channel, got {list(std_t)}")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        raise ConfigError(
            f"options for model {name!r} must be JSON-able (numbers, strings, lists), got {kwargs}"
        ) from None
    from advprune.models.variants import VARIANT_KWARGS, apply_variant, check_variant

    variant = check_variant({k: kwargs[k] for k in VARIANT_KWARGS if k in kwargs})
    factory_kwargs = {k: v for k, v in kwargs.items() if k not in VARIANT_KWARGS}
    try:
        inspect.signature(entry.fn).bind(num_classes, in_channels, **factory_kwargs)
    except TypeError:
        params = [
            p.name
            for p in list(inspect.signature(entry.fn).parameters.values())[2:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ConfigError(
            f"unknown option(s) {sorted(kwargs)} for model {name!r}; "
            f"valid options: {', '.join([*params, *VARIANT_KWARGS])}"
        ) from None
    model = entry.fn(num_classes, in_channels, **factory_kwargs)
    apply_variant(model, name, num_classes, **variant)
    normalize = Normalize(mean_t, std_t)
    if isinstance(getattr(model, "normalize", None), Normalize):
        model.normalize = normalize  # replaces in place: stays first in module order
    elif not normalize.is_identity:
        raise ConfigError(f"model {name!r} has no 'normalize' layer, so mean/std cannot be set")
    model.spec = ModelSpec(
        name=name,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean_t,
        std=std_t,
        kwargs=dict(kwargs),
    )
    return model
