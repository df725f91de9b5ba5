"""score-magnitude: L1/L2 magnitude importance (Li et al., "Pruning Filters for
Efficient ConvNets"), computed over every member of a group (DepGraph's
group-level variant): each member's slice of a channel gets a norm, and the
norms of a channel's members are reduced (mean, sum, max, prod or first).
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import magnitude_scores


@register_pass
@dataclass(frozen=True)
class ScoreMagnitude(AnalysisPass):
    """L1/L2 magnitude importance, reduced over each channel's group members."""

    name = "score-magnitude"
    requires = ("groups",)
    produces = ("scores",)
    p: float = 2.0
    reduction: str = "mean"
    normalizer: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=magnitude_scores(state.groups, p=self.p, reduction=self.reduction,
                                                     normalizer=self.normalizer))
