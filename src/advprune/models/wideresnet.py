"""WideResNet-28-k (Zagoruyko & Komodakis, 2016) in the RobustBench key layout.

``conv1`` stem; ``block{1,2,3}.layer.{i}`` pre-activation blocks with ``bn1, relu1, conv1, bn2,
relu2, conv2`` and ``convShortcut`` where input and output widths differ; final ``bn1``,
``relu`` and ``fc``. Convolutions have no bias; ``fc`` has one.

Parameter count at 10 classes and 3 input channels, with widths w1, w2, w3 = 16k, 32k, 64k and
n = 4 blocks per group (each first block: bn(in) + 3×3 conv in→out + bn(out) + 3×3 conv out→out
+ 1×1 shortcut in→out; the other three: 2·bn(out) + 2 convs out→out)::

    stem 3·16·9 = 432; final bn 2·w3; fc 10·w3 + 10
    k = 4:  group1 47,264 + 3·73,984 = 269,216; group2 229,760 + 3·295,424 = 1,116,032;
            group3 918,272 + 3·1,180,672 = 4,460,288; total 432 + 269,216 + 1,116,032
            + 4,460,288 + 512 + 2,570 = 5,849,050  (the ~5.85M usually quoted for WRN-28-4)
    k = 10: 36,479,194 (RobustBench ``Standard`` WRN-28-10)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from advprune.errors import ConfigError
from advprune.models.layers import Normalize
from advprune.models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in the reference: the projection sees the activated input, the identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``n`` blocks stored as ``layer`` (an nn.Sequential)."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                           drop_rate)
                for i in range(n)
            ]
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k for 32×32 inputs (global average pooling, so other sizes work too)."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize.identity(in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_channels = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


@register_model("wrn28_4")
def wrn28_4(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WideResNet-28-4; 5,849,050 parameters at 10 classes."""
    return WideResNet(28, 4, num_classes, in_channels, drop_rate)


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WideResNet-28-10; 36,479,194 parameters at 10 classes."""
    return WideResNet(28, 10, num_classes, in_channels, drop_rate)
