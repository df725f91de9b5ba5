"""rewrite: emit the pruned GraphModule (``fxprune.rewrite``) as a pass."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.passes_base import PruneState, TransformPass, register_pass
from fxprune.rewrite import rewrite_graph


@register_pass
@dataclass(frozen=True)
class Rewrite(TransformPass):
    """Emit the pruned GraphModule (``state.module``)."""

    name = "rewrite"
    requires = ("groups", "plan")
    produces = ("module",)

    def run(self, state: PruneState) -> PruneState:
        return state.replace(module=rewrite_graph(state.groups, state.plan.kept))
