"""eliminate-dead-channels: remove the channels that provably carry only a constant,
folding it into the consumers' biases (``fxprune.dead_channels``); lossless."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.dead_channels import eliminate
from fxprune.passes_base import PruneState, TransformPass, register_pass


@register_pass
@dataclass(frozen=True)
class EliminateDeadChannels(TransformPass):
    """Plan and rewrite in one: the dead channels go, the model computes what it did.

    ``threshold``: weights at most this fraction of their tensor's largest count as zero
    (0, the default, is exact)."""

    name = "eliminate-dead-channels"
    requires = ("groups",)
    produces = ("scores", "plan", "module")
    threshold: float = 0.0
    probes: int = 4
    seed: int = 0

    def run(self, state: PruneState) -> PruneState:
        plan, module, scores = eliminate(state.groups, state.example_inputs, threshold=self.threshold,
                                         probes=self.probes, seed=self.seed)
        return state.replace(scores=scores, plan=plan, module=module)
