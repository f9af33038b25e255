"""Model zoo: CIFAR ResNets, VGG-16 variants, WideResNets, CNN-7 and a small digits CNN.

All models take inputs in [0, 1] and normalise them in their first module, ``normalize``::

    from advprune.models import create
    model = create("resnet18", num_classes=10, mean=(0.4914, 0.4822, 0.4465),
                   std=(0.2471, 0.2435, 0.2616))
"""

from advprune.models import cnn, resnet, small, vgg, wideresnet  # noqa: F401  (registers models)
from advprune.models.cnn import CNN7
from advprune.models.layers import Normalize
from advprune.models.registry import (
    ModelSpec,
    create,
    default_input_size,
    list_models,
    register_model,
)
from advprune.models.resnet import ResNet
from advprune.models.small import DigitsCNN
from advprune.models.vgg import VGG
from advprune.models.wideresnet import WideResNet

__all__ = [
    "CNN7",
    "VGG",
    "DigitsCNN",
    "ModelSpec",
    "Normalize",
    "ResNet",
    "WideResNet",
    "create",
    "default_input_size",
    "list_models",
    "register_model",
]
