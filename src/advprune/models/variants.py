"""Architecture variants every registered model accepts, applied by :func:`advprune.models.create`.

Two keyword arguments change any architecture in the same way, and are recorded in
``model.spec.kwargs`` so checkpoints rebuild the variant:

- ``bn_affine=False``: every BatchNorm becomes non-affine (no learnable scale and shift; the
  running statistics remain).
- ``head``: the classifier (the model's last layer, a Linear with ``num_classes`` outputs)
  as ``"linear"`` (unchanged, the default), ``"conv"`` (a bias-free 1×1 convolution on the
  features) or ``"conv-bn"`` (that convolution followed by a BatchNorm on the logits, affine
  only when ``bn_affine`` is true: the "end with BN" classifier of robust binary
  subnetworks, Liu et al., NeurIPS 2022).

The replaced classifier keeps its module name (``linear``, ``fc``, ``classifier.4``, ...); its
weight lives in ``NAME.conv`` and the logits BatchNorm in ``NAME.bn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advprune.errors import ConfigError

VARIANT_KWARGS = ("bn_affine", "head")
HEADS = ("linear", "conv", "conv-bn")


class ConvHead(nn.Module):
    """Classifier as a bias-free 1×1 convolution on ``(N, F)`` features, optionally followed by
    a BatchNorm of the logits; returns ``(N, num_classes)``."""

    def __init__(self, in_features: int, num_classes: int, *, bn: bool, bn_affine: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, num_classes, 1, bias=False)
        self.bn = nn.BatchNorm2d(num_classes, affine=bn_affine) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x.reshape(x.shape[0], -1, 1, 1))
        if self.bn is not None:
            out = self.bn(out)
        return out.flatten(1)


def check_variant(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate the variant keyword arguments (``bn_affine``, ``head``) and return them."""
    out = {}
    if "bn_affine" in kwargs:
        if not isinstance(kwargs["bn_affine"], bool):
            raise ConfigError(f"bn_affine must be true or false, got {kwargs['bn_affine']!r}")
        out["bn_affine"] = kwargs["bn_affine"]
    if "head" in kwargs:
        if kwargs["head"] not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {kwargs['head']!r}")
        out["head"] = kwargs["head"]
    return out


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replace_head(model: nn.Module, name: str, num_classes: int, head: str, affine: bool) -> None:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ConfigError(f"head={head!r} needs a classifier layer; {name} has no conv or linear")
    last_name, last = layers[-1]
    if not isinstance(last, nn.Linear) or last.out_features != num_classes:
        raise ConfigError(
            f"head={head!r} needs a model whose last layer is a Linear classifier with "
            f"{num_classes} outputs; {name}'s last layer {last_name!r} is a {type(last).__name__}"
        )
    new = ConvHead(last.in_features, num_classes, bn=head == "conv-bn", bn_affine=affine)
    with torch.no_grad():  # same initial weights as the Linear it replaces (its bias is dropped)
        new.conv.weight.copy_(last.weight.view_as(new.conv.weight))
    new.to(last.weight.device)
    _set_child(model, last_name, new)


def _non_affine_batchnorms(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            new = type(module)(
                module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=False,
                track_running_stats=module.track_running_stats,
            )
            _set_child(model, name, new)


def apply_variant(model: nn.Module, name: str, num_classes: int, **variant: Any) -> nn.Module:
    """Apply ``bn_affine`` / ``head`` (see the module docstring) to ``model`` in place."""
    variant = check_variant(variant)
    affine = variant.get("bn_affine", True)
    head = variant.get("head", "linear")
    if head != "linear":
        _replace_head(model, name, num_classes, head, affine)
    if not affine:
        _non_affine_batchnorms(model)
    return model
