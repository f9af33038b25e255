"""Measured sparsity and FLOPs of a (masked) model, and dense export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from advprune.sparsity.masks import PRUNABLE_TYPES, get_mask, masked_modules, remove_mask


@dataclass
class LayerSparsity:
    """One conv / linear layer: weight count, kept weights, density and multiply-accumulates."""

    name: str
    kind: str
    params: int
    kept: int
    density: float
    flops_dense: int
    flops: int


@dataclass
class SparsityReport:
    """Per-layer and total sparsity of a model.

    ``total_params`` counts every parameter of the dense model (BatchNorm included);
    ``prunable_params`` / ``kept`` count conv and linear weights only. FLOPs are
    multiply-accumulates of conv and linear layers for one input of ``input_size``, counting
    only kept weights.
    """

    layers: list[LayerSparsity] = field(default_factory=list)
    total_params: int = 0
    input_size: tuple[int, ...] = ()

    @property
    def prunable_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / max(1, self.prunable_params)

    @property
    def sparsity(self) -> float:
        """Removed fraction of conv and linear weights."""
        return 1.0 - self.density

    @property
    def flops_dense(self) -> int:
        return sum(layer.flops_dense for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (per-layer rows plus totals)."""
        return {
            "input_size": list(self.input_size),
            "total_params": self.total_params,
            "prunable_params": self.prunable_params,
            "kept": self.kept,
            "density": self.density,
            "sparsity": self.sparsity,
            "flops_dense": self.flops_dense,
            "flops": self.flops,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def format(self) -> str:
        """A plain-text table."""
        head = f"{'layer':<32} {'type':<7} {'params':>10} {'kept':>10} {'density':>8} {'MACs':>12}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name:<32} {r.kind:<7} {r.params:>10,} {r.kept:>10,} {r.density:>8.4f} "
                f"{r.flops:>12,}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{'total (conv+linear)':<32} {'':<7} {self.prunable_params:>10,} {self.kept:>10,} "
            f"{self.density:>8.4f} {self.flops:>12,}"
        )
        rows.append(
            f"all parameters: {self.total_params:,}   sparsity: {self.sparsity:.4f}   "
            f"MACs: {self.flops:,} of {self.flops_dense:,} dense"
        )
        return "\n".join(rows)


def _kept_weights(module: nn.Module) -> int:
    mask = get_mask(module)
    if mask is not None:
        return int(mask.full_mask().count_nonzero())
    return int(module.weight.detach().count_nonzero())


def _dense_params(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            total += p.numel() if name != "scores" else 0
    return total


@torch.no_grad()
def sparsity_report(model: nn.Module, input_size: tuple[int, ...] | None = None) -> SparsityReport:
    """Measure per-layer and total sparsity and FLOPs of ``model``.

    ``input_size`` is one input's shape ``(C, H, W)`` (or ``(features,)``); without it FLOPs
    are reported as 0. Works for masked models (density read from the masks) and plain ones
    (density from non-zero weights).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    spatial: dict[str, int] = {}
    if input_size is not None:
        hooks = []
        for name, module in layers:

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                spatial[name] = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1

            hooks.append(module.register_forward_hook(hook))
        was_training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            model(torch.zeros(1, *input_size, device=device))
        finally:
            for h in hooks:
                h.remove()
            for m, flag in was_training.items():
                m.training = flag
    report = SparsityReport(
        total_params=_dense_params(model),
        input_size=tuple(input_size) if input_size is not None else (),
    )
    for name, module in layers:
        params = module.weight.numel()
        kept = _kept_weights(module)
        # a conv weight is used once per output position; linear once (per token, 1 here)
        per = spatial.get(name, 0)
        report.layers.append(
            LayerSparsity(
                name=name,
                kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                params=params,
                kept=kept,
                density=kept / params,
                flops_dense=per * params,
                flops=per * kept,
            )
        )
    return report


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Measured density of every masked layer, ``{name: kept fraction}``."""
    return {name: mask.density() for name, (_, mask) in masked_modules(model).items()}


@torch.no_grad()
def export_dense(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight and remove the parametrisation (in place).

    The result has the plain architecture's modules and state-dict keys, and computes exactly
    what the masked model computed. Returns ``model``.
    """
    for module, _ in masked_modules(model).values():
        remove_mask(module, fold=True)
    return model
