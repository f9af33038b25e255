"""HARP: holistic adversarially robust pruning (Zhao & Wressnegger, ICLR 2023).

Every pruned layer ``l`` gets a learnable rate ``r_l`` and scores ``S_l``. Its density is
``a_l = (1 - a_min) * sigmoid(r_l) + a_min`` (``a_min = a_min_factor * a_t``, a_t the target
density) and its mask keeps the ``ceil(a_l * n_l)`` units with the largest ``|S_l|``. The
gradient reaches ``S_l`` straight through the top-k, and ``r_l`` as the sum of the mask's
gradients times ``da/dr`` (:class:`RateMask`). A hinge loss on the kept size
(:class:`HardwareLoss`) pulls the rates to the global target; its weight grows as
``(epoch + 1) * gamma0`` until the target is met, then stays.

Deviations from the reference code, all on purpose:

- the hinge's target is lowered by one unit per layer (the most ``ceil`` can add), so a zero
  hinge loss guarantees that the *measured* kept count is at or below the target;
- after the prune stage (:meth:`HARP.finish`), rates that still exceed the target
  are all shifted by one common offset until it is met, so a run stopped early never records
  a model above its target;
- initial rates come from any allocation strategy at any target (``uniform``, ``erk``,
  ``lamp``, ...), inverting the density map;
- channel scores start from per-channel L1 norms of the weights; layers that read the same
  input tensor (a ResNet block's ``conv1`` and its projection ``shortcut.0``, a WideResNet
  block's ``conv1`` and ``convShortcut``) share one rate and one score vector, found by
  tracing the model once at its input size (:func:`shared_input_groups`);
- the FLOPs variant of the hinge (``hw_loss="flops"``) counts each layer's multiply-accumulates
  with forward hooks at the model's input size instead of hard-coded feature-map sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from advprune.errors import ConfigError
from advprune.methods.base import Method, Taxonomy, register_method
from advprune.methods.hydra import scaled_scores
from advprune.registry import Options
from advprune.sparsity import (
    RateMask,
    attach_mask,
    compact_shape,
    dense_weight,
    kept_units,
    masked_modules,
    sparsity_report,
    unit_size,
)
from advprune.sparsity.masks import PRUNABLE_TYPES
from advprune.training import Regularizer

LEARN = ("both", "rates", "scores")
HW_LOSSES = ("params", "flops")
_Q_EPS = 1e-3  # largest clamp of sigmoid(r) when inverting a density (density_rate)


def density_rate(density: float, a_min: float, units: int | None = None) -> float:
    """Inverse of :func:`rate_density`: ``logit((a - a_min) / (1 - a_min))``.

    The fraction is clamped to ``[eps, 1 - eps]`` so every rate keeps a gradient, with
    ``eps = min(1e-3, 0.5 / units)``: a layer at full density then still keeps all its
    ``units`` (``ceil`` of at least ``units - 0.5``).
    """
    eps = _Q_EPS if units is None else min(_Q_EPS, 0.5 / units)
    q = (density - a_min) / (1.0 - a_min)
    q = min(max(q, eps), 1.0 - eps)
    return math.log(q / (1.0 - q))


def harp_masks(model: nn.Module) -> dict[str, RateMask]:
    """``{layer: mask}`` for every HARP-masked layer of ``model``, in module order."""
    return {n: m for n, (_, m) in masked_modules(model).items() if isinstance(m, RateMask)}


# ---------------------------------------------------------------------------- costs and budget


@dataclass(frozen=True)
class LayerCost:
    """A masked layer's unit count and the cost of one unit (weights, or MACs)."""

    units: int
    unit_cost: float


def _input_size(model: nn.Module) -> tuple[int, ...]:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError(
            "this HARP setting traces the model at its input size; build the model with "
            "advprune.models.create (its spec records the input size)"
        )
    return tuple(spec.input_size)


def layer_costs(model: nn.Module, metric: str = "params") -> dict[str, LayerCost]:
    """Per HARP-masked layer: units and cost per unit, in weights (``params``) or in
    multiply-accumulates at the model's input size (``flops``, counted by forward hooks)."""
    masks = harp_masks(model)
    if not masks:
        raise ConfigError("the model has no HARP masks; run HARP's prune first")
    spatial = {n: 1.0 for n in masks}
    if metric == "flops":
        report = sparsity_report(model, _input_size(model))
        spatial = {r.name: r.flops_dense / r.params for r in report.layers if r.name in masks}
    elif metric != "params":
        raise ConfigError(f"hw_loss must be one of {', '.join(HW_LOSSES)}, got {metric!r}")
    return {
        n: LayerCost(m.units, unit_size(m.weight_shape, m.granularity) * spatial[n])
        for n, m in masks.items()
    }


def _budget(costs: Mapping[str, LayerCost], target_density: float, metric: str) -> float:
    total = sum(c.units * c.unit_cost for c in costs.values())
    # parameters: the kept weight count of the allocation strategies, round(a_t * N)
    return float(round(target_density * total)) if metric == "params" else target_density * total


def measured_cost(model: nn.Module, costs: Mapping[str, LayerCost]) -> float:
    """Kept size of the HARP-masked layers (weights or MACs) as the masks stand."""
    masks = harp_masks(model)
    return sum(costs[n].unit_cost * masks[n].kept() for n in costs)


def project_rates(model: nn.Module, costs: Mapping[str, LayerCost], budget: float) -> float:
    """Shift every rate by one common offset ``delta <= 0`` (the largest that works) so the
    measured kept size is at most ``budget``; return ``delta`` (0 when already met)."""
    masks = harp_masks(model)
    rates: dict[int, nn.Parameter] = {id(m.rate): m.rate for m in masks.values()}
    base = {n: (float(m.rate.detach()), float(m.a_min)) for n, m in masks.items()}

    def size(delta: float) -> float:
        total = 0.0
        for n, (r, a_min) in base.items():
            a = (
                (1.0 - a_min) / (1.0 + math.exp(-(r + delta))) + a_min
                if r + delta > -700
                else a_min
            )
            total += costs[n].unit_cost * kept_units(a, costs[n].units)
        return total

    if size(0.0) <= budget:
        return 0.0
    lo = -(max(abs(r) for r, _ in base.values()) + 60.0)
    if size(lo) > budget:
        raise ConfigError(
            "the target cannot be met even with every layer at a_min; lower a_min_factor "
            "or the sparsity"
        )
    hi = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    with torch.no_grad():
        for rate in rates.values():
            rate.add_(lo)
    return lo


class HardwareLoss(Regularizer):
    """HARP's ``gamma * L_hw`` with ``L_hw = max(sum_l c_l n_l a_l / B' - 1, 0)``.

    ``c_l`` is a unit's cost (weights, or MACs with ``metric="flops"``), ``B'`` the target
    budget less one unit per layer (so a zero loss guarantees the measured target).
    ``gamma = (epoch + 1) * gamma0`` until the measured kept size meets the target; then it
    stays. :meth:`ready` (best checkpoint allowed) holds once the target is met.
    """

    def __init__(
        self,
        target_density: float,
        gamma0: float,
        metric: str = "params",
        costs: Mapping[str, LayerCost] | None = None,
    ) -> None:
        self.target_density = float(target_density)
        self.gamma0 = float(gamma0)
        self.metric = metric
        self.gamma = self.gamma0
        self.frozen = False
        self._costs = dict(costs) if costs is not None else None

    def costs(self, model: nn.Module) -> dict[str, LayerCost]:
        if self._costs is None:
            self._costs = layer_costs(model, self.metric)
        return self._costs

    def budget(self, model: nn.Module) -> float:
        """The target kept size (weights or MACs)."""
        return _budget(self.costs(model), self.target_density, self.metric)

    def hinge(self, model: nn.Module) -> torch.Tensor:
        """``L_hw`` of the current rates (differentiable in the rates)."""
        costs = self.costs(model)
        masks = harp_masks(model)
        effective = self.budget(model) - sum(c.unit_cost for c in costs.values())
        size = sum(c.unit_cost * c.units * masks[n].layer_density() for n, c in costs.items())
        return torch.clamp(size / effective - 1.0, min=0.0)

    def met(self, model: nn.Module) -> bool:
        """Whether the measured kept size is at or below the target."""
        return measured_cost(model, self.costs(model)) <= self.budget(model) * (1 + 1e-12)

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.gamma == 0:
            return None
        return self.gamma * self.hinge(model)

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        met = self.met(model)
        if not self.frozen:
            if met:
                self.frozen = True
            else:
                self.gamma = (epoch + 2) * self.gamma0  # the weight of the next epoch
        costs = self.costs(model)
        total = sum(c.units * c.unit_cost for c in costs.values())
        with torch.no_grad():
            hinge = float(self.hinge(model))
        return {
            "hw_gamma": self.gamma,
            "hw_loss": hinge,
            "hw_density": measured_cost(model, costs) / total,
            "hw_target_met": float(met),
        }

    def ready(self, model: nn.Module) -> bool:
        return self.met(model)

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "frozen": self.frozen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.gamma = float(state["gamma"])
            self.frozen = bool(state["frozen"])


# ---------------------------------------------------------------------------- structure


@torch.no_grad()
def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Groups of conv / linear layers that read the very same input tensor (two or more each).

    Found by one forward pass at the model's input size: in a ResNet block with a projection
    shortcut, ``conv1`` and ``shortcut.0`` both read the block input, so pruning an input
    channel of one and not of the other would keep a channel the block half uses.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    readers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # hold the inputs so no id is reused during the pass

    def hook(mod: nn.Module, inp: tuple, out: Any, name: str) -> None:
        alive.append(inp[0])
        readers.setdefault(id(inp[0]), []).append(name)

    handles = [
        m.register_forward_hook(lambda mod, i, o, name=n: hook(mod, i, o, name)) for n, m in layers
    ]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    size = _input_size(model)
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *size, device=param.device, dtype=param.dtype))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(
            f"structured HARP traces the model at its input size {size} to find layers that "
            f"share an input, and the forward pass failed ({detail})"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return [names for names in readers.values() if len(names) > 1]


def initial_scores(weights: Sequence[torch.Tensor], granularity: str) -> torch.Tensor:
    """Scores of one layer (or of a group of layers sharing input channels).

    Unstructured: HYDRA's scaled init ``sqrt(6 / fan_in) * W / max|W|`` (the first mask is
    magnitude pruning). Channels: per-input-channel L1 norms of the weights (summed over the
    group), scaled the same way.
    """
    if granularity == "unstructured":
        return scaled_scores(weights[0])
    norms = sum(w.detach().float().abs().transpose(0, 1).flatten(1).sum(1) for w in weights)
    fan_in = weights[0][0].numel()
    return norms * (math.sqrt(6.0 / fan_in) / float(norms.max().clamp_min(1e-30)))


# ---------------------------------------------------------------------------- the method


@register_method
class HARP(Method):
    """HARP (Zhao & Wressnegger, ICLR 2023): learned per-layer rates and scores.

    Stages: ``pretrain`` (dense weights) -> ``prune`` (scores and / or rates train under the
    hinge loss, weights frozen) -> ``finetune`` (weights train, masks fixed).

    Options: ``learn`` (``both`` = HARP, ``rates`` = HARP-r, ``scores`` = HARP-S),
    ``gamma0`` (hinge weight per epoch), ``a_min_factor`` (``a_min`` as a fraction of the
    target density), ``hw_loss`` (``params`` or ``flops``), ``freeze_bn`` (keep BatchNorm
    fixed while pruning). Initial rates come from the ``allocation`` strategy.
    """

    name: ClassVar[str] = "harp"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="HARP_Zhao2023Holistic",
        pipeline="after",
        pretraining=("AT",),
        finetuning=("AT",),
        schedule=("1S",),
        structures=("S", "US"),
        scopes=("G",),
        criterion="LIS",
        description="learned scores ranked per layer, learned layer rates under a global budget",
        reference="Zhao & Wressnegger, Holistic Adversarially Robust Pruning, ICLR 2023",
    )
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "channels")
    scopes: ClassVar[tuple[str, ...]] = ("local",)
    stages: ClassVar[tuple[str, ...]] = ("pretrain", "prune", "finetune")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "prune": ("scores", "rates", "bn"),
        "finetune": ("weights", "bn"),
    }

    class Options(Options):
        learn: Literal["both", "rates", "scores"] = "both"  # HARP, HARP-r, HARP-S
        gamma0: Annotated[float, Field(ge=0)] = 0.01  # hinge weight per epoch
        a_min_factor: Annotated[float, Field(ge=0, lt=1)] = 0.1  # a_min / target density
        hw_loss: Literal["params", "flops"] = "params"
        freeze_bn: bool = False  # keep BatchNorm fixed while pruning

    def __init__(self, sparsity: float | str, *args: Any, **kwargs: Any) -> None:
        super().__init__(sparsity, *args, **kwargs)
        o = self.opts
        self.target_density = 1.0 - self.sparsity
        self.a_min = float(o["a_min_factor"]) * self.target_density
        self._costs: dict[str, LayerCost] | None = None

    def trainable(self, stage: str) -> tuple[str, ...]:
        kinds = super().trainable(stage)
        if stage != "prune":
            return kinds
        learn = self.opts["learn"]
        masks = {"both": ("scores", "rates"), "rates": ("rates",), "scores": ("scores",)}[learn]
        return masks + (() if self.opts["freeze_bn"] else ("bn",))

    def _groups(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> list[list[str]]:
        if self.structure == "unstructured":
            return [[n] for n in layers]
        for name, module in layers.items():
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ConfigError(
                    f"HARP cannot prune input channels of the grouped convolution {name!r} "
                    f"(groups={module.groups}); exclude it or prune unstructured"
                )
        shared = shared_input_groups(model)
        grouped = {n for g in shared for n in g}
        groups = [g for g in shared if any(n in layers for n in g)]
        for g in groups:
            missing = [n for n in g if n not in layers]
            if missing:
                raise ConfigError(
                    f"structured HARP ties the input channels of {', '.join(g)} (they read the "
                    f"same tensor) but {', '.join(missing)} is not pruned; prune all or none "
                    "of them (check include / exclude / keep_first / keep_last)"
                )
        return groups + [[n] for n in layers if n not in grouped]

    def prune(self, model: nn.Module) -> dict[str, float]:
        layers = self.layers(model)
        groups = self._groups(model, layers)
        densities = self.target_densities(model)
        for group in groups:
            weights = [dense_weight(layers[n]) for n in group]
            units = [compact_shape(w.shape, self.structure) for w in weights]
            sizes = [unit_size(w.shape, self.structure) for w in weights]
            counts = [math.prod(u) for u in units]
            kept = sum(densities[n] * c * s for n, c, s in zip(group, counts, sizes))
            density = kept / sum(c * s for c, s in zip(counts, sizes))
            rate = density_rate(density, self.a_min, max(counts))
            scores = initial_scores(weights, self.structure)
            first: RateMask | None = None
            for name, weight in zip(group, weights):
                mask = RateMask(weight.shape, self.structure, self.a_min, rate, scores)
                if first is None:
                    first = mask
                else:  # one rate and one score vector for the whole group
                    mask.scores, mask.rate = first.scores, first.rate
                attach_mask(layers[name], mask)
        metric = self.opts["hw_loss"]
        self._costs = layer_costs(model, metric)
        budget = _budget(self._costs, self.target_density, metric)
        if budget - sum(c.unit_cost for c in self._costs.values()) <= 0:
            raise ConfigError(
                f"sparsity {self.sparsity} cannot be reached by HARP over {len(layers)} "
                "layers: the target keeps less than one unit per layer"
            )
        project_rates(model, self._costs, budget)  # e.g. layers raised to a_min at the start
        return {n: m.kept() / m.units for n, m in harp_masks(model).items()}

    def regularizer(self, stage: str) -> Regularizer | None:
        if stage != "prune":
            return None
        return HardwareLoss(
            self.target_density, float(self.opts["gamma0"]), self.opts["hw_loss"], self._costs
        )

    def finalize(self, model: nn.Module) -> float:
        """Meet the target if the rates still exceed it (one common shift of all rates);
        return the shift (0 when already met)."""
        costs = layer_costs(model, self.opts["hw_loss"])
        return project_rates(
            model, costs, _budget(costs, self.target_density, self.opts["hw_loss"])
        )

    def finish(self, model: nn.Module, targets: dict[str, float]) -> dict[str, float]:
        """Final per-layer densities (kept units / units) after :meth:`finalize`.

        The workflow calls this after the prune stage's training, before saving, so the saved
        masks always meet the target.
        """
        self.finalize(model)
        return {n: m.kept() / m.units for n, m in harp_masks(model).items()}


def rate_densities(model: nn.Module) -> dict[str, float]:
    """The continuous density ``a`` of every HARP-masked layer (``kept = ceil(a * n)``)."""
    return {n: float(m.layer_density().detach()) for n, m in harp_masks(model).items()}
