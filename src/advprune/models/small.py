"""Small models for fast CPU experiments."""

from __future__ import annotations

import torch
from torch import nn

from advprune.errors import ConfigError
from advprune.models.layers import Normalize
from advprune.models.registry import register_model


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks, two max-pools, adaptive 2×2 pool and a two-layer MLP.

    Layout: ``features`` (conv indices 0, 3, 7; BatchNorm 1, 4, 8), ``avgpool``, ``classifier``
    (Linear at 0 and 2). Made for 1×8×8 sklearn digits; adaptive pooling makes any input of at
    least 4×4 work (e.g. 1×28×28).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.normalize = Normalize.identity(in_channels)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * 2 * 2, 8 * w),
            nn.ReLU(),
            nn.Linear(8 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(out, 1))


@register_model("digits_cnn", input_size=(1, 8, 8))
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DigitsCNN:
    """CNN for 1×8×8 digits; 226,794 parameters at 10 classes, 1 channel and width 32."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"width must be an integer >= 1, got {width!r}")
    return DigitsCNN(num_classes, in_channels, width)
