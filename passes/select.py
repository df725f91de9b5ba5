"""select: scores to a PrunePlan (``fxprune.plan``) as a pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.plan import ratio_pairs, select_channels


@register_pass
@dataclass(frozen=True)
class Select(AnalysisPass):
    """Scores to a PrunePlan."""

    name = "select"
    requires = ("groups", "scores")
    produces = ("plan",)
    ratio: float = 0.5
    ratios: tuple = field(default_factory=tuple)
    ignore: tuple = field(default_factory=tuple)
    round_to: int = 1
    global_ranking: bool = False
    max_ratio: float = 1.0
    isomorphic: bool = False
    adaptive: bool = False
    cost: str = "params"
    exact_heads: bool = False

    def options(self) -> dict:
        """The keyword arguments of :func:`select_channels` this pass passes."""
        return dict(ratio=self.ratio, ratios=ratio_pairs(self.ratios), ignore=tuple(self.ignore),
                    round_to=self.round_to,
                    global_ranking=self.global_ranking, max_ratio=self.max_ratio,
                    isomorphic=self.isomorphic, exact_heads=self.exact_heads, adaptive=self.adaptive,
                    cost=self.cost)

    def run(self, state: PruneState) -> PruneState:
        return state.replace(plan=select_channels(state.groups, state.scores, **self.options()))
