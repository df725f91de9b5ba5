"""Shared machinery of the scoring passes: per-member, per-channel sums of an
elementwise importance map, reduction over a group's members, and group-level
normalization (DepGraph's group scoring).

A scoring pass computes, for every aligned tensor (a *member*: weight rows, weight
columns, norm parameters), an elementwise map of the same shape (``|w|^p``,
``|w * dL/dw|``, ...); :func:`member_sums` adds it up per channel class, and
:func:`reduce_members` combines the members of each class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .channels import ChannelGroups
from .errors import ConfigError
from .labels import concat_tagged
from .rules.context import get_tensor

REDUCTIONS = ("mean", "sum", "max", "prod", "first")
NORMALIZERS = ("none", "mean", "max", "sum", "standardization", "gaussian")


@dataclass(frozen=True, eq=False)
class ChannelScores:
    """One importance value per channel class (NaN where no member was scored)."""

    values: torch.Tensor
    criterion: str


MemberEntry = tuple[int, torch.Tensor, torch.Tensor]  # (alignment index, classes, per-class value)


def member_sums(groups: ChannelGroups, elementwise: Callable[[str, torch.Tensor], torch.Tensor | None],
                roles: tuple[str, ...] | None = None,
                summed: Callable[[str, torch.Tensor, list[int]], torch.Tensor] | None = None,
                ) -> list[MemberEntry]:
    """For every member (alignment with a channel dim, optionally of the given roles):
    the classes it holds and the sum of ``elementwise(path, tensor)`` over each class's slices.

    ``elementwise`` returns a tensor of the member's shape (or None to skip the member);
    it is a function of the tensor, computed once for the consecutive members of one
    tensor (a weight's rows and columns) and then dropped, so memory stays one map. The
    map is first summed over the dims no member of that tensor uses (a conv kernel's
    spatial dims), contiguously and once, so each member only reduces that small core.
    ``summed(path, tensor, dims)``, where given, computes that sum (keepdim) in one pass
    without materializing the map (a norm kernel for magnitudes).
    """
    member_dims: dict[str, set[int]] = {}
    for a in groups.alignments:
        if a.dim is not None and (roles is None or a.role in roles):
            member_dims.setdefault(a.path, set()).add(a.dim)
    index, labels, values = [], [], []
    computed: dict[str, torch.Tensor | None] = {}  # at most the current tensor's core
    for i, a in enumerate(groups.alignments):
        dim = a.dim
        if dim is None or (roles is not None and a.role not in roles):
            continue
        t = get_tensor(groups.gm, a.path)
        if a.path not in computed:
            computed.clear()
            rest = [d for d in range(t.ndim) if d not in member_dims[a.path] and t.shape[d] > 1]
            if summed is not None and rest:
                value = summed(a.path, t.detach(), rest)
            else:
                value = elementwise(a.path, t.detach())
                if value is not None and rest:
                    value = value.sum(rest, keepdim=True)
            computed[a.path] = value
        value = computed[a.path]
        if value is None:
            continue
        others = [d for d in range(value.ndim) if d != dim and value.shape[d] > 1]
        index.append(i)
        labels.append(a.labels)
        values.append((value.sum(others) if others else value).reshape(-1).expand(t.shape[dim]))
    if not index:
        return []
    # one class lookup for all members; a member's classes are usually distinct and in
    # order (its labels were numbered along it), and only the others need a unique
    flat, tag = concat_tagged(labels)
    cls = groups.class_of[flat]
    sums = torch.cat([v.cpu() for v in values]).double()
    sizes = [v.numel() for v in values]
    out: list[MemberEntry] = list(zip(index, cls.split(sizes), sums.split(sizes)))
    unordered = (cls[1:] <= cls[:-1]) & (tag[1:] == tag[:-1])
    for m in torch.unique(tag[1:][unordered]).tolist():
        i, c, v = out[m]
        uniq, inv = torch.unique(c, return_inverse=True)
        out[m] = (i, uniq, torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, v))
    return out


def reduce_members(n_classes: int, entries: list[MemberEntry], reduction: str) -> torch.Tensor:
    """Combine member values into one value per class (mean, sum, max, prod or first)."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown group reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    values = torch.full((n_classes,), float("nan"), dtype=torch.float64)
    if not entries:
        return values
    cls = torch.cat([c for _, c, _ in entries])
    sc = torch.cat([s for _, _, s in entries])
    member = torch.repeat_interleave(torch.arange(len(entries)), torch.tensor([c.numel() for _, c, _ in entries]))
    if reduction == "first":
        order = torch.argsort(member, stable=True).flip(0)  # last write wins: the first member
        values[cls[order]] = sc[order]
        return values
    op = {"mean": "mean", "sum": "sum", "max": "amax", "prod": "prod"}[reduction]
    has = torch.zeros(n_classes, dtype=torch.bool)
    has[cls] = True
    red = torch.zeros(n_classes, dtype=torch.float64).scatter_reduce(0, cls, sc, op, include_self=False)
    values[has] = red[has]
    return values


def normalize_scores(groups: ChannelGroups, values: torch.Tensor, method: str = "none") -> torch.Tensor:
    """Normalize scores within each group so that groups can be ranked together."""
    if method not in NORMALIZERS:
        raise ConfigError(f"unknown normalizer {method!r}; use one of {', '.join(NORMALIZERS)}")
    if method == "none":
        return values
    out = values.clone()
    for g in groups.groups:
        idx = torch.tensor(g.classes)
        v = values[idx]
        ok = ~torch.isnan(v)
        if not bool(ok.any()):
            continue
        w = v[ok]
        if method == "mean":
            w = w / w.mean().clamp_min(1e-30)
        elif method == "max":
            w = w / w.max().clamp_min(1e-30)
        elif method == "sum":
            w = w / w.sum().clamp_min(1e-30)
        elif method == "standardization":
            w = (w - w.min()) / (w.max() - w.min()).clamp_min(1e-30)
        else:  # gaussian
            w = (w - w.mean()) / w.std(unbiased=False).clamp_min(1e-30) if w.numel() > 1 else w * 0
        v[ok] = w
        out[idx] = v
    return out


WEIGHT_ROLES = ("out", "in", "channel", "norm", "free")  # every member but running statistics


def check_options(reduction: str, normalizer: str) -> None:
    """Raise :class:`ConfigError` for an unknown reduction or normalizer (before any work)."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown group reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if normalizer not in NORMALIZERS:
        raise ConfigError(f"unknown normalizer {normalizer!r}; use one of {', '.join(NORMALIZERS)}")


def member_classes(groups: ChannelGroups, index: int) -> torch.Tensor:
    """The channel class of every position along alignment ``index``'s channel dim."""
    return groups.class_of[groups.alignments[index].labels.reshape(-1)]


def group_scores(groups: ChannelGroups, entries: list[MemberEntry], criterion: str, *,
                 reduction: str = "mean", normalizer: str = "none") -> ChannelScores:
    """Reduce per-member values over each group's members, normalize within groups."""
    values = reduce_members(groups.n_classes, entries, reduction)
    return ChannelScores(normalize_scores(groups, values, normalizer), criterion)


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


def gradient_paths(groups: ChannelGroups) -> list[str]:
    """Paths of the members a gradient criterion scores (every member but running stats)."""
    return list(dict.fromkeys(a.path for a in groups.alignments
                              if a.dim is not None and a.role in WEIGHT_ROLES))
