"""rewrite: emit the pruned GraphModule (``fxprune.rewrite``) as a pass, with bias
compensation (``fxprune.compensate``) on request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fxprune.compensate import COMPENSATIONS, apply_compensation, compensation_fills
from fxprune.errors import ConfigError
from fxprune.passes_base import PruneState, TransformPass, register_pass
from fxprune.rewrite import rewrite_graph
from fxprune.statistics import collect_statistics


@register_pass
@dataclass(frozen=True)
class Rewrite(TransformPass):
    """Emit the pruned GraphModule (``state.module``).

    ``compensate="bias"``: each removed channel's calibration mean is folded into the
    biases of its linear/conv consumers; the statistics are those an activation-aware
    scoring pass left in the state, or are computed from ``data``.
    """

    name = "rewrite"
    requires = ("groups", "plan")
    produces = ("module",)
    compensate: str | None = None
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        if self.compensate not in COMPENSATIONS:
            raise ConfigError(f"compensate={self.compensate!r} is not one of 'bias' or None")
        module = rewrite_graph(state.groups, state.plan.kept)
        if self.compensate in (None, "none"):
            return state.replace(module=module)
        stats = state.stats
        if stats is None:
            stats = collect_statistics(state.groups, self.data, producers=False, max_batches=self.max_batches,
                                       progress=self.progress, criterion="compensate='bias'")
        comp = compensation_fills(state.groups, state.plan.kept, stats)
        apply_compensation(module, state.groups, state.plan.kept, comp)
        return state.replace(module=module, stats=stats, plan=dataclasses.replace(state.plan, compensation=comp))
