"""Pruning methods: plug-ins declaring their taxonomy entry and stages."""

from advprune.methods.base import (
    PIPELINES,
    Method,
    Taxonomy,
    create_method,
    list_methods,
    method_class,
    method_from_config,
    register_method,
)
from advprune.methods.lwm import LWM

__all__ = [
    "LWM",
    "PIPELINES",
    "Method",
    "Taxonomy",
    "create_method",
    "list_methods",
    "method_class",
    "method_from_config",
    "register_method",
]
