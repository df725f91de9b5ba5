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
from fxprune.rules.context import get_tensor

REDUCTIONS = ("mean", "sum", "max", "prod", "first")


@dataclass(frozen=True)
class ChannelScores:
    """One importance value per channel class (NaN where no member was scored)."""

    values: torch.Tensor
    criterion: str


def member_norms(groups: ChannelGroups, p: float):
    """For every alignment: (member index, classes, per-class p-norm of its slices)."""
    out = []
    for i, a in enumerate(groups.alignments):
        dim = a.dim
        if dim is None:
            continue
        t = get_tensor(groups.gm, a.path).detach()
        rows = t.movedim(dim, 0).reshape(t.shape[dim], -1)
        mass = torch.linalg.vector_norm(rows, ord=p, dim=1, dtype=torch.float64).pow(p)
        cls = groups.class_of[a.labels.reshape(-1)]
        uniq, inv = torch.unique(cls, return_inverse=True)
        per_class = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, mass)
        out.append((i, uniq, per_class.pow(1.0 / p)))
    return out


def reduce_members(n_classes: int, entries, reduction: str) -> torch.Tensor:
    """Reduce member scores ``[(member, classes, scores)]`` to one value per class."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown group reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    values = torch.full((n_classes,), float("nan"), dtype=torch.float64)
    if not entries:
        return values
    cls = torch.cat([c for _, c, _ in entries])
    sc = torch.cat([s for _, _, s in entries])
    member = torch.cat([torch.full_like(c, i) for i, c, _ in entries])
    has = torch.zeros(n_classes, dtype=torch.bool)
    has[cls] = True
    if reduction == "first":
        order = torch.argsort(member, stable=True).flip(0)  # last write wins: first member
        values[cls[order]] = sc[order]
        return values
    op = {"mean": "mean", "sum": "sum", "max": "amax", "prod": "prod"}[reduction]
    init = torch.zeros(n_classes, dtype=torch.float64) if op != "prod" else torch.ones(n_classes, dtype=torch.float64)
    red = init.scatter_reduce(0, cls, sc, op, include_self=False)
    values[has] = red[has]
    return values


def magnitude_scores(groups: ChannelGroups, *, p: float = 2.0, reduction: str = "mean") -> ChannelScores:
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
    return ChannelScores(values, f"l{p:g}-{reduction}")


@register_pass
@dataclass(frozen=True)
class ScoreMagnitude(AnalysisPass):
    """L1/L2 magnitude importance, reduced over each channel's group members."""

    name = "score-magnitude"
    p: float = 2.0
    reduction: str = "mean"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=magnitude_scores(state.groups, p=self.p, reduction=self.reduction))
