"""score-wanda: structured Wanda (Wanda-sp); see :mod:`fxprune.activation_scores`.

A channel scores ``mean_rows |W[:, j]| * rms(x_j)`` summed over its consumers: the weights
that read it, weighted by how large it is on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxprune.activation_scores import activation_scores
from fxprune.passes_base import AnalysisPass, PruneState, register_pass


@register_pass
@dataclass(frozen=True)
class ScoreWanda(AnalysisPass):
    """Structured Wanda: consumer weight magnitude times the input channel's RMS.

    Calibration statistics are computed from ``data`` (``fxprune.prune(..., data=batches)``)
    unless an earlier pass left them in the state; they stay there for compensation.
    """

    name = "score-wanda"
    requires = ("groups",)
    produces = ("scores", "stats")
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        scores, stats = activation_scores(state.groups, self.data, criterion="wanda", stats=state.stats,
                                          max_batches=self.max_batches, progress=self.progress)
        return state.replace(scores=scores, stats=stats)
