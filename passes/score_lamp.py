"""score-lamp: layer-adaptive magnitude-based pruning (Lee et al., "Layer-adaptive
Sparsity for the Magnitude-based Pruning", ICLR 2021), at channel granularity and
over every member of a group.

Within each member (a weight's rows, another weight's columns, a norm's scales),
channel ``c`` has squared norm ``s_c = sum of w**2`` over its slice; its LAMP score
is ``s_c / sum of s_d over the channels d of that member with s_d >= s_c`` (ties
count each other, so tied channels score alike). The largest channel of every
member scores 1, so members, and groups, of very different scales become
comparable: the intended use is ``global_ranking=True``. Member scores are reduced
over the group and optionally normalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.channels import ChannelGroups
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, check_options, group_scores, member_sums


def lamp(s: torch.Tensor) -> torch.Tensor:
    """LAMP scores of squared magnitudes ``s``: ``s_i / sum(s[s >= s_i])``.

    Examples
    --------
    >>> lamp(torch.tensor([1.0, 4.0, 2.0, 4.0], dtype=torch.float64)).tolist()  # 1/11, 4/8, 2/10, 4/8
    [0.09090909090909091, 0.5, 0.2, 0.5]
    """
    asc, order = torch.sort(s)
    tail = asc.flip(0).cumsum(0).flip(0)  # tail[k] = sum(asc[k:])
    first = torch.searchsorted(asc, asc)  # first position of each value's tie block
    out = torch.empty_like(s)
    out[order] = asc / tail[first].clamp_min(torch.finfo(s.dtype).tiny)
    return out


def lamp_scores(groups: ChannelGroups, *, reduction: str = "mean", normalizer: str = "none") -> ChannelScores:
    """LAMP importance of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1, bias=False), torch.nn.Conv2d(3, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
    ...     _ = m[1].weight.fill_(1.0)
    >>> g = fxprune.analyze(m, torch.randn(1, 1, 4, 4))
    >>> s = lamp_scores(g, reduction="first")  # squares 1, 4, 9: 1/14, 4/13, 9/9
    >>> [round(float(s.values[c]), 4) for c in g.prunable[0].classes]
    [0.0714, 0.3077, 1.0]
    """
    check_options(reduction, normalizer)
    entries = [(i, c, lamp(v)) for i, c, v in member_sums(groups, lambda p, t: t.double().pow(2), WEIGHT_ROLES)]
    return group_scores(groups, entries, f"lamp-{reduction}", reduction=reduction, normalizer=normalizer)


@register_pass
@dataclass(frozen=True)
class ScoreLamp(AnalysisPass):
    """LAMP importance, per member, reduced over each group."""

    name = "score-lamp"
    requires = ("groups",)
    produces = ("scores",)
    reduction: str = "mean"
    normalizer: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=lamp_scores(state.groups, reduction=self.reduction,
                                                normalizer=self.normalizer))
