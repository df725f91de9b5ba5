"""score-flap: FLAP's fluctuation; see :mod:`fxprune.activation_scores`.

A channel scores ``sample_var(x_j) * ||W[:, j]||^2`` summed over its consumers: the output
energy of its variation, which bias compensation cannot restore (An et al., "Fluctuation-based
Adaptive Structured Pruning for Large Language Models", 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxprune.activation_scores import activation_scores
from fxprune.passes_base import AnalysisPass, PruneState, register_pass


@register_pass
@dataclass(frozen=True)
class ScoreFlap(AnalysisPass):
    """FLAP's fluctuation: input variance times the squared consumer column norm.

    Calibration statistics are computed from ``data`` (``fxprune.prune(..., data=batches)``)
    unless an earlier pass left them in the state; they stay there for compensation.
    """

    name = "score-flap"
    requires = ("groups",)
    produces = ("scores", "stats")
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        scores, stats = activation_scores(state.groups, self.data, criterion="fluctuation", stats=state.stats,
                                          max_batches=self.max_batches, progress=self.progress)
        return state.replace(scores=scores, stats=stats)
