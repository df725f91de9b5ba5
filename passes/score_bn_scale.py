"""score-bn-scale: the scale of the normalization layers (Liu et al., "Learning
Efficient Convolutional Networks through Network Slimming", 2017).

A channel scores ``|gamma|``, the absolute affine weight of every batch, instance,
group or layer norm that scales it; when a group holds several norm layers (the
norms on both sides of a residual add), their values are reduced (mean, sum, max,
prod, first) and optionally normalized within groups.

Groups with no norm layer score NaN, which ``select`` treats as +inf: they are
never removed before a scored channel (with local ranking and a ratio they still
lose their share, in index order). ``fallback="l1"`` or ``"l2"`` scores such
groups by weight magnitude instead (``score-magnitude`` with the same reduction).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.fx

from fxprune.channels import Alignment, ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import (ChannelScores, check_options, magnitude_scores, member_sums, normalize_scores,
                             reduce_members)

FALLBACKS = ("none", "l1", "l2")


def is_norm_scale(a: Alignment, nodes: dict[str, torch.fx.Node]) -> bool:
    """Whether alignment ``a`` is the affine weight (not the bias) of a norm layer."""
    if a.role != "norm":
        return False
    node = nodes.get(a.node)
    if node is not None and node.op == "call_module":
        return a.path == f"{node.target}.weight"
    if node is not None and node.op == "call_function":
        try:
            weight = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("weight")
        except (TypeError, ValueError):  # a builtin without a Python signature
            weight = None
        if isinstance(weight, torch.fx.Node):
            return weight.op == "get_attr" and weight.target == a.path
    return a.path.rsplit(".", 1)[-1] == "weight"


def bn_scale_scores(groups: ChannelGroups, *, reduction: str = "mean", normalizer: str = "none",
                    fallback: str = "none") -> ChannelScores:
    """``|gamma|`` of the norm layers over every channel class (NaN where there is none).

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 1, 1))
    >>> with torch.no_grad():
    ...     _ = m[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    >>> g = fxprune.analyze(m, torch.randn(2, 1, 4, 4))
    >>> s = bn_scale_scores(g)
    >>> [float(s.values[c]) for c in g.prunable[0].classes]
    [0.5, 2.0, 1.0]
    """
    check_options(reduction, normalizer)
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown bn-scale fallback {fallback!r}; use one of {', '.join(FALLBACKS)} "
                          f"('none' leaves groups without a norm layer unscored: NaN)")
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    scales = {a.path for a in groups.alignments if is_norm_scale(a, nodes)}
    entries = member_sums(groups, lambda p, t: t.abs() if p in scales else None, ("norm",))
    values = reduce_members(groups.n_classes, entries, reduction)
    if fallback != "none":
        magnitude = magnitude_scores(groups, p=1.0 if fallback == "l1" else 2.0, reduction=reduction).values
        for g in groups.groups:
            idx = torch.tensor(g.classes)
            if bool(torch.isnan(values[idx]).all()):
                values[idx] = magnitude[idx]
    return ChannelScores(normalize_scores(groups, values, normalizer), f"bn-scale-{reduction}")


@register_pass
@dataclass(frozen=True)
class ScoreBnScale(AnalysisPass):
    """Network-slimming importance ``|gamma|`` of the norm layers in each group."""

    name = "score-bn-scale"
    requires = ("groups",)
    produces = ("scores",)
    reduction: str = "mean"
    normalizer: str = "none"
    fallback: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=bn_scale_scores(state.groups, reduction=self.reduction,
                                                    normalizer=self.normalizer, fallback=self.fallback))
