"""Pruning structures: what a method's masks remove, registered with typed options.

A structure is what ``--structure`` names. Three are plain mask granularities
(``unstructured``: single weights, ``filters``: output channels, ``channels``: input channels);
``nm`` is N:M semi-structured sparsity, written ``N:M`` (``2:4``: keep 2 of every 4
consecutive input weights, :mod:`advprune.sparsity.nm`), with the typed options ``n`` and ``m``.
An N:M structure uses weight-shaped (``unstructured``) masks whose pattern is fixed: every
pruned layer keeps exactly N of every M, so its density is N / M and a layer whose input
dimension is not a multiple of M cannot take it (:meth:`Structure.incompatible` says why).

>>> parse_structure("2:4").options.n, parse_structure("filters").granularity
(2, 'filters')

A new structure: ``register_structure(name, options=..., granularity=..., parse=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from advprune.errors import ConfigError, UnknownNameError
from advprune.registry import Options, Registry, parse_options
from advprune.sparsity.masks import GRANULARITIES

__all__ = [
    "STRUCTURES",
    "NMOptions",
    "Structure",
    "list_structures",
    "parse_structure",
    "register_structure",
]


class NMOptions(Options):
    """N:M: keep ``n`` of every ``m`` consecutive input weights (``1 <= n < m``)."""

    n: Annotated[int, Field(ge=1)] = 2
    m: Annotated[int, Field(ge=2)] = 4

    @model_validator(mode="after")
    def _n_below_m(self) -> NMOptions:
        if self.n >= self.m:
            raise ValueError(f"N:M sparsity needs 1 <= N < M, got {self.n}:{self.m}")
        return self


@dataclass(frozen=True)
class Structure:
    """A parsed structure: its registry ``name``, the mask ``granularity`` it uses and its
    typed ``options``; ``str()`` gives the canonical text (``"2:4"``, ``"filters"``)."""

    name: str
    granularity: str
    options: Options

    def __str__(self) -> str:
        if self.name == "nm":
            return f"{self.options.n}:{self.options.m}"  # type: ignore[attr-defined]
        return self.name

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M structure, else None."""
        if self.name != "nm":
            return None
        return self.options.n, self.options.m  # type: ignore[attr-defined]

    @property
    def density(self) -> float | None:
        """The density every pruned layer has when the structure fixes it (N:M: N / M)."""
        nm = self.nm
        return None if nm is None else nm[0] / nm[1]

    def incompatible(self, weight_shape: torch.Size | tuple[int, ...]) -> str | None:
        """Why a weight of ``weight_shape`` cannot take this structure (None: it can)."""
        nm = self.nm
        if nm is None:
            return None
        if len(weight_shape) < 2 or weight_shape[1] % nm[1]:
            inputs = weight_shape[1] if len(weight_shape) > 1 else "none"
            return (
                f"its input dimension ({inputs}) is not a multiple of {nm[1]}: {self} groups "
                f"run along the inputs; left dense"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record."""
        return {"name": self.name, "text": str(self), "options": self.options.model_dump()}


Parser = Callable[[str], dict[str, Any] | None]
STRUCTURES: Registry[type[Options]] = Registry("structure")


def register_structure(
    name: str,
    options: type[Options] = Options,
    *,
    granularity: str | None = None,
    parse: Parser | None = None,
) -> type[Options]:
    """Register structure ``name`` with its typed ``options`` and the mask ``granularity`` it
    uses (default: ``name`` itself); ``parse(text)`` returns the options a text form means
    (``"2:4"`` -> ``{"n": 2, "m": 4}``), or None when the text is not this structure's."""
    granularity = granularity or name
    if granularity not in GRANULARITIES:
        raise ValueError(f"structure {name!r}: unknown granularity {granularity!r}")
    return STRUCTURES.add(name, options, granularity=granularity, parse=parse)


def list_structures() -> list[str]:
    """Registered structure names (``channels``, ``filters``, ``nm``, ``unstructured``)."""
    return STRUCTURES.names()


_NM_TEXT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _parse_nm(text: str) -> dict[str, Any] | None:
    match = _NM_TEXT.match(text)
    return None if match is None else {"n": int(match.group(1)), "m": int(match.group(2))}


for _name in GRANULARITIES:
    register_structure(_name)
register_structure("nm", NMOptions, granularity="unstructured", parse=_parse_nm)


def parse_structure(text: str | Structure, **options: Any) -> Structure:
    """The :class:`Structure` a text names: a registered name (``filters``; ``options`` for
    its typed options) or a registered text form (``2:4``). Bad input: one line."""
    if isinstance(text, Structure):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"a structure is text such as 'filters' or '2:4', got {text!r}")
    name, values = text.strip(), dict(options)
    if name not in STRUCTURES:
        for candidate in STRUCTURES:
            parser = STRUCTURES.info(candidate).get("parse")
            parsed = parser(name) if parser is not None else None
            if parsed is not None:
                name, values = candidate, {**parsed, **values}
                break
        else:
            if ":" in name:
                raise ConfigError(f"an N:M structure looks like '2:4', got {text!r}")
            raise UnknownNameError("structure", text, [*list_structures(), "N:M (e.g. 2:4)"])
    opts = parse_options(STRUCTURES.get(name), values, f"structure {text.strip()!r}")
    return Structure(name, STRUCTURES.info(name)["granularity"], opts)
