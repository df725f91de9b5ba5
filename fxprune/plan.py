"""select: from channel scores to a :class:`PrunePlan` (which channel classes go).

Three rankings decide which channels of the prunable groups are removed:

- *local* (default): each group loses ``ratio`` of its removable channels,
  lowest score first;
- *global* (``global_ranking=True``): all removable channels are ranked
  together and the ``ratio`` lowest-scoring go, no group losing more than
  ``max_ratio`` of its channels;
- *adaptive* (``adaptive=True``, as FLAP): scores are standardized within each group
  and all removable channels ranked together; channels go, lowest first, until what
  they cost (parameters or MACs, :func:`class_costs`) reaches ``ratio`` of the
  candidates' total, so each group gets its own ratio and a channel that saves more
  counts for more; no group loses more than ``max_ratio`` of its channels;
- *isomorphic* (``isomorphic=True``, Fang et al., "Isomorphic Pruning for
  Vision Models"): global ranking inside each set of structurally identical
  groups (see :func:`group_signature`), so that scores are only compared
  between groups whose channels cost and mean the same.

Named modules can get their own ratio (their group is then ranked locally) or
be ignored. Kept counts can be rounded up to a multiple of ``round_to``, and no
tensor in the graph is ever emptied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fxprune.channels import ChannelGroup, ChannelGroups
from fxprune.errors import ConfigError
from fxprune.rules.context import get_tensor
from fxprune.rules.registry import describe_target


@dataclass(frozen=True, eq=False)
class PrunePlan:
    """Which channel classes are kept (``kept[c]``), with a per-group count of removals.

    ``budget`` holds the :class:`fxprune.budget.BudgetResult` when the plan was
    searched for a MACs/parameter budget; ``compensation`` the
    :class:`fxprune.compensate.Compensation` the rewrite folded into biases (the value
    each removed channel takes at its compensated consumers, which the oracle uses).
    """

    kept: torch.Tensor
    removed_per_group: tuple[tuple[int, int], ...] = ()
    budget: Any = None
    compensation: Any = None

    @property
    def n_removed(self) -> int:
        return int((~self.kept).sum())

    def restrict(self, classes_allowed: torch.Tensor) -> "PrunePlan":
        """The plan removing only classes where ``classes_allowed`` is true."""
        kept = self.kept | ~classes_allowed
        return PrunePlan(kept, self.removed_per_group, self.budget)


# -- pure helpers ---------------------------------------------------------------
def check_ratio(value: float, what: str = "ratio") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}; it is the fraction of "
                          f"channels removed from each group (0.5 removes half)")
    return float(value)


def classes_of_name(groups: ChannelGroups, name: str) -> torch.Tensor | None:
    """Output-channel classes of the module or parameter ``name`` (None if it has none)."""
    found = []
    for a in groups.alignments:
        if a.role in ("out", "free") and (a.path == name or a.path.startswith(name + ".")):
            found.append(groups.class_of[a.labels.reshape(-1)])
    if not found:
        return None
    return torch.unique(torch.cat(found))


def _known_names(groups: ChannelGroups) -> list[str]:
    return sorted({a.path.rsplit(".", 1)[0] for a in groups.alignments if a.role == "out"})


def _resolve(groups: ChannelGroups, name: str, option: str) -> torch.Tensor | None:
    cls = classes_of_name(groups, name)
    if cls is None and not any(n.op in ("call_module", "get_attr") and
                               (n.target == name or str(n.target).startswith(name + "."))
                               for n in groups.gm.graph.nodes):
        names = _known_names(groups)
        raise ConfigError(f"{option} names {name!r}, which is not a module or parameter of the traced "
                          f"model; modules with output channels are e.g. {', '.join(names[:8])}")
    return cls


def _round_kept(n_total: int, n_remove: int, round_to: int) -> int:
    keep = n_total - n_remove
    keep = min(n_total, int(math.ceil(keep / round_to) * round_to))
    return n_total - keep


def candidates(groups: ChannelGroups, ignore: tuple[str, ...] = ()) -> dict[int, torch.Tensor]:
    """The removable classes of every group that has any: prunable and not ignored."""
    removable = ~groups.class_pinned
    for name in ignore:
        cls = _resolve(groups, name, "ignore")
        if cls is not None:
            removable[cls] = False
    out = {}
    for g in groups.groups:
        cand = torch.tensor(g.prunable, dtype=torch.int64)
        cand = cand[removable[cand]]
        if cand.numel():
            out[g.id] = cand
    return out


def group_signature(groups: ChannelGroups, group: ChannelGroup) -> tuple:
    """The structure of a group, equal for groups that isomorphic ranking compares.

    It is the group's channel count, prunable count and exactness plus the sorted
    multiset of its members, each described by its role (out/in/channel/norm/stat/
    free), channel dim, the op that uses it (module type or function name), the
    full shape of its tensor and how many of the group's classes it holds. Two
    residual-free blocks built alike (same layer types, same widths in and out)
    get the same signature; a block that downsamples, or one that also carries a
    residual stream, does not.
    """
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    mine = torch.zeros(groups.n_classes, dtype=torch.bool)
    mine[list(group.classes)] = True
    members = []
    for a in groups.alignments:
        cls = torch.unique(groups.class_of[a.labels.reshape(-1)])
        held = int(mine[cls].sum())
        if held == 0:
            continue
        node = nodes.get(a.node)
        op = describe_target(node, groups.gm) if node is not None else a.node
        shape = tuple(get_tensor(groups.gm, a.path).shape)
        members.append((a.role, -1 if a.dim is None else a.dim, op, shape, held))
    return (group.size, len(group.prunable), group.exact, tuple(sorted(members)))


def isomorphic_sets(groups: ChannelGroups, gids) -> list[list[int]]:
    """The groups ``gids`` partitioned by :func:`group_signature`, in order of first appearance."""
    sets: dict[tuple, list[int]] = {}
    for gid in gids:
        sets.setdefault(group_signature(groups, groups.groups[gid]), []).append(gid)
    return list(sets.values())


def _remove_lowest(kept, values, cand, n_remove):
    order = cand[torch.argsort(values[cand], stable=True)]
    kept[order[:max(n_remove, 0)]] = False


def segment_parts(groups: ChannelGroups, cands: dict[int, torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Per group: the candidate classes of every tensor's channel dim that holds some but
    not all of the group's candidates (a split piece, the residual stream of a CSP stage
    whose other half bypasses it, the value half of a fused qkv). Groups where every
    tensor holds all or none of them have none."""
    if not cands or not groups.segments:
        return {}
    n = groups.n_classes
    gids = sorted(cands)
    owner = torch.full((n,), -1, dtype=torch.int64)
    size = torch.zeros(len(gids), dtype=torch.int64)
    for k, gid in enumerate(gids):
        owner[cands[gid]] = k
        size[k] = cands[gid].numel()
    seg_id = torch.repeat_interleave(torch.arange(len(groups.segments)),
                                     torch.tensor([t.numel() for t in groups.segments]))
    key = torch.unique(seg_id * n + torch.cat(groups.segments))  # distinct classes per segment
    seg, cls = key // n, key % n
    own = owner[cls]
    seg, cls, own = seg[own >= 0], cls[own >= 0], own[own >= 0]
    pair = seg * len(gids) + own  # sorted, as key was
    uniq, counts = torch.unique_consecutive(pair, return_counts=True)
    partial = counts < size[uniq % len(gids)]
    if not bool(partial.any()):
        return {}
    parts: dict[int, dict[bytes, torch.Tensor]] = {}
    pieces = torch.split(cls, counts.tolist())
    for k in torch.nonzero(partial).flatten().tolist():
        gid = gids[int(uniq[k]) % len(gids)]
        parts.setdefault(gid, {}).setdefault(pieces[k].numpy().tobytes(), pieces[k])
    return {gid: list(p.values()) for gid, p in parts.items()}


def _remove_lowest_capped(kept, values, cand, n_remove, parts, ratio):
    """Remove the ``n_remove`` lowest-scoring candidates, taking from no part (see
    :func:`segment_parts`) more than ``floor(ratio * its size) + 1``: the group's
    channels go evenly, and one tensor is not stripped because its channels score low
    together (zero-initialized last norms of residual blocks do). The cap changes where
    ``ratio * size`` reaches a whole number, as the group's count does, so the budget
    search's ratio steps (:func:`fxprune.budget.ratio_steps`) see every plan."""
    position = {int(c): k for k, c in enumerate(cand.tolist())}
    member_of: list[list[int]] = [[] for _ in range(cand.numel())]
    budget = []
    for j, part in enumerate(parts):
        budget.append(min(part.numel(), int(math.floor(ratio * part.numel() + 1e-9)) + 1))
        for c in part.tolist():
            member_of[position[c]].append(j)
    removed = 0
    for k in torch.argsort(values[cand], stable=True).tolist():
        if removed >= n_remove:
            break
        if all(budget[j] > 0 for j in member_of[k]):
            for j in member_of[k]:
                budget[j] -= 1
            kept[cand[k]] = False
            removed += 1
    return removed


def _global(pool, values, kept, ratio, round_to):
    """Rank the channels of ``pool`` (a list of (group, candidates, cap)) together."""
    everything = torch.cat([c for _, c, _ in pool])
    total = int(math.floor(ratio * everything.numel() + 1e-9))
    owner = torch.cat([torch.full_like(c, k) for k, (_, c, _) in enumerate(pool)])
    order = torch.argsort(values[everything], stable=True)
    budget = [cap for _, _, cap in pool]
    taken = 0
    for i in order.tolist():
        if taken >= total:
            break
        k = int(owner[i])
        if budget[k] > 0:
            budget[k] -= 1
            kept[everything[i]] = False
            taken += 1
    for g, cand, _ in pool:  # round kept counts up, restoring the best removed channels
        n_removed = int((~kept[cand]).sum())
        _restore_best(kept, values, cand, n_removed - _round_kept(g.size, n_removed, round_to))


COSTS = ("params", "macs", "channels")


def class_costs(groups: ChannelGroups, cost: str = "params") -> torch.Tensor:
    """What removing each channel class saves (float64 per class): the parameters of the
    slices it holds (``params``), those times how often each weight is applied per call
    (``macs``, from the captured shapes), or 1 (``channels``)."""
    if cost not in COSTS:
        raise ConfigError(f"unknown cost {cost!r}; use one of {', '.join(COSTS)}")
    out = torch.zeros(groups.n_classes, dtype=torch.float64)
    if cost == "channels":
        return out + 1
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    for a in groups.alignments:
        if a.dim is None or a.role == "stat":
            continue
        t = get_tensor(groups.gm, a.path)
        each = t.numel() / max(t.shape[a.dim], 1)
        if cost == "macs" and t.ndim >= 2:
            val = getattr(nodes.get(a.node), "meta", {}).get("val") if a.node in nodes else None
            if isinstance(val, torch.Tensor) and t.shape[0]:
                each *= max(val.numel() // t.shape[0], 1)  # applications of the weight per call
        cls = groups.class_of[a.labels.reshape(-1)]
        out.index_add_(0, cls, torch.full((cls.numel(),), float(each), dtype=torch.float64))
    return out


def standardized(groups: ChannelGroups, values: torch.Tensor, cands: dict[int, torch.Tensor]) -> torch.Tensor:
    """``values`` standardized (zero mean, unit deviation) over each group's candidates;
    infinite values (unscored channels) stay infinite."""
    out = values.clone()
    for cand in cands.values():
        v = values[cand]
        ok = torch.isfinite(v)
        if int(ok.sum()) < 2:
            out[cand[ok]] = 0.0
            continue
        w = v[ok]
        out[cand[ok]] = (w - w.mean()) / w.std(unbiased=False).clamp_min(1e-30)
    return out


def _adaptive(pool, values, kept, ratio, round_to, costs):
    """Rank the channels of ``pool`` together by ``values``; remove until the removed cost
    reaches ``ratio`` of the pool's."""
    everything = torch.cat([c for _, c, _ in pool])
    owner = torch.cat([torch.full_like(c, k) for k, (_, c, _) in enumerate(pool)])
    cost = costs[everything]
    target = ratio * float(cost.sum())
    budget = [cap for _, _, cap in pool]
    removed = 0.0
    for i in torch.argsort(values[everything], stable=True).tolist():
        if removed >= target - 1e-9 * max(target, 1.0):
            break
        k = int(owner[i])
        if budget[k] > 0 and math.isfinite(float(values[everything[i]])):
            budget[k] -= 1
            kept[everything[i]] = False
            removed += float(cost[i])
    for g, cand, _ in pool:
        n_removed = int((~kept[cand]).sum())
        _restore_best(kept, values, cand, n_removed - _round_kept(g.size, n_removed, round_to))


def _restore_best(kept, values, cand, n):
    """Keep again the ``n`` best-scoring removed candidates."""
    removed = cand[~kept[cand]]
    best = removed[torch.argsort(values[removed], descending=True, stable=True)]
    kept[best[:max(n, 0)]] = True


def _keep_every_tensor_nonempty(groups, values, kept):
    for seg in groups.segments:
        if not bool(kept[seg].any()):
            kept[seg[torch.argmax(values[seg])]] = True


def _keep_wider(groups, values, kept):
    """Where the analysis asks a plan to keep more channels of ``a`` than of ``b`` (an
    LSTM's cell and its projection), keep the best removed channels of ``a`` again, or
    else remove the lowest kept ones of ``b``, until it does."""
    for a, b, _ in getattr(groups, "wider", ()):
        ca, cb = torch.unique(groups.class_of[a.reshape(-1)]), torch.unique(groups.class_of[b.reshape(-1)])
        need = int(kept[cb].sum()) + 1 - int(kept[ca].sum())
        if need <= 0:
            continue
        removed_a = int((~kept[ca]).sum())
        _restore_best(kept, values, ca, min(need, removed_a))
        extra = need - min(need, removed_a)
        free_b = cb[kept[cb] & ~groups.class_pinned[cb]]
        if extra > 0 and int(kept[cb].sum()) > extra and free_b.numel() >= extra:
            _remove_lowest(kept, values, free_b, extra)


def _check_whole_heads(group: ChannelGroup, r: float, n: int) -> None:
    """Heads are removed whole and balanced: ``r * n`` must be a whole number."""
    want = r * n
    if abs(want - round(want)) < 1e-6:
        return
    low, high = math.floor(want) / n, math.ceil(want) / n
    layer = group.members[0].path if group.members else f"group {group.id}"
    raise ConfigError(f"{layer}: {n} prunable heads; ratio {r:g} would remove {want:.3g} heads. "
                      f"The nearest ratios that remove whole heads are {low:g} and {high:g}")


def _check_options(ratio, round_to, max_ratio):
    check_ratio(ratio)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to!r}")
    if not isinstance(max_ratio, (int, float)) or isinstance(max_ratio, bool) or not 0.0 < max_ratio <= 1.0:
        raise ConfigError(f"max_ratio must be a number in (0, 1], got {max_ratio!r}; it caps the "
                          f"fraction of one group that global ranking may remove")


def own_ratios(groups: ChannelGroups, ratios) -> dict[int, float]:
    """Group id -> ratio for the groups holding the output channels of the named modules."""
    out: dict[int, float] = {}
    for name, r in ratios:
        check_ratio(r, f"ratio for {name!r}")
        cls = _resolve(groups, name, "ratios")
        if cls is not None:
            for gid in torch.unique(groups.group_of_class[cls]).tolist():
                if gid >= 0:
                    out[gid] = float(r)
    return out


# -- the work -------------------------------------------------------------------
def select_channels(groups: ChannelGroups, scores, *, ratio: float = 0.5,
                    ratios: tuple[tuple[str, float], ...] = (), ignore: tuple[str, ...] = (),
                    round_to: int = 1, global_ranking: bool = False,
                    max_ratio: float = 1.0, isomorphic: bool = False,
                    exact_heads: bool = False, adaptive: bool = False, cost: str = "params") -> PrunePlan:
    """Choose the channels to remove. ``scores.values`` holds one score per class.

    Parameters
    ----------
    ratio : fraction of each group's removable channels removed (local ranking), or
        of all pooled channels (global and isomorphic ranking).
    ratios : (module or parameter name, ratio) pairs; those groups are ranked locally.
    ignore : names whose output channels are never removed.
    round_to : kept channel counts are rounded up to a multiple of this.
    global_ranking : rank every group's channels together.
    max_ratio : global/isomorphic ranking removes at most this fraction of a group.
    isomorphic : rank together only groups with equal :func:`group_signature`.
    adaptive : standardize scores within groups, rank them together and remove until
        ``ratio`` of the candidates' ``cost`` ('params', 'macs' or 'channels') is removed.
    exact_heads : the user asked for whole heads: a model without head structure, or a
        ratio that is not a whole number of some layer's heads, is an error that names
        the layer and the nearest ratios that are.

    Examples
    --------
    >>> import torch, fxprune
    >>> from fxprune.scoring import ChannelScores
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    >>> g = fxprune.analyze(net, torch.randn(1, 3, 4, 4))
    >>> scores = ChannelScores(torch.arange(g.n_classes, dtype=torch.float64), "index")
    >>> plan = select_channels(g, scores, ratio=0.5)
    >>> [bool(plan.kept[c]) for c in g.prunable[0].classes]
    [False, False, True, True]
    """
    _check_options(ratio, round_to, max_ratio)
    if exact_heads and not groups.head_splits:
        raise ConfigError("no attention heads to prune: no view or reshape in this model splits a "
                          "channel dim into (heads, head_dim) blocks. Use the default policy (or "
                          "policy='inner') to prune channels")
    values = scores.values.clone()
    values[torch.isnan(values)] = float("inf")
    own = own_ratios(groups, ratios)
    kept = torch.ones(groups.n_classes, dtype=torch.bool)
    pooled = []
    cands = candidates(groups, ignore)
    if adaptive and isomorphic:
        raise ConfigError("adaptive and isomorphic ranking exclude each other: adaptive ranks every "
                          "group together, isomorphic only structurally identical ones; choose one")
    pooling = {gid for gid in cands if (global_ranking or isomorphic or adaptive) and gid not in own}
    parts = segment_parts(groups, {gid: c for gid, c in cands.items() if gid not in pooling})
    for gid, cand in cands.items():
        g = groups.groups[gid]
        floor_keep = 0 if cand.numel() < g.size else 1
        if gid in pooling:
            cap = min(int(math.floor(max_ratio * cand.numel() + 1e-9)), cand.numel() - floor_keep)
            pooled.append((g, cand, cap))
            continue
        r = own.get(gid, ratio)
        if exact_heads and gid in groups.head_groups and cand.numel() > 1:
            _check_whole_heads(g, r, cand.numel())
        n_remove = _round_kept(g.size, min(int(math.floor(r * cand.numel() + 1e-9)), cand.numel() - floor_keep),
                               round_to)
        if gid in parts and not exact_heads:
            got = _remove_lowest_capped(kept, values, cand, n_remove, parts[gid], r)
            if got < n_remove and round_to > 1:  # the caps stopped short: round the kept count up
                _restore_best(kept, values, cand, got - _round_kept(g.size, got, round_to))
        else:
            _remove_lowest(kept, values, cand, n_remove)
    if pooled:
        by_id = {item[0].id: item for item in pooled}
        if adaptive:
            z = standardized(groups, values, {gid: cands[gid] for gid in by_id})
            _adaptive(list(by_id.values()), z, kept, ratio, round_to, class_costs(groups, cost))
        else:
            sets = isomorphic_sets(groups, list(by_id)) if isomorphic else [list(by_id)]
            for members in sets:
                _global([by_id[gid] for gid in members], values, kept, ratio, round_to)
    _keep_every_tensor_nonempty(groups, values, kept)
    _keep_wider(groups, values, kept)
    gone = groups.group_of_class[~kept]
    per_group = torch.bincount(gone[gone >= 0], minlength=len(groups.groups)).tolist()
    removed = tuple((g.id, per_group[g.id]) for g in groups.groups if per_group[g.id])
    return PrunePlan(kept, removed)


def ratio_pairs(ratios) -> tuple:
    """Per-module ratios as (name, ratio) pairs, from a dict or a sequence of pairs."""
    return tuple(ratios.items()) if isinstance(ratios, dict) else tuple(ratios)
