"""fxprune: a structural-pruning compiler for PyTorch built on torch.fx.

Capture a model as a GraphModule with shapes, compute which channels are
coupled (channel groups), score them, choose what goes, and emit a new,
smaller GraphModule as generated code. The user's model is never modified.
"""

from . import errors
from .api import Capture, PruneResult, analyze, prune
from .capture import trace
from .channels import ChannelGroup, ChannelGroups
from .errors import (AnalysisError, ConfigError, DegenerateReferenceError, FxpruneError, InputError,
                     LoadError, PipelineError, PlanError, RewriteError, TraceError, VerificationError)
from .passes_base import Pass, Pipeline, PruneState, known_passes, parse_pipeline
from .verify import VerifyResult, verify

__version__ = "0.1.0"


def save(result_or_module, path, **kwargs):
    """Write a pruned model folder (generated source + weights); see :mod:`fxprune.io`."""
    from .io import save as _save

    return _save(result_or_module, path, **kwargs)


def load(path):
    """Load a folder written by :func:`save`; see :mod:`fxprune.io`."""
    from .io import load as _load

    return _load(path)

__all__ = [
    "AnalysisError", "Capture", "ChannelGroup", "ChannelGroups", "ConfigError",
    "DegenerateReferenceError", "FxpruneError", "InputError", "LoadError", "Pass", "Pipeline",
    "PipelineError", "PlanError", "PruneResult", "PruneState", "RewriteError", "TraceError",
    "VerificationError", "VerifyResult", "analyze", "errors", "known_passes", "load",
    "parse_pipeline", "prune", "save", "trace", "verify",
]
