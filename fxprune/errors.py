"""The typed exceptions of fxprune, rooted in :class:`FxpruneError`.

Every error names what went wrong (the node, module or argument) and the fix.
"""


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be captured as a torch.fx graph."""


class InputError(FxpruneError, ValueError):
    """The example inputs do not fit the model (shape, dtype or arity)."""


class ConfigError(FxpruneError, ValueError):
    """An option is out of range or names something that does not exist."""


class AnalysisError(FxpruneError):
    """The channel-dependency analysis met an inconsistency it cannot resolve."""


class Unsupported(FxpruneError):
    """An op rule declines a node it does not analyse (an argument form, a computed weight):
    the analysis pins the node's channels and records the reason. Any other exception
    a rule raises is a bug in the rule."""


class RuleError(AnalysisError):
    """An op rule failed with an unexpected exception: a bug in the rule, never a
    deliberate refusal (those raise :class:`Unsupported`)."""


class PlanError(FxpruneError):
    """A requested plan cannot be satisfied under the group constraints."""


class RewriteError(FxpruneError):
    """The rewrite could not produce a valid smaller graph (an internal invariant broke)."""


class VerificationError(FxpruneError, AssertionError):
    """The pruned model does not match the oracle."""


class DegenerateReferenceError(VerificationError):
    """The reference output is too small or constant for a comparison to prove anything."""


class SaveError(FxpruneError, ValueError):
    """A model cannot be written as a folder that loads without fxprune."""


class LoadError(FxpruneError):
    """A saved model folder is missing files or is corrupt."""


class PipelineError(ConfigError):
    """A pipeline string or pass name is malformed or unknown."""
