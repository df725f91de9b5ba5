"""Activation-aware channel importance from calibration statistics
(:mod:`fxprune.statistics`): how much a channel contributes to what its consumers
compute, not only how large its weights are.

For every linear consumer input of a channel (a linear or conv layer's input) with
statistics ``x`` and the consumer's weight ``W`` (columns along the input channels):

- ``wanda``: structured Wanda (Wanda-sp): ``mean_rows |W[:, j]| * rms(x_j)``;
- ``fluctuation`` (FLAP): ``sample_var(x_j) * ||W[:, j]||^2``, the output energy the
  channel's variation carries, which a constant (its mean, see bias compensation)
  cannot replace;
- ``activation`` (Minitron): ``sqrt(mean over samples of (mean |x_j|)^2)``, no weight.

A channel's score is the sum over its consumers. A group whose consumers have no
weight (attention's q and k feed a dot product) is scored by its consumer
activations alone (``wanda`` by the RMS, ``fluctuation`` by the variance); a group
without any observed consumer by the activations of its producers; a group with
neither by the L2 magnitude of its members. Conv inputs have channels too: the same
formulas hold, a kernel's spatial taps counted as rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .channels import ChannelGroups
from .errors import ConfigError
from .passes_base import AnalysisPass, PruneState
from .rules.context import get_tensor
from .scoring import ChannelScores, magnitude_scores
from .statistics import ActivationStats, ChannelStats, collect_statistics, consumer_sites, producer_sites

__all__ = ["ACTIVATION_CRITERIA", "ActivationScorePass", "activation_scores"]

ACTIVATION_CRITERIA = ("wanda", "fluctuation", "activation")


def _activation_term(criterion: str, st: ChannelStats) -> torch.Tensor:
    if criterion == "wanda":
        return st.rms
    if criterion == "fluctuation":
        return st.sample_var
    return st.sample_abs_rms if st.samples else st.abs_mean


def _weight_term(criterion: str, w: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Per input position along ``dim`` of weight ``w``: the factor of the criterion."""
    w = w.detach().double().movedim(dim, 0).reshape(w.shape[dim], -1)
    if criterion == "wanda":
        return w.abs().mean(1)
    if criterion == "fluctuation":
        return w.pow(2).sum(1)
    return None


def _scatter(n: int, cls: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, cls, v)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[cls] = True
    return total, seen


def activation_scores(groups: ChannelGroups, data: Iterable | None = None, *, criterion: str = "wanda",
                      stats: ActivationStats | None = None, max_batches: int | None = None,
                      progress: bool | None = None) -> tuple[ChannelScores, ActivationStats]:
    """Scores of every channel class by an activation-aware ``criterion`` (``wanda``,
    ``fluctuation`` or ``activation``), and the statistics they came from (computed from
    ``data`` unless ``stats`` is given).

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.eye(2)); _ = net[1].weight.copy_(torch.tensor([[1.0, 3.0]]))
    >>> g = fxprune.analyze(net, torch.randn(1, 2))
    >>> x = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])  # channel 0: rms 1, channel 1: rms 1
    >>> s, _ = activation_scores(g, [x], criterion="wanda")
    >>> [float(s.values[c]) for c in g.prunable[0].classes]  # |W[:, j]| * rms(x_j)
    [1.0, 3.0]
    """
    if criterion not in ACTIVATION_CRITERIA:
        raise ConfigError(f"unknown activation criterion {criterion!r}; use one of {', '.join(ACTIVATION_CRITERIA)}")
    if stats is None:
        stats = collect_statistics(groups, data, max_batches=max_batches, progress=progress,
                                   criterion=f"score-{criterion}")
    n = groups.n_classes
    weighted = torch.zeros(n, dtype=torch.float64)
    has_weighted = torch.zeros(n, dtype=torch.bool)
    plain = torch.zeros(n, dtype=torch.float64)
    has_plain = torch.zeros(n, dtype=torch.bool)
    weights_of: dict[str, list] = {}
    for a in groups.alignments:
        if a.role == "in" and a.dim is not None:
            weights_of.setdefault(a.node, []).append(a)
    for (node, _pos), site in consumer_sites(groups).items():
        st = stats.stats.get(site.key)
        if st is None or st.count == 0:
            continue
        cls_x = groups.class_of[site.labels.reshape(-1)]
        act = _activation_term(criterion, st)
        got = _scatter(n, cls_x, act)
        plain += got[0]
        has_plain |= got[1]
        for a in weights_of.get(node, ()):
            w = get_tensor(groups.gm, a.path)
            wt = _weight_term(criterion, w, a.dim)
            if wt is None:
                continue
            cls_w = groups.class_of[a.labels.reshape(-1)]
            if cls_w.numel() == cls_x.numel() and bool((cls_w == cls_x).all()):
                got = _scatter(n, cls_x, wt * act)  # column j reads input channel j
            else:  # columns and channels meet only through their classes (grouped, flattened)
                wsum, wseen = _scatter(n, cls_w, wt)
                asum, aseen = _scatter(n, cls_x, act)
                acount = torch.zeros(n, dtype=torch.float64).index_add_(0, cls_x, torch.ones_like(act))
                got = (wsum * asum / acount.clamp_min(1), wseen & aseen)
            weighted += got[0]
            has_weighted |= got[1]
    produced = torch.zeros(n, dtype=torch.float64)
    has_produced = torch.zeros(n, dtype=torch.bool)
    for site in producer_sites(groups).values():
        st = stats.stats.get(site.key)
        if st is not None and st.count:
            got = _scatter(n, groups.class_of[site.labels.reshape(-1)], _activation_term(criterion, st))
            produced += got[0]
            has_produced |= got[1]
    values = torch.full((n,), float("nan"), dtype=torch.float64)
    fallback = None
    for g in groups.groups:
        idx = torch.tensor(g.classes, dtype=torch.int64)
        for total, has in ((weighted, has_weighted), (plain, has_plain), (produced, has_produced)):
            if bool(has[idx].any()):
                values[idx] = torch.where(has[idx], total[idx], torch.zeros_like(total[idx]))
                break
        else:
            if fallback is None:
                fallback = magnitude_scores(groups).values
            values[idx] = fallback[idx]
    return ChannelScores(values, criterion), stats


@dataclass(frozen=True)
class ActivationScorePass(AnalysisPass):
    """Base of the activation-aware scoring passes: a subclass names its pass and its
    ``criterion``. Calibration statistics are computed from ``data``
    (``fxprune.prune(..., data=batches)``) unless an earlier pass left them in the
    state; they stay there for compensation."""

    criterion: ClassVar[str] = ""
    requires = ("groups",)
    produces = ("scores", "stats")
    max_batches: int | None = None
    progress: bool | None = None
    data: Any = field(default=None, repr=False, compare=False)

    def run(self, state: PruneState) -> PruneState:
        scores, stats = activation_scores(state.groups, self.data, criterion=self.criterion, stats=state.stats,
                                          max_batches=self.max_batches, progress=self.progress)
        return state.replace(scores=scores, stats=stats)
