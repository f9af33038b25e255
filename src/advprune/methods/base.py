"""Pruning methods as plug-ins.

A method declares its place in the Adversarial Pruning Benchmark's taxonomy, its stages, and
for each stage which parameter kinds train (``weights``, ``scores``, ``rates``, ``bn``); it
implements :meth:`Method.prune`, which attaches masks to the chosen layers. Training itself is
always the one :class:`advprune.training.Trainer`; a method never forks the loop.

Register a method with ``@register_method`` and build one with ``create_method(name, ...)``.

How the workflow runs a method's ``prune`` stage (``advprune prune``, :func:`advprune.prune`):

1. ``model = method.prepare(model)`` (e.g. binary weights for a random-network method);
2. for ``r`` in ``range(method.rounds)``: ``method.prune_round(model, r)`` attaches or updates
   the masks; if ``method.trainable("prune")`` names parameter kinds, the model then trains
   with them (scores for HYDRA, weights between rounds for iterative LWM) with the
   objective of the run and ``method.regularizer("prune")`` added to the loss;
3. ``method.finish(model, targets)`` settles the masks and gives the densities to record;
4. later stages (``finetune``) train ``method.trainable(stage)`` with masks fixed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import create_model
from torch import nn

from advprune._validation import check_sparsity
from advprune.errors import ConfigError
from advprune.methods.taxonomy import Taxonomy
from advprune.registry import Options, Registry, parse_options
from advprune.sparsity import SCOPES, list_structures, parse_structure
from advprune.sparsity.allocation import allocate, check_allocation, check_allocation_params
from advprune.training.trainer import Regularizer


class Method(ABC):
    """Base class of pruning methods.

    Subclasses set ``name``, ``taxonomy`` (the benchmark's classification of the method),
    ``structures`` and ``scopes`` (the structures, see :mod:`advprune.sparsity.structures`, and
    scopes this implementation accepts; ``nm`` means any ``N:M`` such as ``2:4``),
    ``stages`` (ordered; ``"prune"`` is where :meth:`prune` runs) and ``trains`` (stage ->
    parameter kinds trained in that stage; a stage absent from ``trains`` has no training),
    and implement :meth:`prune`.

    Every method takes ``allocation`` (how the target sparsity is split over layers, see
    :mod:`advprune.sparsity.allocation`; default ``default_allocation``) and its
    ``allocation_params`` (``{"p": 0.1}`` for ``np``); :meth:`target_densities` applies it.
    """

    name: ClassVar[str]
    taxonomy: ClassVar[Taxonomy]
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)  # structures implemented
    scopes: ClassVar[tuple[str, ...]] = ("local",)  # scopes implemented
    stages: ClassVar[tuple[str, ...]]
    trains: ClassVar[Mapping[str, tuple[str, ...]]]
    Options: ClassVar[type[Options]] = Options  # the method's typed options (pydantic)
    options: ClassVar[Mapping[str, Any]] = {}  # their defaults (set by register_method)
    default_allocation: ClassVar[str] = "uniform"  # layer allocation when none is given
    rounds: int = 1  # prune stage rounds (iterative methods override, e.g. from an option)

    def __init__(
        self,
        sparsity: float | str,
        structure: str = "unstructured",
        scope: str = "local",
        *,
        keep_first: bool = False,
        keep_last: bool = False,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        allocation: str | None = None,
        allocation_params: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        # layer allocation (advprune.sparsity.allocation); scope="global" means allocation
        # "global", and allocation "global" means scope "global" where the method has it
        if allocation is None:
            allocation = "global" if scope == "global" else self.default_allocation
        check_allocation(allocation)
        if scope == "global" and allocation != "global":
            raise ConfigError(
                f"scope 'global' is allocation 'global', not {allocation!r}; "
                "give one of them (scope local with any allocation)"
            )
        if allocation == "global" and "global" in self.scopes:
            scope = "global"
        self.allocation = allocation
        self.allocation_params = check_allocation_params(allocation, allocation_params or {})
        parsed_structure = parse_structure(structure)
        if parsed_structure.name not in self.structures:
            raise ConfigError(
                f"method {self.name!r} does not support structure {structure!r}; "
                f"it supports: {_structures_text(self.structures)}"
            )
        self._check_fixed_density(parsed_structure, allocation, scope)
        if scope not in self.scopes:
            raise ConfigError(
                f"method {self.name!r} does not support scope {scope!r}; "
                f"it supports: {', '.join(self.scopes)}"
            )
        parsed = parse_options(self.Options, options, f"method {self.name!r}")
        #: the structure as text (``"filters"``, ``"2:4"``), its parsed form and the mask
        #: granularity it uses (``"unstructured"`` for N:M)
        self.structure, self.scope = str(parsed_structure), scope
        self.structure_spec = parsed_structure
        self.granularity = parsed_structure.granularity
        #: layers the structure cannot take (N:M: input dimension not a multiple of M), and why
        self.skipped_layers: dict[str, str] = {}
        self.layer_selection = {
            "keep_first": keep_first,
            "keep_last": keep_last,
            "include": list(include or []),
            "exclude": list(exclude or []),
        }
        self.opts: dict[str, Any] = parsed.model_dump()

    def _check_fixed_density(self, structure: Any, allocation: str, scope: str) -> None:
        """A structure that fixes every pruned layer's density (N:M) takes no other sparsity,
        allocation or scope."""
        density = structure.density
        if density is None:
            return
        if abs(self.sparsity - (1.0 - density)) > 1e-9:
            raise ConfigError(
                f"structure {structure} keeps {structure.nm[0]} of every {structure.nm[1]} "
                f"weights of each layer it prunes: sparsity {1.0 - density:g}, not "
                f"{self.sparsity:g}; pass --sparsity {1.0 - density:g} or leave it out"
            )
        if allocation != self.default_allocation or scope != "local":
            raise ConfigError(
                f"structure {structure} fixes every pruned layer's density at {density:g}: "
                f"no layer allocation or global scope applies (got allocation {allocation!r}, "
                f"scope {scope!r})"
            )

    @classmethod
    def supports_structure(cls, structure: str) -> bool:
        """Whether this method accepts ``structure`` (``filters``, ``2:4``, ...)."""
        try:
            return parse_structure(structure).name in cls.structures
        except ConfigError:
            return False

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers this method prunes in ``model``: the layer selection, less the layers
        the structure cannot take (recorded with the reason in :attr:`skipped_layers`)."""
        from advprune.sparsity import prunable_layers

        chosen = prunable_layers(model, **self.layer_selection)
        self.skipped_layers = {}
        for name, module in chosen.items():
            why = self.structure_spec.incompatible(tuple(module.weight.shape))
            if why is not None:
                self.skipped_layers[name] = why
        if len(self.skipped_layers) == len(chosen):
            raise ConfigError(
                f"no layer of {type(model).__name__} can take structure {self.structure}: "
                + "; ".join(f"{n}: {why}" for n, why in list(self.skipped_layers.items())[:2])
            )
        return {n: m for n, m in chosen.items() if n not in self.skipped_layers}

    def target_densities(self, model: nn.Module, sparsity: float | None = None) -> dict[str, float]:
        """Per-layer target densities of :meth:`layers` from this method's ``allocation`` at
        ``sparsity`` (default: the method's target); a structure that fixes the density
        (N:M: N / M) gives every layer that."""
        layers = self.layers(model)
        fixed = self.structure_spec.density
        if fixed is not None:
            return {name: fixed for name in layers}
        return allocate(
            self.allocation,
            layers,
            self.sparsity if sparsity is None else sparsity,
            granularity=self.granularity,
            **self.allocation_params,
        )

    @abstractmethod
    def prune(self, model: nn.Module) -> dict[str, float]:
        """Attach this method's masks to ``model``; return the per-layer target densities."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model the prune stage starts from (default: ``model`` itself, unchanged)."""
        return model

    def prune_round(self, model: nn.Module, round_index: int) -> dict[str, float]:
        """Masks for round ``round_index`` of ``self.rounds``; default: :meth:`prune` once."""
        if round_index != 0:
            raise ValueError(f"{self.name} prunes in one round, got round {round_index}")
        return self.prune(model)

    def finish(self, model: nn.Module, targets: dict[str, float]) -> dict[str, float]:
        """End of the prune stage (after its training): settle the masks and return the
        per-layer target densities to record. Default: the last round's ``targets``; methods
        that learn their densities (HARP) project them onto the target and return them."""
        return dict(targets)

    def trainable(self, stage: str) -> tuple[str, ...]:
        """Parameter kinds trained in ``stage`` (empty: the stage does not train)."""
        if stage not in self.stages:
            raise ConfigError(
                f"method {self.name!r} has no stage {stage!r}; its stages: {', '.join(self.stages)}"
            )
        return tuple(self.trains.get(stage, ()))

    def stage_kind(self, stage: str) -> str:
        """What ``stage`` does in the pipeline (:mod:`advprune.pipeline`): ``pretrain`` (dense
        training before pruning), ``prune`` (where :meth:`prune_round` runs) or ``train``
        (masks fixed, :meth:`trainable` kinds train). Default: by name, ``pretrain`` and
        ``prune`` are themselves and every other stage is ``train``; override it for a stage
        sequence of another shape."""
        return stage if stage in ("pretrain", "prune") else "train"

    def regularizer(self, stage: str) -> Regularizer | None:
        """Extra loss term for training ``stage`` (e.g. HARP's hinge loss); default none."""
        return None

    @property
    def needs_pretrained(self) -> bool:
        """Whether the prune stage starts from a trained (``pretrain`` stage) model."""
        return any(self.stage_kind(s) == "pretrain" for s in self.stages)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Method:
        """Rebuild a method from :meth:`config` (as stored in checkpoint cards)."""
        keys = (
            "structure",
            "scope",
            "keep_first",
            "keep_last",
            "include",
            "exclude",
            "allocation",
            "allocation_params",
        )
        kwargs = {k: config[k] for k in keys if k in config}
        return cls(config["sparsity"], **kwargs, **dict(config.get("options") or {}))

    def config(self) -> dict[str, Any]:
        """JSON-able record of the method and its options (for checkpoint cards)."""
        return {
            "name": self.name,
            "sparsity": self.sparsity,
            "structure": self.structure,
            "scope": self.scope,
            "allocation": self.allocation,
            "allocation_params": dict(self.allocation_params),
            **self.layer_selection,
            "options": dict(self.opts),
            "taxonomy": self.taxonomy.to_dict(),
        }


_METHODS: Registry[type[Method]] = Registry("method")


def _structures_text(names: tuple[str, ...]) -> str:
    return ", ".join("N:M (e.g. 2:4)" if n == "nm" else n for n in names)


def _options_model(cls: type[Method]) -> type[Options]:
    """``cls.Options``, or for a method that declares only an ``options`` dict of defaults, a
    model of those keys (values of the defaults' types)."""
    if "Options" in cls.__dict__ or "options" not in cls.__dict__:
        return cls.Options
    fields: dict[str, Any] = {k: (type(v) if v is not None else Any, v) for k, v in
                              cls.options.items()}  # fmt: skip
    return create_model(f"{cls.__name__}Options", __base__=Options, **fields)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under ``cls.name``."""
    bad = [s for s in cls.structures if s not in list_structures()]
    bad += [s for s in cls.scopes if s not in SCOPES]
    if bad or not cls.structures or not cls.scopes:
        raise ValueError(
            f"{cls.__name__}.structures / scopes must be non-empty and within "
            f"{', '.join(list_structures())} / {', '.join(SCOPES)}, got {cls.structures} / "
            f"{cls.scopes}"
        )
    for stage in cls.trains:
        if stage not in cls.stages:
            raise ValueError(f"{cls.__name__}.trains names unknown stage {stage!r}")
    cls.Options = _options_model(cls)
    cls.options = {k: f.default for k, f in cls.Options.model_fields.items()}
    return _METHODS.add(cls.name, cls)


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching an fnmatch ``pattern``."""
    return _METHODS.names(pattern)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``."""
    return _METHODS.get(name)


def create_method(name: str, sparsity: float | str, **kwargs: Any) -> Method:
    """Build the method ``name`` at ``sparsity`` (removed fraction)."""
    return method_class(name)(sparsity, **kwargs)


def method_from_config(config: Mapping[str, Any]) -> Method:
    """Rebuild the method recorded in a checkpoint card's ``method`` entry."""
    if not isinstance(config, Mapping) or "name" not in config or "sparsity" not in config:
        raise ConfigError("the card's method entry must give at least its name and sparsity")
    return method_class(str(config["name"])).from_config(config)
