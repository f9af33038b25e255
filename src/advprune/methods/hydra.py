"""HYDRA: pruning by learned importance scores (Sehwag et al., NeurIPS 2020).

Every pruned layer gets scores of the weight's shape; the mask keeps the top ``k`` (kept
fraction, from the method's ``allocation``) of ``|scores|`` in the layer and passes the
gradient straight through to the scores. Scores start from the scaled init
``s = sqrt(6 / fan_in) * W / max|W|``, so before any training step the mask is exactly the
magnitude (LWM) mask of the same densities. Stages, as in the reference code:

- ``pretrain``: dense weights and BatchNorm train (k = 1);
- ``prune``: only the scores train (the reference's default ``freeze_bn=False`` leaves the
  BatchNorm affine parameters trainable too; ``freeze_bn=True`` freezes them). Weights and
  biases of conv / linear layers are frozen. As in the reference, BatchNorm running
  statistics still update in train mode (they are buffers, not parameters);
- ``finetune``: weights and BatchNorm train, the scores (hence the mask) are frozen.

Structured HYDRA (``filters`` / ``channels``) keeps the scores weight-shaped and ranks each
filter / input channel by the L1 norm of its scores, so the mask removes whole units; the
straight-through gradient reaches every score of a unit through that norm. Under an N:M
structure (``2:4``) the scores are ranked within each group of M consecutive input weights
(:class:`~advprune.sparsity.NMScoreMask`): the mask keeps exactly N of every M, and the scaled
init makes it the N:M magnitude mask before training.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import nn

from advprune.methods.base import Method, Taxonomy, register_method
from advprune.registry import Options
from advprune.sparsity import HydraMask, NMScoreMask, attach_mask, dense_weight

SCORE_INITS = ("scaled", "kaiming_normal", "kaiming_uniform")  # HYDRA.Options.score_init


def scaled_scores(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled score init ``sqrt(6 / fan_in) * W / max|W|`` (zeros for a zero weight)."""
    w = weight.detach().float()
    fan_in = w[0].numel()  # in_channels * kernel area, as nn.init's fan_in
    peak = float(w.abs().max())
    if peak == 0.0:
        return torch.zeros_like(w)
    return w * (math.sqrt(6.0 / fan_in) / peak)


@register_method
class HYDRA(Method):
    """HYDRA: train importance scores with the robust objective, then finetune the weights.

    Options: ``freeze_bn`` (freeze BatchNorm affine parameters while scores train; default
    False as in the reference), ``score_init`` (``scaled``, the default and the paper's
    choice, or ``kaiming_normal`` / ``kaiming_uniform``, which forget the pretrained
    magnitudes).
    """

    name: ClassVar[str] = "hydra"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="HYDRA_Sehwag2020Hydra",
        pipeline="after",
        pretraining=("AT",),
        finetuning=("AT",),
        schedule=("1S",),
        structures=("US",),
        scopes=("L",),
        criterion="LIS",
        description="importance scores learned with the robust objective",
        reference="Sehwag et al., HYDRA: Pruning Adversarially Robust Neural Networks, "
        "NeurIPS 2020",
    )
    # implemented beyond the paper's unstructured pruning: filters and channels
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "filters", "channels", "nm")
    scopes: ClassVar[tuple[str, ...]] = ("local",)
    stages: ClassVar[tuple[str, ...]] = ("pretrain", "prune", "finetune")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "prune": ("scores", "bn"),
        "finetune": ("weights", "bn"),
    }

    class Options(Options):
        freeze_bn: bool = False  # freeze BatchNorm affine parameters while the scores train
        score_init: Literal["scaled", "kaiming_normal", "kaiming_uniform"] = "scaled"

    def trainable(self, stage: str) -> tuple[str, ...]:
        kinds = super().trainable(stage)
        if stage == "prune" and self.opts["freeze_bn"]:
            kinds = tuple(k for k in kinds if k != "bn")
        return kinds

    def _init_scores(self, weight: torch.Tensor) -> torch.Tensor:
        init = self.opts["score_init"]
        if init == "scaled":
            return scaled_scores(weight)
        scores = torch.empty(weight.shape)
        if init == "kaiming_normal":
            nn.init.kaiming_normal_(scores, mode="fan_in", nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        return scores

    def prune(self, model: nn.Module) -> dict[str, float]:
        layers = self.layers(model)
        densities = self.target_densities(model)
        nm = self.structure_spec.nm
        for name, module in layers.items():
            weight = dense_weight(module)
            scores = self._init_scores(weight)
            if nm is not None:
                mask = NMScoreMask(weight.shape, scores=scores, n=nm[0], m=nm[1])
            else:
                mask = HydraMask(weight.shape, self.granularity, densities[name], scores)
            attach_mask(module, mask.to(weight.device))
        return densities
