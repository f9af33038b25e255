"""Pruning methods: plug-ins declaring their taxonomy entry and stages."""

from advprune.methods.base import (
    PIPELINES,
    Method,
    Taxonomy,
    create_method,
    list_methods,
    method_class,
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
    "register_method",
]
