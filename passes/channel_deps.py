"""channel-deps: the channel-dependency analysis (``fxprune.analysis``) as a pass."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.analysis import analyze_channels
from fxprune.passes_base import AnalysisPass, PruneState, register_pass


@register_pass
@dataclass(frozen=True)
class ChannelDeps(AnalysisPass):
    """Channel-dependency analysis: ``state.groups``."""

    name = "channel-deps"
    requires = ("gm",)
    produces = ("groups",)
    policy: str = "inner"
    gqa: str = "kv_groups"
    strict: bool = True

    def run(self, state: PruneState) -> PruneState:
        return state.replace(groups=analyze_channels(state.gm, policy=self.policy,
                                                     frontend=state.frontend, gqa=self.gqa,
                                                     strict=self.strict))
