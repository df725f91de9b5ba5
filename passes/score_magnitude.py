"""score-magnitude: L1/L2 magnitude importance (Li et al., "Pruning Filters for
Efficient ConvNets"), computed over every member of a group (DepGraph's
group-level variant): each member's slice of a channel gets a norm, and the
norms of a channel's members are reduced (mean, sum, max, prod or first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, member_sums, normalize_scores, reduce_members


def member_norms(groups: ChannelGroups, p: float) -> list:
    """For every member: (member index, classes, per-class p-norm of its slices)."""
    buffer: list[torch.Tensor] = []

    def power(path, t):
        # member_sums only sums this map (it is dropped before the next tensor's): a map
        # that varies along two dims is written into one reused buffer, since a fresh
        # multi-megabyte tensor costs more in first-touch page faults than the squares
        out = None
        if sum(n > 1 for n in t.shape) >= 2:
            if not buffer or buffer[0].numel() < t.numel() or buffer[0].dtype != t.dtype \
                    or buffer[0].device != t.device:
                buffer[:] = [torch.empty(t.numel(), dtype=t.dtype, device=t.device)]
            out = buffer[0][:t.numel()].view(t.shape)
        if p == 2:
            return torch.mul(t, t, out=out) if out is not None else t * t
        a = torch.abs(t, out=out) if out is not None else t.abs()
        return a if p == 1 else a.pow_(p)

    def norm(path, t, dims):  # the same sums, in one pass: no |w|^p map is allocated
        return torch.linalg.vector_norm(t, p, dim=dims, keepdim=True).pow(p)

    entries = member_sums(groups, power, roles=WEIGHT_ROLES, summed=norm)
    if not entries:
        return []
    roots = torch.cat([v for _, _, v in entries]).pow(1.0 / p).split([v.numel() for _, _, v in entries])
    return [(i, c, v) for (i, c, _), v in zip(entries, roots)]


def magnitude_scores(groups: ChannelGroups, *, p: float = 2.0, reduction: str = "mean",
                     normalizer: str = "none") -> ChannelScores:
    """Magnitude importance of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.Conv2d(2, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.copy_(torch.tensor([[[[3.0]]], [[[1.0]]]]))
    ...     _ = m[1].weight.copy_(torch.tensor([[[[1.0]], [[1.0]]]]))
    >>> g = fxprune.analyze(m, torch.randn(1, 1, 4, 4))
    >>> s = magnitude_scores(g, p=1, reduction="sum")
    >>> [float(s.values[c]) for c in g.prunable[0].classes]
    [4.0, 2.0]
    """
    if p <= 0:
        raise ConfigError(f"magnitude norm p must be > 0, got {p}")
    values = reduce_members(groups.n_classes, member_norms(groups, p), reduction)
    return ChannelScores(normalize_scores(groups, values, normalizer), f"l{p:g}-{reduction}")


@register_pass
@dataclass(frozen=True)
class ScoreMagnitude(AnalysisPass):
    """L1/L2 magnitude importance, reduced over each channel's group members."""

    name = "score-magnitude"
    p: float = 2.0
    reduction: str = "mean"
    normalizer: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=magnitude_scores(state.groups, p=self.p, reduction=self.reduction,
                                                     normalizer=self.normalizer))
