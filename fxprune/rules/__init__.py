"""Per-op channel rules, one file per op family; importing this package fills
the registry (``fxprune.rules.registry``) with one op spec per op."""

from . import (concat, contract, conv, embedding, gather, indexing, layout, norm, pointwise,  # noqa: F401
               recurrent, reduce, spectral, torchvision_ops, views, windows)
from . import aten  # noqa: F401  (after the rules it maps ATen ops onto)
from .registry import OpSpec, Rule, lookup, register

__all__ = ["OpSpec", "Rule", "lookup", "register"]
