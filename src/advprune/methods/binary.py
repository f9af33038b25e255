"""Robust binary random subnetworks (Liu, Zhao, Süsstrunk & Salzmann, NeurIPS 2022).

A randomly initialised network is made binary and never trained: every conv / linear weight is
the sign of its default initialisation (exactly ±1, frozen; biases zero), every BatchNorm is
non-affine, and the classifier is a binary 1×1 convolution followed by a non-affine BatchNorm
on the logits ("end with BN"). Only the pruning scores learn: each layer keeps the top
``density`` fraction of ``|scores|`` (straight-through gradient), with per-layer densities
from the n^p rule (density ∝ n_l^(p - 1), capped at 1).

The binary architecture is a variant of the registered one
(``create(name, bn_affine=False, head="conv-bn")``, see :mod:`advprune.models.variants`), so
it is recorded in ``model.spec`` and an exported checkpoint loads into ``create(**spec)``
with ``strict=True``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from advprune.errors import ConfigError
from advprune.methods.base import Method, Taxonomy, register_method
from advprune.models import create
from advprune.registry import Options
from advprune.sparsity import ScoreMask, attach_mask, dense_weight, is_masked
from advprune.sparsity.allocation import DEFAULT_NP_P
from advprune.sparsity.masks import PRUNABLE_TYPES

FAN_SCALE_MODES = ("none", "all", "except-last", "only-last")  # Options.score_fan_scale


@torch.no_grad()
def binarize_(model: nn.Module) -> nn.Module:
    """Set every conv / linear weight to its sign (``+1`` where ``w >= 0``) and biases to zero,
    in place."""
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES):
            w = dense_weight(module)
            w.copy_(torch.where(w >= 0, 1.0, -1.0).to(w.dtype))
            if module.bias is not None:
                module.bias.zero_()
    return model


def binary_variant(model: nn.Module, *, end_with_bn: bool = True) -> nn.Module:
    """The binary variant of ``model``'s architecture with the signs of ``model``'s weights.

    ``model`` must come from :func:`advprune.models.create` and be unpruned. The classifier of
    the variant takes the sign of ``model``'s classifier weights (same values, 1×1 conv shape).
    """
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("the binary method needs a model built by advprune.models.create")
    if any(is_masked(m) for m in model.modules()):
        raise ConfigError("the binary method prunes an unpruned network; this one has masks")
    kwargs = {**spec.to_create_kwargs(), "bn_affine": False}
    kwargs["head"] = "conv-bn" if end_with_bn else "conv"
    with torch.random.fork_rng(devices=[]):  # the weights come from ``model``
        binary = create(**kwargs)
    source = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    target = [m for m in binary.modules() if isinstance(m, PRUNABLE_TYPES)]
    assert len(source) == len(target)
    with torch.no_grad():
        for src, dst in zip(source, target):
            dst.weight.copy_(src.weight.detach().reshape(dst.weight.shape))
    param = next(model.parameters(), None)
    binary = binary.to(param.device if param is not None else "cpu")
    return binarize_(binary)


def init_scores(
    weight_shape: torch.Size, a: float, fan_scale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scores ``U(-a, a)``, divided by ``sqrt(fan_in)`` when ``fan_scale``."""
    scores = (torch.rand(weight_shape, generator=generator) * 2 - 1) * a
    if fan_scale:
        scores /= math.sqrt(math.prod(weight_shape[1:]))
    return scores


@register_method
class BinarySubnet(Method):
    """Prune a random binary network; only the scores train (Liu et al., NeurIPS 2022).

    Layer densities come from the method's ``allocation``, by default the n^p rule with
    ``allocation_params={"p": 0.1}`` (``--allocation-p``). Options: ``score_init_a`` (scores
    ``U(-a, a)``, default 0.01), ``score_fan_scale`` (divide the initial scores by
    ``sqrt(fan_in)`` in ``none`` / ``all`` / ``except-last`` / ``only-last`` layers),
    ``end_with_bn`` (BatchNorm on the logits; default true).
    """

    name: ClassVar[str] = "binary"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="Binary_Liu2022Robust",
        pipeline="before",
        pruning_step=("AT",),
        training_step=("None",),
        schedule=("1S",),
        structures=("US",),
        scopes=("L",),
        criterion="LIS",
        description="learned scores on frozen random ±1 weights, n^p layer densities",
        reference=(
            "Liu et al., Robust Binary Models by Pruning Randomly-initialized Networks, "
            "NeurIPS 2022"
        ),
    )
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)
    scopes: ClassVar[tuple[str, ...]] = ("local",)
    stages: ClassVar[tuple[str, ...]] = ("prune",)
    trains: ClassVar[dict[str, tuple[str, ...]]] = {"prune": ("scores",)}
    default_allocation: ClassVar[str] = "np"

    class Options(Options):
        score_init_a: Annotated[float, Field(gt=0)] = 0.01  # scores start U(-a, a)
        score_fan_scale: Literal["none", "all", "except-last", "only-last"] = "none"
        end_with_bn: bool = True  # non-affine BatchNorm on the logits

    def __init__(self, sparsity: float | str, *args: Any, **kwargs: Any) -> None:
        super().__init__(sparsity, *args, **kwargs)
        if self.allocation == "np":  # record the paper's p when none is given
            self.allocation_params.setdefault("p", DEFAULT_NP_P)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The binary variant of ``model`` (signs of its weights; see :func:`binary_variant`)."""
        return binary_variant(model, end_with_bn=bool(self.opts["end_with_bn"]))

    def prune(self, model: nn.Module) -> dict[str, float]:
        layers = self.layers(model)
        for name, module in layers.items():
            w = dense_weight(module)
            if not bool((w.abs() == 1).all()):
                raise ConfigError(
                    f"layer {name!r} is not binary; the binary method prunes the model "
                    "returned by its prepare(model)"
                )
        densities = self.target_densities(model)
        mode = self.opts["score_fan_scale"]
        last = list(layers)[-1]
        for name, module in layers.items():
            is_last = name == last
            fan = mode == "all" or (mode == "except-last" and not is_last)
            fan = fan or (mode == "only-last" and is_last)
            w = dense_weight(module)
            scores = init_scores(w.shape, float(self.opts["score_init_a"]), fan).to(w.device)
            attach_mask(module, ScoreMask(w.shape, "unstructured", densities[name], scores))
        return densities
