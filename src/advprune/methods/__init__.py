"""Pruning methods: plug-ins declaring their taxonomy entry and stages."""

from advprune.methods.base import (
    Method,
    create_method,
    list_methods,
    method_class,
    method_from_config,
    register_method,
)
from advprune.methods.binary import BinarySubnet
from advprune.methods.harp import HARP
from advprune.methods.hydra import HYDRA, HydraMask
from advprune.methods.lwm import LWM, IterativeLWM
from advprune.methods.taxonomy import PIPELINES, Taxonomy

__all__ = [
    "HARP",
    "HYDRA",
    "LWM",
    "PIPELINES",
    "BinarySubnet",
    "HydraMask",
    "IterativeLWM",
    "Method",
    "Taxonomy",
    "create_method",
    "list_methods",
    "method_class",
    "method_from_config",
    "register_method",
]
