"""score-fpgm: filter pruning via geometric median (He et al., "Filter Pruning via
Geometric Median for Deep Convolutional Neural Networks Acceleration", CVPR 2019),
over every member of a group.

Within each member, channel ``c``'s filter is its slice of the weight (a conv's
output filter, a consumer's input column; a channel that occupies several
positions, as after a flatten, has them concatenated). Its score is the sum of
its distances (``p``-norm, Euclidean by default) to the filters of every other
channel of that member: a filter close to the geometric median is replaceable by
the others and goes first. Only weights with at least two dims are filters;
biases and norm parameters are not scored (a group without any scores NaN).
Member scores are reduced over the group and optionally normalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.rules.context import get_tensor
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, check_options, group_scores, member_classes


def distance_sums(rows: torch.Tensor, cls: torch.Tensor, p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of ``rows`` (one class per row) and, per class, the summed ``p``-distance
    of its filter (its rows concatenated) to the other classes' filters.

    Examples
    --------
    >>> rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    >>> [round(v, 6) for v in distance_sums(rows, torch.tensor([0, 1, 2]))[1].tolist()]  # 5+1, 5+√18, 1+√18
    [6.0, 9.242641, 5.242641]
    """
    uniq, counts = torch.unique(cls, return_counts=True)
    rows = rows.to(torch.float64)
    if bool((counts == counts[0]).all()):
        filters = rows[torch.argsort(cls, stable=True)].reshape(uniq.numel(), -1)
        return uniq, torch.cdist(filters[None], filters[None], p=p)[0].sum(1)
    # classes of unequal widths: per-row distances, summed per class
    per_row = torch.cdist(rows[None], rows[None], p=p)[0].sum(1)
    inv = torch.unique(cls, return_inverse=True)[1]
    return uniq, torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, per_row)


def fpgm_scores(groups: ChannelGroups, *, p: float = 2.0, reduction: str = "mean",
                normalizer: str = "none") -> ChannelScores:
    """Geometric-median importance of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]))
    >>> g = fxprune.analyze(m, torch.randn(1, 2))
    >>> s = fpgm_scores(g, reduction="first")
    >>> [round(float(s.values[c]), 3) for c in g.prunable[0].classes]
    [6.0, 9.243, 5.243]
    """
    check_options(reduction, normalizer)
    if not p > 0:
        raise ConfigError(f"fpgm distance norm p must be > 0, got {p!r}")
    entries = []
    for i, a in enumerate(groups.alignments):
        t = get_tensor(groups.gm, a.path)
        if a.dim is None or a.role not in WEIGHT_ROLES or t.ndim < 2 or not t.is_floating_point():
            continue
        rows = t.detach().movedim(a.dim, 0).reshape(t.shape[a.dim], -1).cpu()
        entries.append((i, *distance_sums(rows, member_classes(groups, i), p)))
    return group_scores(groups, entries, f"fpgm-{reduction}", reduction=reduction, normalizer=normalizer)


@register_pass
@dataclass(frozen=True)
class ScoreFpgm(AnalysisPass):
    """Geometric-median (FPGM) importance, per member, reduced over each group."""

    name = "score-fpgm"
    requires = ("groups",)
    produces = ("scores",)
    p: float = 2.0
    reduction: str = "mean"
    normalizer: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=fpgm_scores(state.groups, p=self.p, reduction=self.reduction,
                                                normalizer=self.normalizer))
