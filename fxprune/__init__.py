"""fxprune: a structural-pruning compiler for PyTorch built on torch.fx.

Capture a model as a GraphModule with shapes, compute which channels are
coupled (channel groups), score them, choose what goes, and emit a new,
smaller GraphModule as generated code. The user's model is never modified.
"""

from . import errors
from .api import Capture, PruneResult, analyze, prune
from .backend import backend  # the torch.compile backend factory (the module is fxprune.backend in sys.modules)
from .capture import trace
from .channels import ChannelGroup, ChannelGroups
from .dead_channels import eliminate_dead_channels
from .io import load, save
from .iterative import IterativeResult, iterative
from . import regularize
from .errors import (AnalysisError, ConfigError, DegenerateReferenceError, FxpruneError, InputError,
                     LoadError, PipelineError, PlanError, RewriteError, RuleError, SaveError, TraceError,
                     Unsupported, VerificationError)
from .passes_base import Pass, Pipeline, PruneState, known_passes, parse_pipeline
from .verify import VerifyResult, verify
from .writeback import apply

__version__ = "0.1.0"

__all__ = ["AnalysisError", "Capture", "ChannelGroup", "ChannelGroups", "ConfigError", "DegenerateReferenceError",
           "FxpruneError", "InputError", "IterativeResult", "LoadError", "Pass", "Pipeline", "PipelineError",
           "PlanError", "PruneResult", "PruneState", "RewriteError", "RuleError", "SaveError", "TraceError",
           "Unsupported", "VerificationError", "VerifyResult", "analyze", "apply", "backend", "eliminate_dead_channels",
           "errors", "iterative",
           "known_passes", "load", "parse_pipeline", "prune", "regularize", "save", "trace", "verify"]

