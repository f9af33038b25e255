"""Batch data augmentation as pure tensor operations (runs on any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advprune.errors import ConfigError

__all__ = ["RandomCropFlip"]


class RandomCropFlip:
    """Random crop after zero padding plus random horizontal flip, per sample of a batch.

    ``aug(x)`` takes ``(N, C, H, W)`` (or a single ``(C, H, W)`` image) and returns a tensor of
    the same shape, dtype and device. Random numbers are drawn in this order, from ``generator``
    (on the generator's device) or else from the default generator of ``x``'s device:
    ``dy = randint(0, 2p+1, (N,))``, ``dx = randint(0, 2p+1, (N,))``, then
    ``flip = rand(N) < 0.5`` (only when ``flip`` is on). Sample ``n`` becomes
    ``pad(x, p)[n, :, dy:dy+H, dx:dx+W]``, mirrored left-right where ``flip[n]``.
    With ``padding=0`` and ``flip=False`` the input is returned unchanged.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"padding must be an integer >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch ``(N, C, H, W)``; see the class docstring for the exact recipe."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"RandomCropFlip expects a (N, C, H, W) tensor, got {shape}")
        if x.dim() == 3:
            return self(x.unsqueeze(0), generator).squeeze(0)
        p = self.padding
        if (p == 0 and not self.flip) or x.shape[0] == 0:
            return x
        n, c, h, w = x.shape
        dev = generator.device if generator is not None else x.device
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev).to(x.device)
        cols = torch.arange(w, device=x.device).expand(n, w)
        if self.flip:
            mirror = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
            cols = torch.where(mirror[:, None], cols.flip(-1), cols)
        rows = dy[:, None] + torch.arange(h, device=x.device)
        cols = dx[:, None] + cols
        padded = F.pad(x, (p, p, p, p)) if p else x
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
