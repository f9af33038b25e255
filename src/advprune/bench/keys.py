"""Model keys of the Adversarial Pruning Benchmark: ``{method}_{arch}_{dataset}_{US|S}_{sparsity}``.

A key names one pruned model, e.g. ``HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90``:

- ``method``: the method's AP key, ``Name_CitationKey`` (``HYDRA_Sehwag2020Hydra``), or a single
  word (``hydra``); letters (any script), digits and ``-``, at most one ``_``;
- ``arch``: an architecture code (``R18`` = ResNet-18, ``V16`` = VGG-16, see :data:`ARCH_CODES`);
- ``dataset``: ``CIFAR10``, ``CIFAR100``, ``SVHN`` or ``DIGITS``;
- ``US`` (unstructured: weights) or ``S`` (structured: filters or channels);
- ``sparsity``: the *removed* fraction in percent, ``90`` or ``99.5``.

Keys are parsed from the right, so the method may hold one underscore and every other part none.
Every part is validated with a one-line :class:`~advprune.errors.ConfigError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from advprune.errors import ConfigError

__all__ = [
    "ARCH_CODES",
    "DATASET_CODES",
    "STRUCTURE_CODES",
    "ModelKey",
    "arch_code",
    "dataset_code",
    "make_key",
    "parse_key",
    "sparsity_code",
    "structure_code",
]

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


def structure_code(structure: str) -> str:
    """``US`` or ``S`` from a code or a granularity (``unstructured``, ``weights``, ``filters``)."""
    text = str(structure).strip()
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
        if sparsity_code(self.sparsity) != self.sparsity:
            raise ConfigError(
                f"sparsity {self.sparsity!r} in model key must be written "
                f"{sparsity_code(self.sparsity)!r}"
            )

    def __str__(self) -> str:
        return "_".join((self.method, self.arch, self.dataset, self.structure, self.sparsity))

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
    ``"HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90"``.
    """
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
