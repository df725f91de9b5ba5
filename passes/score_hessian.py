"""score-hessian: second-order importance in the manner of Optimal Brain Damage
(LeCun et al., 1989), computed over every member of a group.

OBD's saliency of weight ``w`` is ``0.5 * h * w**2`` with ``h`` the diagonal of
the loss Hessian. The diagonal is estimated by the empirical Fisher information
from the calibration batches, ``h ≈ mean_b g_b**2`` with ``g_b`` the gradient of
batch ``b``'s loss (batches of one sample give the per-sample Fisher; larger
batches scale every entry alike, which leaves rankings unchanged for equal batch
sizes). A member's slice of a channel scores ``sum_s 0.5 * h_s * w_s**2``; member
values are reduced over the group and optionally normalized. See
:mod:`fxprune.calibration` for batches, the default loss and how the user's model
is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxprune.calibration import calibrate
from fxprune.channels import ChannelGroups
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, check_options, gradient_paths, group_scores, member_sums


def hessian_scores(groups: ChannelGroups, data: Iterable, loss_fn: Callable | None = None, *,
                   reduction: str = "mean", normalizer: str = "none", progress: bool | None = None,
                   max_batches: int | None = None) -> ChannelScores:
    """OBD importance ``0.5 * w**2 * diag(H)`` (empirical Fisher) of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
    ...     _ = m[1].weight.copy_(torch.tensor([[3.0, 1.0]]))
    >>> g = fxprune.analyze(m, torch.ones(1, 1))
    >>> s = hessian_scores(g, [torch.ones(1, 1)], reduction="first")  # dL/dw1 = 5 * w2
    >>> [float(s.values[c]) for c in g.prunable[0].classes]  # 0.5 * w1^2 * (5 w2)^2
    [112.5, 50.0]
    """
    check_options(reduction, normalizer)
    fisher: dict[str, torch.Tensor] = {}

    def update(grads):
        for p, g in grads.items():
            fisher[p] = fisher[p] + g.pow(2) if p in fisher else g.pow(2)

    n = calibrate(groups, data, loss_fn, gradient_paths(groups), update, criterion="score-hessian",
                  progress=progress, max_batches=max_batches)
    entries = member_sums(groups, lambda p, t: 0.5 * t.double().pow(2) * (fisher[p] / n) if p in fisher else None,
                          WEIGHT_ROLES)
    return group_scores(groups, entries, f"hessian-{reduction}", reduction=reduction, normalizer=normalizer)


@register_pass
@dataclass(frozen=True)
class ScoreHessian(AnalysisPass):
    """Second-order (OBD) importance on calibration data.

    ``data`` and ``loss_fn`` cannot be written in a pipeline string: give them to
    ``fxprune.prune(..., pipeline="...,score-hessian,...", data=batches, loss_fn=...)``.
    """

    name = "score-hessian"
    requires = ("groups",)
    produces = ("scores",)
    reduction: str = "mean"
    normalizer: str = "none"
    progress: bool | None = None
    max_batches: int | None = None
    data: Any = field(default=None, repr=False, compare=False)
    loss_fn: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=hessian_scores(
            state.groups, self.data, self.loss_fn, reduction=self.reduction, normalizer=self.normalizer,
            progress=self.progress, max_batches=self.max_batches))
