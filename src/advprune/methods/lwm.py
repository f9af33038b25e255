"""LWM: least-weight-magnitude pruning, one-shot, local or global (Han et al., 2015)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from advprune.methods.base import Method, Taxonomy, register_method
from advprune.sparsity import prune_magnitude


@register_method
class LWM(Method):
    """Prune the smallest-magnitude weights (or filters / channels by mean |w|) once.

    Stages: ``pretrain`` (dense weights train) -> ``prune`` (fixed magnitude masks, no
    training) -> ``finetune`` (surviving weights train, masks fixed). ``scope="local"`` prunes
    every layer to the target; ``"global"`` ranks all units together.
    """

    name: ClassVar[str] = "lwm"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        pipeline="after",
        schedule="one-shot",
        structures=("unstructured", "filters", "channels"),
        scopes=("local", "global"),
        criterion="weight magnitude",
        reference="Han et al., Learning both Weights and Connections, NeurIPS 2015",
    )
    stages: ClassVar[tuple[str, ...]] = ("pretrain", "prune", "finetune")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "finetune": ("weights", "bn"),
    }

    def prune(self, model: nn.Module) -> dict[str, float]:
        return prune_magnitude(
            model,
            self.sparsity,
            granularity=self.structure,
            scope=self.scope,
            layers=self.layers(model),
        )
