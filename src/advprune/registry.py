"""One registry style for every kind of plug-in, and typed plug-in options.

Models, datasets, mask kinds, allocations, objectives, methods and evaluation attacks each live
in one :class:`Registry` and are reached timm-style through their package's ``register_*`` /
``list_*`` / ``create_*`` functions. A plug-in may declare its options as an :class:`Options`
subclass (a pydantic model): :func:`parse_options` validates user values against it (unknown
keys, types, ranges: one line each), and the YAML keys and the CLI's ``--option KEY=VALUE``
checks come from the same model.

Plug-ins outside advprune are imported by :func:`load_plugins` from ``$ADVPRUNE_PLUGINS``
(comma-separated module names; each registers its plug-ins when imported), so a method or
attack defined in a user's module works in ``advprune prune`` or ``advprune bench run``
subprocesses without an entry point.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from advprune.errors import ConfigError, UnknownNameError

__all__ = [
    "PLUGINS_ENV",
    "Options",
    "Registry",
    "describe_field",
    "load_plugins",
    "options_help",
    "parse_options",
    "signature_options",
]

T = TypeVar("T")
PLUGINS_ENV = "ADVPRUNE_PLUGINS"


class Registry(Generic[T]):
    """Named plug-ins of one ``kind`` (``"method"``, ``"attack"``, ...), in registration order.

    ``registry[name]`` is the plug-in (a class or a factory); :meth:`info` holds what was
    registered with it (e.g. a model's default input size). Unknown names raise
    :class:`~advprune.errors.UnknownNameError` listing the valid ones. ``entries`` lets a
    registry be a view over an existing dict.
    """

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {} if entries is None else entries
        self._info: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ mapping interface
    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def pop(self, name: str, default: Any = None) -> Any:
        """Remove ``name`` (tests and plug-in reloads); return what was registered."""
        self._info.pop(name, None)
        return self._entries.pop(name, default)

    # ------------------------------------------------------------------ registry interface
    def add(self, name: str, obj: T, *, replace: bool = False, **info: Any) -> T:
        """Register ``obj`` under ``name``; a second, different object is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        previous = self._entries.get(name)
        if previous is not None and previous is not obj and not replace:
            what = getattr(previous, "__name__", type(previous).__name__)
            raise ConfigError(f"{self.kind} {name!r} is already registered to {what}")
        self._entries[name] = obj
        self._info[name] = dict(info)
        return obj

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            return self.add(name, obj, **info)

        return decorator

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``."""
        if name not in self._entries:
            raise UnknownNameError(self.kind, str(name), list(self._entries))
        return self._entries[name]

    def info(self, name: str) -> dict[str, Any]:
        """What was registered with ``name`` besides the plug-in."""
        self.get(name)
        return self._info.get(name, {})

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching an fnmatch ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))


# ---------------------------------------------------------------------------- typed options


class Options(BaseModel):
    """Base of a plug-in's typed options: unknown keys are errors, values are not coerced
    (``"yes"`` is not a bool, ``2.5`` not an int), defaults are the plug-in's."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: shown in messages, e.g. ``"method 'hydra'"``; set by :func:`parse_options`
    owner: ClassVar[str] = ""


def _bounds(metadata: list[Any]) -> str:
    parts = []
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{op} {value:g}" if isinstance(value, float) else f"{op} {value}")
    return " and ".join(parts)


def describe_field(annotation: Any, metadata: list[Any] | None = None) -> str:
    """What a value of ``annotation`` must be, in words (``"one of a, b"``, ``"an integer
    >= 1"``, ``"true or false"``, ``"a number > 0"``)."""
    bounds = _bounds(metadata or [])
    suffix = f" {bounds}" if bounds else ""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " or ".join(describe_field(a, metadata) for a in args)
        return f"{inner} (or null)" if len(args) < len(typing.get_args(annotation)) else inner
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + suffix
    if annotation is float:
        return "a number" + suffix
    if annotation is str:
        return "text"
    return getattr(annotation, "__name__", str(annotation)) + suffix


def parse_options(options_cls: type[Options], values: Mapping[str, Any], owner: str) -> Options:
    """Validate ``values`` against ``options_cls``; one :class:`ConfigError` line on bad input:
    ``unknown option(s) x for method 'lwm'; valid options: ...`` or ``method 'hydra' option
    freeze_bn must be true or false, got 'yes'``."""
    fields = options_cls.model_fields
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ConfigError(
            f"unknown option(s) {', '.join(map(str, unknown))} for {owner}; valid options: {valid}"
        )
    try:
        return options_cls(**dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err.get("loc") else ""
        if key in fields:
            field = fields[key]
            want = describe_field(field.annotation, field.metadata)
            raise ConfigError(
                f"{owner} option {key} must be {want}, got {values.get(key)!r}"
            ) from None
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigError(f"{owner} options: {msg}") from None


class SignatureOptions(BaseModel):
    """Options read from a plug-in's signature: the key names are checked here, the values by
    the plug-in itself (which parses ``"8/255"`` and friends)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


_SIGNATURES: dict[Any, type[BaseModel]] = {}


def signature_options(obj: Any, kind: str = "plug-in") -> type[BaseModel]:
    """A pydantic model of the keyword arguments of ``obj`` (a class: its ``__init__``; a
    function: itself), defaults included; ``*args`` / ``**kwargs`` are left out."""
    key = obj
    if key in _SIGNATURES:
        return _SIGNATURES[key]
    func = obj.__init__ if isinstance(obj, type) else obj
    fields: dict[str, Any] = {}
    for p in inspect.signature(func).parameters.values():
        if p.name == "self" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        fields[p.name] = (Any, ... if p.default is p.empty else p.default)
    name = f"{getattr(obj, '__name__', kind)}Options"
    model = create_model(name, __base__=SignatureOptions, **fields)
    _SIGNATURES[key] = model
    return model


def options_help(options_cls: type[Options]) -> str:
    """``key (default; what it must be)`` for every option, comma-separated."""
    parts = []
    for key, field in options_cls.model_fields.items():
        want = describe_field(field.annotation, field.metadata)
        parts.append(f"{key}={field.default!r} ({want})")
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------- user plug-ins

_LOADED: set[str] = set()


def load_plugins(modules: str | None = None) -> list[str]:
    """Import the plug-in modules named in ``modules`` (default ``$ADVPRUNE_PLUGINS``),
    comma-separated, once each; return their names.

    Each item is ``package.module`` (its plug-ins register when it is imported) or
    ``package.module:function`` (the function, called without arguments, registers them).
    A module that cannot be imported, or a missing function, is a one-line
    :class:`ConfigError`.
    """
    text = os.environ.get(PLUGINS_ENV, "") if modules is None else modules
    names = [m.strip() for m in text.split(",") if m.strip()]
    for item in names:
        if item in _LOADED:
            continue
        name, _, func = item.partition(":")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import plug-in module {name!r} from ${PLUGINS_ENV} ({exc}); "
                "check the name and that its folder is on PYTHONPATH"
            ) from None
        if func:
            register = getattr(module, func, None)
            if not callable(register):
                raise ConfigError(f"plug-in module {name!r} has no function {func!r}")
            register()
        _LOADED.add(item)
    return names
