"""How the attacks of an evaluation run the model: the same function, faster kernels.

:func:`attack_view` wraps the model for the attacks (never for the clean pass, whose
gradient and determinism checks look at the model itself):

- ``compile``: forward passes without gradients (Square's 5,000 queries, FAB's and
  AutoAttack's own checks, advprune's re-checks of every returned point) run through one
  ``torch.compile``'d graph (dynamic batch size, so the shrinking sets of points still
  robust do not recompile); forward passes that need gradients (APGD's and FAB's steps) stay
  eager, exactly as before. Compiling costs seconds once per process (inductor caches the
  code on disk for later runs); on a 2-core CPU it bought no more than channels-last did and
  cost more than it saved end to end (``benchmarks/results/forward_kernels.md`` and
  ``eval_throughput.md``), so it is off by default.
- ``channels_last`` (default on CUDA): 4-D inputs and a copy of the model's weights in
  channels-last memory format (faster convolutions on tensor cores, and on a CPU about 1.75x
  faster forward and 1.3x faster forward + gradient passes for the digits CNN); the caller's
  model is left as it was.

Neither changes what is computed, only the kernels that compute it, so logits differ from
the eager model's by float rounding at most; ``tests/test_eval_forward.py`` checks that
AutoAttack's per-sample outcomes on a digits model are the same either way.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from advprune.errors import ConfigError

__all__ = ["AttackView", "attack_view", "full_fp32", "use_channels_last"]


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """The ``channels_last`` setting resolved: ``None`` means on for CUDA, off elsewhere."""
    return device.type == "cuda" if setting is None else bool(setting)


class AttackView(nn.Module):
    """``model`` as the attacks see it (see the module docstring). Its ``model`` attribute is
    the module run eagerly (the caller's, or its channels-last copy)."""

    def __init__(self, model: nn.Module, *, compile: bool, channels_last: bool) -> None:
        super().__init__()
        if channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.model = model
        self.channels_last = channels_last
        # kept out of the module tree: the compiled module shares ``model``'s parameters
        self.__dict__["_compiled"] = torch.compile(model, dynamic=True) if compile else None
        self._checked = False

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__["_compiled"]
        if compiled is None or torch.is_grad_enabled():
            return self.model(x)
        if self._checked:
            return compiled(x)
        try:  # the first call compiles: a machine without a C++ compiler fails here
            out = compiled(x)
        except Exception as e:  # any compiler failure, re-raised in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"torch.compile could not compile the model's forward pass ({first[:200]}); "
                "run the evaluation without --compile (compile=False)"
            ) from e
        self._checked = True
        return out


def attack_view(
    model: nn.Module, *, compile: bool = False, channels_last: bool | None = None
) -> nn.Module:
    """The model for the attacks: ``model`` itself when neither option is on, else an
    :class:`AttackView`. ``channels_last=None``: on where the model's parameters are on CUDA."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    cl = use_channels_last(channels_last, device)
    if not compile and not cl:
        return model
    return AttackView(model, compile=compile, channels_last=cl)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full precision (IEEE) inside the block,
    the previous settings restored after it. PyTorch lets cuDNN run float32 convolutions in
    TF32 (10-bit mantissa) on Ampere and later GPUs by default; an evaluation stays fp32."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9
        matmul = torch.backends.cuda.matmul
        before = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = before
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
