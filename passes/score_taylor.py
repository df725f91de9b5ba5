"""score-taylor: first-order Taylor importance (Molchanov et al., "Pruning
Convolutional Neural Networks for Resource Efficient Inference", 2017, and
"Importance Estimation for Neural Network Pruning", 2019), computed over every
member of a group (DepGraph's group-level variant).

Removing weight ``w`` changes the loss by about ``-g * w`` (``g = dL/dw``). Two
variants, both on gradients of the calibration loss (see
:mod:`fxprune.calibration` for batches, the default loss and how the user's model
is left untouched):

- ``"abs"`` (default, as Torch-Pruning's ``TaylorImportance``): the gradient is
  averaged over the batches first, ``g = mean_b g_b`` (the gradient of the mean
  calibration loss), and a member's slice of a channel scores ``sum_s |w_s * g_s|``.
- ``"squared"`` (Molchanov 2019, "Taylor FO on weights"): per batch, the signed
  sum over the slice is squared, ``(sum_s w_s * g_b,s)**2``, and averaged over
  the batches; per-batch squaring keeps gradients that cancel across batches.

Member values are reduced over the group (mean, sum, max, prod, first) and
optionally normalized within groups; everything accumulates in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


from fxprune.calibration import calibrate
from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, check_options, gradient_paths, group_scores, member_sums

VARIANTS = ("abs", "squared")


def taylor_scores(groups: ChannelGroups, data: Iterable, loss_fn: Callable | None = None, *,
                  variant: str = "abs", reduction: str = "mean", normalizer: str = "none",
                  progress: bool | None = None, max_batches: int | None = None) -> ChannelScores:
    """First-order Taylor importance of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
    ...     _ = m[1].weight.copy_(torch.tensor([[3.0, 1.0]]))
    >>> g = fxprune.analyze(m, torch.ones(1, 1))
    >>> s = taylor_scores(g, [torch.ones(1, 1)], reduction="first")  # y = 5, loss 0.5 y^2, dL/dy = 5
    >>> [float(s.values[c]) for c in g.prunable[0].classes]  # |w1 * 5 * w2|
    [15.0, 10.0]
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown Taylor variant {variant!r}; use one of {', '.join(VARIANTS)}")
    check_options(reduction, normalizer)
    paths = gradient_paths(groups)
    acc: dict[Any, Any] = {}

    if variant == "abs":  # accumulate the gradient itself
        def update(grads):
            for p, g in grads.items():
                acc[p] = acc[p] + g if p in acc else g
    else:  # accumulate each member's squared per-channel sum of w * g
        def update(grads):
            for i, c, v in member_sums(groups, lambda p, t: t.double() * grads[p] if p in grads else None,
                                       WEIGHT_ROLES):
                acc[i] = (c, acc[i][1] + v.pow(2) if i in acc else v.pow(2))

    n = calibrate(groups, data, loss_fn, paths, update, criterion="score-taylor", progress=progress,
                  max_batches=max_batches)
    if variant == "abs":
        entries = member_sums(groups, lambda p, t: (t.double() * (acc[p] / n)).abs() if p in acc else None,
                              WEIGHT_ROLES)
    else:
        entries = [(i, c, total / n) for i, (c, total) in acc.items()]
    return group_scores(groups, entries, f"taylor-{variant}-{reduction}", reduction=reduction,
                        normalizer=normalizer)


@register_pass
@dataclass(frozen=True)
class ScoreTaylor(AnalysisPass):
    """First-order Taylor importance ``|w * dL/dw|`` on calibration data.

    ``data`` and ``loss_fn`` cannot be written in a pipeline string: give them to
    ``fxprune.prune(..., pipeline="...,score-taylor,...", data=batches, loss_fn=...)``.
    """

    name = "score-taylor"
    requires = ("groups",)
    produces = ("scores",)
    variant: str = "abs"
    reduction: str = "mean"
    normalizer: str = "none"
    progress: bool | None = None
    max_batches: int | None = None
    data: Any = field(default=None, repr=False, compare=False)
    loss_fn: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=taylor_scores(
            state.groups, self.data, self.loss_fn, variant=self.variant, reduction=self.reduction,
            normalizer=self.normalizer, progress=self.progress, max_batches=self.max_batches))
