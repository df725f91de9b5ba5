"""Sparse-training regularizers that act on the channel groups of a model.

Each regularizer analyzes the model once (``fxprune.analyze``); the traced graph
shares the user's parameter objects, so the penalty is a differentiable function
of the very parameters the user's optimizer updates. It fits a normal training
loop in either of two ways::

    reg = fxprune.regularize.GroupLasso(model, x, reg=1e-4)
    for xb, yb in loader:
        loss = criterion(model(xb), yb)
        loss.backward()
        reg.step()             # adds the penalty's gradient into .grad (and advances)
        opt.step(); opt.zero_grad()

or ``loss = loss + reg.penalty()`` followed by ``reg.advance()`` once per
iteration. Only the removable channels (prunable, not ignored) are penalized;
biases (conv/linear biases, norm shifts) are penalized with the weights unless
``bias=False`` (Torch-Pruning's default), so that a channel driven to zero
outputs zero and removing it changes little.
Training ends in an ordinary :func:`fxprune.prune`; ``reg.prune(ratio=...)``
does that with this regularizer's importance (``reg.importance()``), which ranks
the channels it drove to zero lowest.

- :class:`Slimming`: L1 on the scales of the norm layers (Liu et al., "Learning
  Efficient Convolutional Networks through Network Slimming").
- :class:`GroupLasso`: DepGraph's group sparsity (Fang et al., "DepGraph:
  Towards Any Structural Pruning"): every member of a channel's group (weight
  rows and columns, norm scales) gets an L2 penalty scaled by
  ``gamma = 2 ** (alpha * (I_max - I) / (I_max - I_min))`` within its group, so
  channels with a small group norm ``I`` are pushed up to ``2 ** alpha`` times harder.
- :class:`GrowingReg`: growing regularization (Wang et al., "Neural Pruning via
  Growing Regularization", GReg-1): the channels a criterion selects as
  unimportant get an L2 penalty whose factor grows by ``delta`` every
  ``interval`` iterations up to ``ceiling``; then they are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._util import as_tuple
from .api import PruneResult, check_model, qualified_names, scoring_pass, analyze, prune
from .channels import ChannelGroups
from .errors import ConfigError
from .passes_base import AnalysisPass, PruneState
from .rules.context import get_tensor
from .scoring import WEIGHT_ROLES, ChannelScores

__all__ = ["Regularizer", "Slimming", "GroupLasso", "GrowingReg", "RegularizerScores"]


# -- pure helpers ---------------------------------------------------------------
def _members(groups: ChannelGroups, kind: str, bias: bool) -> list[tuple[str, int, torch.Tensor]]:
    """(path, dim, class per index along dim) of the tensors a regularizer of ``kind`` acts on:
    norm scales ('slimming') or every weight member ('group'); biases only with ``bias``."""
    from fxprune.passes.score_bn_scale import is_norm_scale

    nodes = {n.name: n for n in groups.gm.graph.nodes}
    out = []
    for a in groups.alignments:
        if a.dim is None or a.role not in WEIGHT_ROLES:
            continue
        if kind == "slimming" and not is_norm_scale(a, nodes):
            continue
        if kind == "group" and not bias and a.path.rsplit(".", 1)[-1] == "bias":
            continue
        if not isinstance(get_tensor(groups.gm, a.path), nn.Parameter):
            continue
        out.append((a.path, a.dim, groups.class_of[a.labels.reshape(-1)]))
    return out


def class_sums(groups: ChannelGroups, members, power: int) -> torch.Tensor:
    """Per class: the sum of ``|w| ** power`` over every member's slices (differentiable)."""
    total = None
    for path, dim, cls in members:
        t = get_tensor(groups.gm, path)
        per_index = t.abs().pow(power).movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)
        part = torch.zeros(groups.n_classes, dtype=t.dtype, device=t.device)
        part = part.index_add(0, cls.to(t.device), per_index)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        return torch.zeros(groups.n_classes)
    return total


def _has_member(groups: ChannelGroups, members) -> torch.Tensor:
    has = torch.zeros(groups.n_classes, dtype=torch.bool)
    for _, _, cls in members:
        has[cls] = True
    return has


def _check_positive(value: Any, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and \
        (value >= 0 if allow_zero else value > 0) and value != float("inf")
    if not ok:
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite "
                          f"number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RegularizerScores(AnalysisPass):
    """The importance a regularizer trains for, as a scoring pass for :func:`fxprune.prune`:
    the summed ``|scale|`` of the norm layers ('slimming') or the group L2 norm ('group')."""

    name = "score-regularizer"
    requires = ("groups",)
    produces = ("scores",)
    kind: str = "group"
    bias: bool = True

    def run(self, state: PruneState) -> PruneState:
        members = _members(state.groups, self.kind, self.bias)
        with torch.no_grad():
            sums = class_sums(state.groups, members, 1 if self.kind == "slimming" else 2)
        values = sums.detach().cpu().double()
        values = values if self.kind == "slimming" else values.sqrt()
        values[~_has_member(state.groups, members)] = float("nan")
        return state.replace(scores=ChannelScores(values, f"regularizer-{self.kind}"))


# -- the regularizers -------------------------------------------------------------
class Regularizer:
    """Base class: the analysis, the penalized members and the training-loop API.

    Subclasses define :meth:`weights` (a detached per-class factor) and the power
    of the penalty (1: L1, 2: squared L2); ``penalty = sum_c weights[c] * sum_c``.
    """

    kind = "group"
    power = 2

    def __init__(self, model: nn.Module, example_inputs: Any, *, ignore=(), bias: bool = True,
                 leaf_modules=(), concrete_args=None):
        check_model(model)
        self.model = model
        self.example_inputs = as_tuple(example_inputs)
        self.ignore = qualified_names(model, ignore, "ignore")
        self.bias = bool(bias)
        self.analysis_options = dict(leaf_modules=tuple(leaf_modules), concrete_args=concrete_args)
        self.groups = analyze(model, self.example_inputs, **self.analysis_options)
        self.members = _members(self.groups, self.kind, self.bias)
        from fxprune.plan import candidates

        active = torch.zeros(self.groups.n_classes, dtype=torch.bool)
        for cand in candidates(self.groups, self.ignore).values():
            active[cand] = True
        self.active = active & _has_member(self.groups, self.members)
        mine = {id(p) for p in model.parameters()}
        self.parameters = list({id(p): p for p in (get_tensor(self.groups.gm, path) for path, _, _ in
                                                   self.members) if id(p) in mine}.values())
        self.iteration = 0

    def sums(self) -> torch.Tensor:
        """Per class: the summed ``|w| ** power`` over the penalized members (differentiable)."""
        return class_sums(self.groups, self.members, self.power)

    def channel_norms(self) -> torch.Tensor:
        """Per class: the L2 norm over every weight member of its group (detached, CPU)."""
        with torch.no_grad():
            members = _members(self.groups, "group", self.bias)
            return class_sums(self.groups, members, 2).detach().cpu().double().sqrt()

    def weights(self, sums: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """The regularization term to add to the loss (a scalar tensor with a graph)."""
        if not bool(self.active.any()):
            return torch.zeros(())
        sums = self.sums()
        w = self.weights(sums.detach()).to(sums.device, sums.dtype)
        return (w * sums)[self.active.to(sums.device)].sum()

    def step(self) -> None:
        """Add the penalty's gradient into each parameter's ``.grad``, then :meth:`advance`."""
        with torch.enable_grad():
            penalty = self.penalty()
        if self.parameters and penalty.requires_grad:  # nothing to do when no channel is penalized
            grads = torch.autograd.grad(penalty, self.parameters, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(self.parameters, grads):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.detach().clone()
                    else:
                        p.grad.add_(g)
        self.advance()

    def advance(self) -> None:
        """Count one training iteration (call it once per iteration when using :meth:`penalty`)."""
        self.iteration += 1

    def importance(self) -> RegularizerScores:
        """The scoring pass that ranks the channels this regularizer drives to zero lowest."""
        return RegularizerScores(kind=self.kind, bias=self.bias)

    def prune(self, **options: Any) -> PruneResult:
        """:func:`fxprune.prune` of the model with :meth:`importance` (unless given) and ``ignore``."""
        options.setdefault("importance", self.importance())
        options.setdefault("ignore", self.ignore)
        for key, value in self.analysis_options.items():
            options.setdefault(key, value)
        return prune(self.model, self.example_inputs, **options)


class Slimming(Regularizer):
    """``reg * sum |gamma|`` over the scales of the norm layers (network slimming)."""

    kind = "slimming"
    power = 1

    def __init__(self, model: nn.Module, example_inputs: Any, *, reg: float = 1e-4, **options: Any):
        self.reg = _check_positive(reg, "reg")
        super().__init__(model, example_inputs, **options)
        if not bool(self.active.any()):
            raise ConfigError("Slimming found no norm layer scale on a prunable channel; use "
                              "GroupLasso for models without BatchNorm/GroupNorm/LayerNorm")

    def weights(self, sums: torch.Tensor) -> torch.Tensor:
        return torch.full_like(sums, self.reg)


class GroupLasso(Regularizer):
    """DepGraph's group sparsity: ``reg / 2 * sum gamma_c * ||w_c||^2`` over every member.

    ``gamma_c = 2 ** (alpha * (I_max - I_c) / (I_max - I_min))`` with ``I`` the group
    L2 norm of each channel, computed within its group and treated as a constant.

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    >>> reg = fxprune.regularize.GroupLasso(net, torch.randn(2, 3, 4, 4), reg=1e-3)
    >>> net(torch.randn(2, 3, 4, 4)).sum().backward()
    >>> reg.step()  # adds d(penalty)/dw to every member's .grad
    >>> reg.iteration, bool(reg.penalty() > 0)
    (1, True)
    """

    kind = "group"

    def __init__(self, model: nn.Module, example_inputs: Any, *, reg: float = 1e-4, alpha: float = 4.0,
                 **options: Any):
        self.reg = _check_positive(reg, "reg")
        self.alpha = _check_positive(alpha, "alpha", allow_zero=True)
        super().__init__(model, example_inputs, **options)

    def gamma(self, sums: torch.Tensor) -> torch.Tensor:
        """The per-class shrink factor in [1, 2 ** alpha] (1 where a group's norms are equal)."""
        norm = sums.detach().cpu().double().sqrt()
        gid = self.groups.group_of_class.clamp_min(0)
        big = torch.where(self.active, norm, torch.full_like(norm, -float("inf")))
        small = torch.where(self.active, norm, torch.full_like(norm, float("inf")))
        n = len(self.groups.groups) or 1
        hi = torch.full((n,), -float("inf"), dtype=norm.dtype).scatter_reduce(0, gid, big, "amax")[gid]
        lo = torch.full((n,), float("inf"), dtype=norm.dtype).scatter_reduce(0, gid, small, "amin")[gid]
        span = hi - lo
        rel = torch.where(span > 0, (hi - norm) / span.clamp_min(1e-30), torch.zeros_like(norm))
        return torch.where(self.active, 2.0 ** (self.alpha * rel), torch.ones_like(norm))

    def weights(self, sums: torch.Tensor) -> torch.Tensor:
        return self.reg / 2 * self.gamma(sums)


class GrowingReg(Regularizer):
    """Growing L2 regularization of the channels selected as unimportant (GReg-1).

    At construction, ``importance`` scores the channels and ``ratio`` (with the
    selection options ``global_ranking``, ``round_to``, ...) selects the unimportant
    ones: exactly those :func:`fxprune.prune` would remove now. They get
    ``lam / 2 * ||w_c||^2``; ``lam`` starts at ``delta`` and grows by ``delta`` every
    ``interval`` iterations up to ``ceiling`` (then :attr:`done` is true).
    """

    kind = "group"

    def __init__(self, model: nn.Module, example_inputs: Any, *, ratio: float = 0.5,
                 importance: Any = "l1", delta: float = 1e-4, interval: int = 10, ceiling: float = 1.0,
                 data: Any = None, loss_fn: Any = None, select_options: dict | None = None,
                 **options: Any):
        from fxprune.plan import check_ratio, select_channels

        self.ratio = check_ratio(ratio)
        self.delta = _check_positive(delta, "delta")
        self.ceiling = _check_positive(ceiling, "ceiling")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be a positive integer (iterations between growth "
                              f"steps), got {interval!r}")
        self.interval = interval
        super().__init__(model, example_inputs, **options)
        self.select_options = dict(select_options or {})
        scorer = scoring_pass(importance, data, loss_fn)
        state = PruneState(model=model, example_inputs=self.example_inputs, gm=self.groups.gm,
                           groups=self.groups)
        scores = scorer.run(state).scores
        plan = select_channels(self.groups, scores, ratio=self.ratio, ignore=self.ignore,
                               **self.select_options)
        self.selected = ~plan.kept
        self.active = self.active & self.selected
        self.lam = self.delta

    @property
    def done(self) -> bool:
        """Whether the penalty factor has reached the ceiling (time to prune)."""
        return self.lam >= self.ceiling

    def advance(self) -> None:
        super().advance()
        if self.iteration % self.interval == 0:
            self.lam = min(self.lam + self.delta, self.ceiling)

    def weights(self, sums: torch.Tensor) -> torch.Tensor:
        return torch.full_like(sums, self.lam / 2)

    def prune(self, **options: Any) -> PruneResult:
        """Prune with the ratio and selection options the channels were chosen with."""
        options.setdefault("ratio", self.ratio)
        for key, value in self.select_options.items():
            options.setdefault(key, value)
        return super().prune(**options)
