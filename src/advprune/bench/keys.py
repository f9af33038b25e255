"""Model keys of the Adversarial Pruning Benchmark: ``{method}_{arch}_{dataset}_{US|S}_{sparsity}``.

A key names one pruned model, e.g. ``HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90``:

- ``method``: the method's AP key, ``Name_CitationKey`` (``HYDRA_Sehwag2020Hydra``), or a single
  word (``hydra``); letters (any script), digits and ``-``, at most one ``_``;
- ``arch``: an architecture code (``R18`` = ResNet-18, ``V16`` = VGG-16, see :data:`ARCH_CODES`);
- ``dataset``: ``CIFAR10``, ``CIFAR100``, ``SVHN`` or ``DIGITS``;
- ``US`` (unstructured: weights) or ``S`` (structured: filters or channels);
- ``sparsity``: the *removed* fraction in percent, ``90`` or ``99.5``.

The dense model every method starts from is the *baseline* of its (architecture, dataset):
``Dense_{arch}_{dataset}_US_0`` (:func:`dense_key`); ``Dense`` and sparsity ``0`` go together
and name nothing else. Leaderboards show baselines marked, never ranked among the methods.

Keys are parsed from the right, so the method may hold one underscore and every other part none.
Every part is validated with a one-line :class:`~advprune.errors.ConfigError`.
:func:`derive_key` builds a key from what a checkpoint card records (:func:`card_key_parts`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from advprune.errors import AdvpruneError, ConfigError

__all__ = [
    "ARCH_CODES",
    "DATASET_CODES",
    "DENSE",
    "KEY_PARTS",
    "STRUCTURE_CODES",
    "ModelKey",
    "arch_code",
    "card_key_parts",
    "dataset_code",
    "dense_key",
    "derive_key",
    "make_key",
    "parse_key",
    "sparsity_code",
    "structure_code",
]

DENSE = "Dense"  # the method part of a dense baseline's key (with structure US, sparsity 0)
KEY_PARTS = ("method", "arch", "dataset", "structure", "sparsity")

# key code -> advprune model registry name (R18 / V16 are the benchmark's own codes)
ARCH_CODES: dict[str, str] = {
    "R18": "resnet18",
    "R34": "resnet34",
    "R50": "resnet50",
    "V16": "vgg16",
    "V16BN": "vgg16_bn",
    "WRN28-4": "wrn28_4",
    "WRN28-10": "wrn28_10",
    "CNN7": "cnn7",
    "DCNN": "digits_cnn",
}
# key code -> advprune dataset name
DATASET_CODES: dict[str, str] = {
    "CIFAR10": "cifar10",
    "CIFAR100": "cifar100",
    "SVHN": "svhn",
    "DIGITS": "digits",
}
# key code -> advprune granularities it covers
STRUCTURE_CODES: dict[str, tuple[str, ...]] = {
    "US": ("unstructured",),
    "S": ("filters", "channels"),
}
_STRUCTURE_ALIASES = {
    "us": "US",
    "unstructured": "US",
    "weight": "US",
    "weights": "US",
    "s": "S",
    "structured": "S",
    "filter": "S",
    "filters": "S",
    "channel": "S",
    "channels": "S",
}
_SEGMENT = r"[^\W_](?:[^\W_]|-)*"  # letters of any script, digits, inner hyphens; no "_"
_METHOD_RE = re.compile(rf"{_SEGMENT}(?:_{_SEGMENT})?")


def _one_of(kind: str, value: str, valid: object) -> ConfigError:
    return ConfigError(f"unknown {kind} {value!r} in model key; valid: {', '.join(valid)}")


def arch_code(arch: str) -> str:
    """The key code of an architecture given as a code (``R18``) or a model name (``resnet18``)."""
    text = str(arch).strip()
    for code, name in ARCH_CODES.items():
        if text.upper() == code or text.lower() == name:
            return code
    raise _one_of("architecture", text, [*ARCH_CODES, *ARCH_CODES.values()])


def dataset_code(dataset: str) -> str:
    """The key code of a dataset given as a code (``CIFAR10``) or a dataset name (``cifar10``)."""
    text = str(dataset).strip()
    for code, name in DATASET_CODES.items():
        if text.upper() == code or text.lower() == name:
            return code
    raise _one_of("dataset", text, DATASET_CODES)


_NM_STRUCTURE = re.compile(r"^\d+\s*:\s*\d+$")


def structure_code(structure: str) -> str:
    """``US`` or ``S`` from a code or a granularity (``unstructured``, ``weights``, ``filters``);
    N:M semi-structured sparsity (``2:4``: single weights within groups) is ``US``."""
    text = str(structure).strip()
    if _NM_STRUCTURE.match(text):
        return "US"
    code = _STRUCTURE_ALIASES.get(text.lower())
    if code is None:
        names = sorted(set(_STRUCTURE_ALIASES) - {"us", "s"})
        raise _one_of("structure", text, ["US", "S", *names])
    return code


def sparsity_code(sparsity: str | float) -> str:
    """Percent text of a sparsity: ``0.9`` -> ``"90"``, ``"99.5"`` -> ``"99.5"``.

    A float below 1 is a fraction (0.9), text or a number of 1 or more is percent ("90", 90).
    The result lies in (0, 100) and has no trailing zeros.
    """
    if isinstance(sparsity, bool):
        raise ConfigError(f"sparsity must be a number, got {sparsity!r}")
    try:
        if isinstance(sparsity, float) and sparsity < 1:
            percent = Decimal(repr(sparsity)) * 100
        else:
            percent = Decimal(str(sparsity).strip())
    except InvalidOperation:
        raise ConfigError(f"sparsity {sparsity!r} in model key is not a number") from None
    if not percent.is_finite() or not 0 < percent < 100:
        raise ConfigError(
            f"sparsity {sparsity!r} in model key must be a percent in (0, 100), e.g. 90 or 99.5"
        )
    text = format(percent.normalize(), "f")
    return text


@dataclass(frozen=True)
class ModelKey:
    """A parsed model key; ``str(key)`` gives the text back (see the module docstring)."""

    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: str

    def __post_init__(self) -> None:
        if not _METHOD_RE.fullmatch(self.method):
            raise ConfigError(
                f"method {self.method!r} in model key must be Name or Name_CitationKey "
                "(letters, digits and '-', at most one '_'), e.g. HYDRA_Sehwag2020Hydra"
            )
        if self.arch not in ARCH_CODES:
            raise _one_of("architecture", self.arch, ARCH_CODES)
        if self.dataset not in DATASET_CODES:
            raise _one_of("dataset", self.dataset, DATASET_CODES)
        if self.structure not in STRUCTURE_CODES:
            raise _one_of("structure", self.structure, STRUCTURE_CODES)
        if self.method.lower() == DENSE.lower() or self.sparsity == "0":
            if (self.method, self.structure, self.sparsity) != (DENSE, "US", "0"):
                raise ConfigError(
                    f"{self}: a dense baseline's key is {dense_key(self.arch, self.dataset)} "
                    f"(method {DENSE}, US, sparsity 0; a pruned model's sparsity is above 0)"
                )
            return
        if sparsity_code(self.sparsity) != self.sparsity:
            raise ConfigError(
                f"sparsity {self.sparsity!r} in model key must be written "
                f"{sparsity_code(self.sparsity)!r}"
            )

    def __str__(self) -> str:
        return "_".join((self.method, self.arch, self.dataset, self.structure, self.sparsity))

    @property
    def is_dense(self) -> bool:
        """Whether this is the dense baseline of its (architecture, dataset)."""
        return self.method == DENSE

    @property
    def architecture(self) -> str:
        """The advprune model name (``resnet18``)."""
        return ARCH_CODES[self.arch]

    @property
    def dataset_name(self) -> str:
        """The advprune dataset name (``cifar10``)."""
        return DATASET_CODES[self.dataset]

    @property
    def sparsity_value(self) -> float:
        """The removed fraction (``0.9``)."""
        return float(Decimal(self.sparsity) / 100)

    @property
    def granularities(self) -> tuple[str, ...]:
        """The advprune granularities this structure code covers."""
        return STRUCTURE_CODES[self.structure]


def make_key(method: str, arch: str, dataset: str, structure: str, sparsity: str | float) -> str:
    """The model key text; each part may be a code or an advprune name (see the module doc).

    ``make_key("HYDRA_Sehwag2020Hydra", "resnet18", "cifar10", "weights", 0.9)`` is
    ``"HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90"``. Method ``Dense`` with sparsity 0 is the
    dense baseline (:func:`dense_key`).
    """
    if str(method).strip().lower() == DENSE.lower() and _is_zero(sparsity):
        return str(ModelKey(DENSE, arch_code(arch), dataset_code(dataset), "US", "0"))
    return str(
        ModelKey(
            method=str(method).strip(),
            arch=arch_code(arch),
            dataset=dataset_code(dataset),
            structure=structure_code(structure),
            sparsity=sparsity_code(sparsity),
        )
    )


def parse_key(text: str) -> ModelKey:
    """Parse a model key; a malformed one is a one-line :class:`ConfigError` naming the part."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"model key must be non-empty text, got {text!r}")
    parts = text.strip().rsplit("_", 4)
    if len(parts) != 5:
        raise ConfigError(
            f"model key {text!r} must be method_arch_dataset_US|S_sparsity, "
            "e.g. HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90"
        )
    method, arch, dataset, structure, sparsity = parts
    return ModelKey(method, arch, dataset, structure, sparsity)


def _is_zero(sparsity: str | float) -> bool:
    try:
        return not isinstance(sparsity, bool) and Decimal(str(sparsity).strip()) == 0
    except InvalidOperation:
        return False


def dense_key(arch: str, dataset: str) -> str:
    """The key of the dense baseline of (``arch``, ``dataset``): ``Dense_R18_CIFAR10_US_0``."""
    return str(ModelKey(DENSE, arch_code(arch), dataset_code(dataset), "US", "0"))


def card_key_parts(card: Mapping[str, Any], measured: float | None = None) -> dict[str, Any]:
    """What a checkpoint card tells about its model key: ``method`` (the method's AP key, or
    ``Dense`` for a model no method pruned whose ``measured`` sparsity, default the card's, is
    0), ``arch`` and ``dataset`` (advprune names), ``structure`` (the granularity) and
    ``sparsity`` (the method's target, removed fraction; 0 for a dense model). A part the card
    does not tell is None."""
    method = card.get("method") if isinstance(card.get("method"), Mapping) else None
    if measured is None and isinstance(card.get("sparsity"), Mapping):
        measured = card["sparsity"].get("measured")
    parts: dict[str, Any] = {name: None for name in KEY_PARTS}
    arch = card.get("architecture")
    parts["arch"] = arch.get("name") if isinstance(arch, Mapping) else None
    data = card.get("dataset")
    parts["dataset"] = data.get("name") if isinstance(data, Mapping) else data
    if method is None:
        if measured == 0:  # never pruned: the dense model the methods start from
            parts.update(method=DENSE, structure="US", sparsity=0)
        return parts
    ap_key = (method.get("taxonomy") or {}).get("ap_key")
    if not ap_key and method.get("name"):
        ap_key = _ap_key(str(method["name"]))
    parts.update(method=ap_key, structure=method.get("structure"), sparsity=method.get("sparsity"))
    return parts


def _ap_key(method: str) -> str:
    """The AP key of an advprune method name (``hydra``); any other text unchanged."""
    if "_" in method or method.lower() == DENSE.lower():
        return method
    try:
        from advprune.methods import method_class  # a lower layer: no cycle with bench.taxonomy

        return method_class(method.lower()).taxonomy.ap_key
    except AdvpruneError:
        return method


def derive_key(
    parts: Mapping[str, Any], given: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, str]]:
    """The model key from ``parts`` (e.g. :func:`card_key_parts`) with the parts the user
    ``given`` taking precedence; returns the key and where each part came from (``"card"`` or
    ``"given"``). A part neither tells is a one-line :class:`ConfigError` naming the flags."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(given) - set(KEY_PARTS)
    if unknown:
        raise ConfigError(f"unknown key parts {sorted(unknown)}; valid: {', '.join(KEY_PARTS)}")
    if "method" in given:  # an advprune method name stands for its AP key
        given["method"] = _ap_key(str(given["method"]).strip())
    merged = {name: given.get(name, parts.get(name)) for name in KEY_PARTS}
    source = {name: "given" if name in given else "card" for name in KEY_PARTS}
    dense = str(merged["method"]).lower() == DENSE.lower()
    if dense:  # the baseline's structure and sparsity are fixed (a given other is refused)
        merged["structure"] = given.get("structure", "US")
        merged["sparsity"] = given.get("sparsity", 0)
    elif merged["sparsity"] is not None and _is_zero(merged["sparsity"]):
        raise ConfigError(
            f"the model is not pruned (sparsity 0), so it is the dense baseline; leave out "
            f"--method {merged['method']} (its key: Dense_..._US_0), or give --sparsity"
        )
    missing = [name for name in KEY_PARTS if merged[name] is None]
    if missing:
        flags = " ".join(f"--{name} {name.upper()}" for name in missing)
        raise ConfigError(
            f"the checkpoint card does not tell the key's {', '.join(missing)}; give {flags} "
            "(or --key KEY)"
        )
    key = make_key(*(merged[name] for name in KEY_PARTS))
    return key, source
