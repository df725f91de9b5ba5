"""The channel data model as the analysis hands it on: channel groups with their
members, constraints and exactness (docs/how-it-works.md, "The channel data model")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .labels import channel_dim


@dataclass(frozen=True)
class Alignment:
    """The tensor at ``path`` (a parameter or buffer of the traced module) is sliced
    by the classes of ``labels`` (a normalized label tensor broadcastable to it)."""

    path: str
    labels: torch.Tensor
    # "out" (weight rows), "in" (weight columns), "channel" (depthwise rows), "norm" (norm
    # affine), "stat" (running statistics), "free" (a free parameter such as a layer scale)
    role: str
    node: str

    @property
    def dim(self) -> int | None:
        return channel_dim(self.labels)


@dataclass(frozen=True)
class Member:
    """One tensor slice set of a group: which tensor, along which dim, in which role."""

    path: str
    dim: int | None
    role: str

    def __str__(self) -> str:
        return f"{self.path}[{self.role}{'' if self.dim is None else f', dim {self.dim}'}]"


@dataclass(frozen=True, eq=False)
class MixSite:
    """An op that mixes the values of a channel dim (``node``; the channels ``labels``):
    removing some of them changes the kept values. ``masked`` evaluates the op as if the
    removed channels were absent (see ``fxprune.masked``); None when no such semantics
    is known, and then the oracle cannot check a plan that removes those channels."""

    node: str
    labels: torch.Tensor
    reason: str
    masked: Any = None


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: a connected set of channel classes.

    ``classes`` are the channel classes (one decision each); ``prunable`` the ones
    that may go; ``exact`` tells whether removing them leaves every kept value equal.
    """

    id: int
    classes: tuple[int, ...]
    prunable: tuple[int, ...]
    members: tuple[Member, ...]
    sources: tuple[str, ...]
    exact: bool
    inexact_reasons: tuple[str, ...] = ()
    pinned_reasons: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def is_prunable(self) -> bool:
        return len(self.prunable) > 1


@dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The frozen result of the channel-dependency analysis.

    ``class_of`` maps every label to a dense class id; ``node_labels`` holds each
    node's normalized label tensor (or tuple of them) by node name.
    """

    gm: torch.fx.GraphModule
    class_of: torch.Tensor
    n_classes: int
    class_pinned: torch.Tensor
    class_inexact: torch.Tensor
    node_labels: dict[str, Any]
    alignments: tuple[Alignment, ...]
    consumers: tuple[tuple[str, int | str], ...]  # (node, input position or keyword)
    groups: tuple[ChannelGroup, ...]
    group_of_class: torch.Tensor
    barriers: tuple[str, ...] = ()
    policy: str = "inner"
    frontend: str = "fx"
    segments: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    channel_sized: frozenset[str] = frozenset()  # int nodes computed from a channel count
    # (node, tensor path, labels): opaque modules consuming channels through their own weights
    param_consumers: tuple[tuple[str, str, torch.Tensor], ...] = field(default=(), repr=False)
    # groups whose channels are blocks of a split view (attention heads with policy "outer",
    # head_dim with "inner"), and the view nodes where the split happened
    head_groups: frozenset[int] = frozenset()
    head_splits: tuple[str, ...] = ()
    # channels kept with the constants (no group) because of a pin noted on them, and why
    constant_members: tuple[Member, ...] = ()
    constant_reasons: tuple[str, ...] = ()
    # ops that mix channel values, with their masked semantics (the oracle's reference)
    mixing: tuple[MixSite, ...] = field(default=(), repr=False)
    # (a, b, reason): a plan keeps more channels of label tensor a than of b
    wider: tuple[tuple[torch.Tensor, torch.Tensor, str], ...] = field(default=(), repr=False)

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids of a label tensor."""
        return self.class_of[labels]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> ChannelGroup:
        return self.groups[i]

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.is_prunable)

    def group_of(self, path: str, role: str = "out") -> ChannelGroup | None:
        """The group holding the channels of tensor ``path`` in ``role`` (e.g. a conv's
        output channels are ``("conv.weight", "out")``)."""
        for a in self.alignments:
            if a.path == path and a.role == role:
                cls = torch.unique(self.class_of[a.labels.reshape(-1)])
                gid = int(self.group_of_class[cls[0]])
                return self.groups[gid] if gid >= 0 else None
        return None

    def __str__(self) -> str:
        return format_groups(self)

    def to_networkx(self):
        """The group graph (groups, the tensors they slice, the ops that align or mix them)
        as a ``networkx.Graph``: see :mod:`fxprune.group_graph`."""
        from .group_graph import to_networkx

        return to_networkx(self)


def format_groups(groups: ChannelGroups, limit_members: int = 4) -> str:
    """A readable table of the groups: size, prunable channels, exactness, members,
    and the pinned channels with the node and reason."""
    lines = [f"{len(groups.groups)} channel groups ({sum(g.is_prunable for g in groups)} prunable, "
             f"{groups.n_classes} channel classes), front end: {groups.frontend}"]
    head = f"{'id':>4} {'chan':>5} {'prun':>5} {'exact':>5}  members"
    lines += [head, "-" * len(head)]
    for g in groups.groups:
        mem = ", ".join(str(m) for m in g.members[:limit_members])
        if len(g.members) > limit_members:
            mem += f", ... (+{len(g.members) - limit_members})"
        lines.append(f"{g.id:>4} {g.size:>5} {len(g.prunable):>5} {'yes' if g.exact else 'no':>5}  {mem}")
        if g.pinned_reasons and len(g.prunable) < g.size:
            lines.append(f"{'':>23}pinned {g.size - len(g.prunable)}: {'; '.join(g.pinned_reasons)}")
        if not g.exact:
            lines.append(f"{'':>23}inexact: {'; '.join(g.inexact_reasons)}")
    if groups.constant_members:
        mem = ", ".join(str(m) for m in groups.constant_members[:limit_members])
        if len(groups.constant_members) > limit_members:
            mem += f", ... (+{len(groups.constant_members) - limit_members})"
        lines.append(f"kept with the constants: {mem}")
        lines.append(f"{'':>23}because: {'; '.join(groups.constant_reasons[:4])}")
    if groups.barriers:
        lines.append("ops without a rule (their channels are pinned):")
        lines += [f"  {b}" for b in dict.fromkeys(groups.barriers)]
    return "\n".join(lines)
