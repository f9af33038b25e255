"""CIFAR-style ResNets in the kuangliu/pytorch-cifar key layout.

3×3 stem convolution with stride 1 and no max-pool; every convolution has no bias and is followed
by BatchNorm; projection shortcuts are ``layer{k}.0.shortcut.{0,1}`` (1×1 conv, BatchNorm) and
the classifier is ``linear``. Parameter counts at 10 classes: ResNet-18 11,173,962,
ResNet-34 21,282,122, ResNet-50 23,520,842.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advprune.models.layers import Normalize
from advprune.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity or 1×1 projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4) with an identity or 1×1 projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """CIFAR ResNet: ``normalize``, stem ``conv1``/``bn1``, ``layer1..4``, pool, ``linear``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.normalize = Normalize.identity(in_channels)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); 11,173,962 parameters at 10 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); 21,282,122 parameters at 10 classes."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); 23,520,842 parameters at 10 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
