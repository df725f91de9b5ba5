"""score-activation: activation magnitude (Minitron); see :mod:`fxprune.activation_scores`.

A channel scores the RMS over samples of its mean |activation| where its consumers read it
(Minitron, Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", 2024), summed over its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxprune.activation_scores import activation_scores
from fxprune.passes_base import AnalysisPass, PruneState, register_pass


@register_pass
@dataclass(frozen=True)
class ScoreActivation(AnalysisPass):
    """Minitron's activation magnitude at the channel's consumers.

    Calibration statistics are computed from ``data`` (``fxprune.prune(..., data=batches)``)
    unless an earlier pass left them in the state; they stay there for compensation.
    """

    name = "score-activation"
    requires = ("groups",)
    produces = ("scores", "stats")
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        scores, stats = activation_scores(state.groups, self.data, criterion="activation", stats=state.stats,
                                          max_batches=self.max_batches, progress=self.progress)
        return state.replace(scores=scores, stats=stats)
