"""VGG-16 variants.

``vgg16`` is the CIFAR VGG-16 of the HYDRA / HARP / adversarial-pruning-benchmark code: one
``features`` Sequential of bias-free 3×3 conv / BatchNorm / ReLU blocks with four max-pools (no
pool after the last block), ``avgpool`` = AdaptiveAvgPool2d(2) and a 2048-256-256-classes MLP
``classifier``. Parameters at 10 classes (formula in :func:`vgg16`): 15,311,818.

``vgg16_nobn`` is the same network without BatchNorm: HYDRA's / HARP's ``vgg16`` (their
``vgg16_bn`` is advprune's ``vgg16``). Conv / ReLU per block, so its convolutions are
``features.0, 2, 5, 7, 10, ...``, exactly HYDRA's key layout; 15,303,370 parameters at 10 classes.

``vgg16_bn`` is the classic ImageNet VGG-16-BN in torchvision's key layout (conv bias, five
max-pools, AdaptiveAvgPool2d(7), 25088-4096-4096-classes classifier with dropout);
138,365,992 parameters at 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from advprune.errors import ConfigError
from advprune.models.layers import Normalize
from advprune.models.registry import register_model

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def make_features(
    cfg: tuple[int | str, ...], in_channels: int, conv_bias: bool, batch_norm: bool = True
) -> nn.Sequential:
    """Conv(3×3, pad 1) / BatchNorm / ReLU per number (no BatchNorm unless ``batch_norm``),
    MaxPool2d(2) per ``"M"``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=conv_bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``normalize`` → ``features`` → ``avgpool`` → flatten → ``classifier``."""

    def __init__(
        self,
        features: nn.Sequential,
        avgpool: nn.Module,
        classifier: nn.Sequential,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.normalize = Normalize.identity(in_channels)
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(out, 1))


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """CIFAR VGG-16 of HYDRA/HARP; 15,311,818 parameters at 10 classes.

    Conv weights 9·(3·64 + 64·64 + 64·128 + 128·128 + 128·256 + 2·256·256 + 256·512 + 5·512·512)
    = 14,710,464; BatchNorm 2·(2·64 + 2·128 + 3·256 + 6·512) = 8,448; classifier
    2048·256+256 + 256·256+256 + 256·10+10 = 592,906.
    """
    return _cifar_vgg16(num_classes, in_channels, batch_norm=True)


@register_model("vgg16_nobn")
def vgg16_nobn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """HYDRA's / HARP's BatchNorm-free CIFAR VGG-16 (their ``vgg16``); 15,303,370 parameters at
    10 classes: :func:`vgg16`'s convolutions and classifier without its 8,448 BatchNorm ones."""
    return _cifar_vgg16(num_classes, in_channels, batch_norm=False)


def _cifar_vgg16(num_classes: int, in_channels: int, batch_norm: bool) -> VGG:
    features = make_features(VGG16_CFG[:-1], in_channels, conv_bias=False, batch_norm=batch_norm)
    classifier = nn.Sequential(
        nn.Linear(512 * 2 * 2, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    return VGG(features, nn.AdaptiveAvgPool2d(2), classifier, in_channels)


@register_model("vgg16_bn", input_size=(3, 224, 224))
def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """Classic VGG-16-BN (torchvision layout); 138,365,992 parameters at 1000 classes."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    features = make_features(VGG16_CFG, in_channels, conv_bias=True)
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, num_classes),
    )
    return VGG(features, nn.AdaptiveAvgPool2d(7), classifier, in_channels)
