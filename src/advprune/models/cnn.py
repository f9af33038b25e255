"""CNN-7: the seven-layer convolutional network of certified training.

The ``cnn_7layer_bn`` of Shi et al. ("Fast Certified Robust Training with Short Warmup",
NeurIPS 2021) and auto_LiRPA, the standard model of IBP / CROWN-IBP training on CIFAR-10:
five 3×3 conv-BN-ReLU layers (widths w, w, 2w, 2w, 2w; the third has stride 2; the
convolutions have no bias since BatchNorm follows each), a linear
layer of ``linear_width`` units with BatchNorm1d and ReLU, and the classifier. Layout:
``normalize``, ``features`` (Conv2d at 0, 3, 6, 9, 12; BatchNorm2d one index later),
``classifier`` (Linear at 0 and 3, BatchNorm1d at 1). Every operation is supported by the
IBP / CROWN bounds of :mod:`advprune.certify`.

The flattened size depends on the input, so the factory takes ``image_size`` (32 for
CIFAR / SVHN, 8 for the embedded digits).
"""

from __future__ import annotations

import torch
from torch import nn

from advprune.errors import ConfigError
from advprune.models.layers import Normalize
from advprune.models.registry import register_model


class CNN7(nn.Module):
    """``normalize`` → ``features`` → flatten → ``classifier``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        linear_width: int = 512,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        w = width
        self.normalize = Normalize.identity(in_channels)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in ((w, 1), (w, 1), (2 * w, 2), (2 * w, 1), (2 * w, 1)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = (image_size + 1) // 2  # the stride-2 conv (k=3, padding 1)
        self.classifier = nn.Sequential(
            nn.Linear(2 * w * side * side, linear_width),
            nn.BatchNorm1d(linear_width),
            nn.ReLU(),
            nn.Linear(linear_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@register_model("cnn7")
def cnn7(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    linear_width: int = 512,
    image_size: int = 32,
) -> CNN7:
    """CNN-7 with BatchNorm (Shi et al. 2021); 17,192,138 parameters at 10 classes, 3
    channels, width 64, linear width 512 and 32×32 inputs: bias-free convolutions
    9·(3·64 + 64·64 + 64·128 + 2·128·128) = 407,232, BatchNorm 2·(64+64+128+128+128) + 2·512
    = 2,048, first linear 32,768·512 + 512 = 16,777,728, classifier 5,130."""
    return CNN7(
        num_classes,
        in_channels,
        _positive_int(width, "width"),
        _positive_int(linear_width, "linear_width"),
        _positive_int(image_size, "image_size"),
    )
