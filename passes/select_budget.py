"""select-budget: the least-pruned plan that meets a MACs and/or parameter budget
(``fxprune.budget``) as a pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fxprune.budget import select_for_budget
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.plan import ratio_pairs


@register_pass
@dataclass(frozen=True)
class SelectBudget(AnalysisPass):
    """Scores to the least-pruned PrunePlan that meets a MACs/parameter budget."""

    name = "select-budget"
    requires = ("groups", "scores")
    produces = ("plan",)
    target_macs: Any = None
    target_params: Any = None
    ratios: tuple = field(default_factory=tuple)
    ignore: tuple = field(default_factory=tuple)
    round_to: int = 1
    global_ranking: bool = False
    max_ratio: float = 1.0
    isomorphic: bool = False
    adaptive: bool = False
    cost: str = "params"

    def run(self, state: PruneState) -> PruneState:
        plan = select_for_budget(state.groups, state.scores, state.example_inputs,
                                 target_macs=self.target_macs, target_params=self.target_params,
                                 ratios=ratio_pairs(self.ratios), ignore=tuple(self.ignore),
                                 round_to=self.round_to,
                                 global_ranking=self.global_ranking, max_ratio=self.max_ratio,
                                 isomorphic=self.isomorphic, adaptive=self.adaptive, cost=self.cost)
        return state.replace(plan=plan)
