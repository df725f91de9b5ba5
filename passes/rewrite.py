"""rewrite: emit the pruned GraphModule (``fxprune.rewrite``) as a pass, with bias
compensation (``fxprune.compensate``) on request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from fxprune.compensate import COMPENSATIONS, apply_compensation, compensation_fills, refit_statistics
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
    scoring pass left in the state, or are computed from ``data``. ``compensate="lsq"``:
    linear consumers are refit by ridge least squares on their input Gram matrices
    (the ridge chosen on held-out batches), the others get the bias.
    """

    name = "rewrite"
    requires = ("groups", "plan")
    produces = ("module",)
    compensate: str | None = None
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def unused_options(self) -> tuple[str, ...]:
        """``data`` serves compensation only."""
        return ("data",) if self.compensate in (None, "none") else ()

    def run(self, state: PruneState) -> PruneState:
        if self.compensate not in COMPENSATIONS:
            raise ConfigError(f"compensate={self.compensate!r} is not one of 'bias', 'lsq' or None")
        module = rewrite_graph(state.groups, state.plan.kept)
        if self.compensate in (None, "none"):
            return state.replace(module=module)
        data = self.data
        fit = None
        if self.compensate == "lsq":
            if data is not None and not isinstance(data, (list, tuple, torch.Tensor)):
                data = list(data)  # read twice: the Gram halves, then the means
            fit = refit_statistics(state.groups, state.plan.kept, data, max_batches=self.max_batches,
                                   progress=self.progress)
        stats = state.stats
        if stats is None:
            stats = collect_statistics(state.groups, data, producers=False, max_batches=self.max_batches,
                                       progress=self.progress, criterion=f"compensate={self.compensate!r}")
        comp = compensation_fills(state.groups, state.plan.kept, stats, fit)
        apply_compensation(module, state.groups, state.plan.kept, comp)
        return state.replace(module=module, stats=stats, plan=dataclasses.replace(state.plan, compensation=comp))
