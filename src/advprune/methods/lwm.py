"""LWM: least-weight-magnitude pruning (Han et al., 2015), one-shot and iterative."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from advprune.methods.base import Method, Taxonomy, register_method
from advprune.registry import Options
from advprune.sparsity import (
    FixedMask,
    NMMask,
    attach_mask,
    dense_weight,
    get_mask,
    layer_masks,
    magnitude_importance,
    nm_mask,
)


def _current_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight with an earlier mask applied (what a new ranking sees)."""
    weight = dense_weight(module)
    old = get_mask(module)
    if old is not None:
        weight = weight * old.full_mask().to(weight.dtype)
    return weight


def attach_magnitude_masks(
    layers: Mapping[str, nn.Module], densities: Mapping[str, float], granularity: str
) -> dict[str, float]:
    """Fixed masks keeping the top ``densities[name]`` of each layer by magnitude.

    Weights an earlier mask removed rank by their *masked* value (0), so they stay removed
    unless a layer keeps more units than were left (never the case when densities shrink).
    """
    importance = {
        name: magnitude_importance(_current_weight(module), granularity)
        for name, module in layers.items()
    }
    masks = layer_masks(importance, densities)
    for name, module in layers.items():
        attach_mask(module, FixedMask(module.weight.shape, granularity, masks[name]))
    return dict(densities)


def attach_nm_masks(layers: Mapping[str, nn.Module], n: int, m: int) -> dict[str, float]:
    """Fixed N:M masks (:class:`~advprune.sparsity.NMMask`) keeping the ``n`` largest
    ``|w|`` of every ``m`` consecutive input weights of each layer; densities ``n / m``."""
    for module in layers.values():
        mask = nm_mask(_current_weight(module).detach().abs(), n, m)
        attach_mask(module, NMMask(module.weight.shape, mask=mask, n=n, m=m))
    return {name: n / m for name in layers}


_LWM_TAXONOMY = dict(
    pipeline="after",
    pretraining=("AT",),
    finetuning=("AT",),
    structures=("S", "US"),
    scopes=("L", "G"),
    criterion="LWM",
    description="weight magnitude (filters / channels: mean |w|)",
)


@register_method
class LWM(Method):
    """Prune the smallest-magnitude weights (or filters / channels by mean |w|) once.

    Stages: ``pretrain`` (dense weights train) -> ``prune`` (fixed magnitude masks, no
    training) -> ``finetune`` (surviving weights train, masks fixed). The per-layer densities
    come from the ``allocation`` (default ``uniform``: every layer at the target;
    ``scope="global"`` is allocation ``global``: one ranking of all units). Structure ``N:M``
    (``2:4``) keeps the ``N`` largest ``|w|`` of every ``M`` consecutive input weights of each
    layer whose input dimension is a multiple of ``M`` (the others stay dense, see
    :attr:`Method.skipped_layers`).
    """

    name: ClassVar[str] = "lwm"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="LWM_Han2015Learning",
        schedule=("1S",),
        reference="Han et al., Learning both Weights and Connections, NeurIPS 2015",
        **_LWM_TAXONOMY,
    )
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "filters", "channels", "nm")
    scopes: ClassVar[tuple[str, ...]] = ("local", "global")
    stages: ClassVar[tuple[str, ...]] = ("pretrain", "prune", "finetune")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "finetune": ("weights", "bn"),
    }

    def prune(self, model: nn.Module) -> dict[str, float]:
        nm = self.structure_spec.nm
        if nm is not None:
            return attach_nm_masks(self.layers(model), *nm)
        return attach_magnitude_masks(
            self.layers(model), self.target_densities(model), self.granularity
        )


@register_method
class IterativeLWM(LWM):
    """Gradual magnitude pruning (Zhu & Gupta, 2017) with finetuning between rounds.

    Round ``r`` (of ``rounds``) prunes to the sparsity ``s_r = s * (1 - (1 - (r + 1) / R)^3)``
    (the cubic schedule: large steps first, small ones near the target), by the magnitude of
    the weights the previous round kept (pruned weights stay pruned), then the prune stage
    trains weights and BatchNorm for the run's epochs before the next round. The last round
    reaches the target; per-layer densities come from the ``allocation`` at each ``s_r``.
    """

    name: ClassVar[str] = "lwm-iterative"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="LWMIT_Zhu2017Prune",
        schedule=("IT",),
        reference="Zhu & Gupta, To prune, or not to prune, 2017",
        **_LWM_TAXONOMY,
    )
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "filters", "channels")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "prune": ("weights", "bn"),
        "finetune": ("weights", "bn"),
    }

    class Options(Options):
        rounds: Annotated[int, Field(ge=1)] = 4  # pruning rounds of the cubic schedule

    def __init__(self, sparsity: float | str, **kwargs: Any) -> None:
        super().__init__(sparsity, **kwargs)
        self.rounds = self.opts["rounds"]

    def round_sparsity(self, round_index: int) -> float:
        """Target sparsity after round ``round_index`` (cubic schedule, exact at the last)."""
        if not 0 <= round_index < self.rounds:
            raise ValueError(f"round {round_index} outside 0..{self.rounds - 1}")
        if round_index == self.rounds - 1:
            return self.sparsity
        frac = (round_index + 1) / self.rounds
        return self.sparsity * (1.0 - (1.0 - frac) ** 3)

    def prune_round(self, model: nn.Module, round_index: int) -> dict[str, float]:
        densities = self.target_densities(model, self.round_sparsity(round_index))
        return attach_magnitude_masks(self.layers(model), densities, self.granularity)

    def prune(self, model: nn.Module) -> dict[str, float]:
        """All rounds at once, without training between them (for one-call use)."""
        densities: dict[str, float] = {}
        for r in range(self.rounds):
            densities = self.prune_round(model, r)
        return densities
