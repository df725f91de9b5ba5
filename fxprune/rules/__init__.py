"""Per-op channel rules, one file per op family; importing this package fills
the registry (``fxprune.rules.registry``)."""

from . import contract, conv, embedding, norm, pointwise, recurrent, reduce, shape, torchvision_ops  # noqa: F401
from . import aten  # noqa: F401  (after the rules it maps ATen ops onto)
from .registry import Rule, lookup, register

__all__ = ["Rule", "lookup", "register"]
