"""select: from channel scores to a :class:`PrunePlan` (which channel classes go).

Local ranking removes ``ratio`` of each prunable group's channels, lowest score
first; global ranking ranks all channels together with a per-group cap. Named
modules can get their own ratio or be ignored. Kept counts can be rounded to a
multiple, and no tensor in the graph is ever emptied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass


@dataclass(frozen=True, eq=False)
class PrunePlan:
    """Which channel classes are kept (``kept[c]``), with a per-group count of removals."""

    kept: torch.Tensor
    removed_per_group: tuple[tuple[int, int], ...] = ()

    @property
    def n_removed(self) -> int:
        return int((~self.kept).sum())

    def restrict(self, classes_allowed: torch.Tensor) -> "PrunePlan":
        """The plan removing only classes where ``classes_allowed`` is true."""
        kept = self.kept | ~classes_allowed
        return PrunePlan(kept, self.removed_per_group)


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


def select_channels(groups: ChannelGroups, scores, *, ratio: float = 0.5,
                    ratios: tuple[tuple[str, float], ...] = (), ignore: tuple[str, ...] = (),
                    round_to: int = 1, global_ranking: bool = False,
                    max_ratio: float = 1.0) -> PrunePlan:
    """Choose the channels to remove. ``scores.values`` holds one score per class."""
    check_ratio(ratio)
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to!r}")
    if not 0.0 < max_ratio <= 1.0:
        raise ConfigError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    n = groups.n_classes
    values = scores.values.clone()
    values[torch.isnan(values)] = float("inf")
    removable = ~groups.class_pinned
    for name in ignore:
        cls = _resolve(groups, name, "ignore")
        if cls is not None:
            removable[cls] = False
    own_ratio: dict[int, float] = {}
    for name, r in ratios:
        check_ratio(r, f"ratio for {name!r}")
        cls = _resolve(groups, name, "ratios")
        if cls is not None:
            for gid in torch.unique(groups.group_of_class[cls]).tolist():
                if gid >= 0:
                    own_ratio[gid] = r
    kept = torch.ones(n, dtype=torch.bool)
    pool = []
    for g in groups.groups:
        cand = torch.tensor([c for c in g.prunable if removable[c]], dtype=torch.int64)
        if cand.numel() == 0:
            continue
        floor_keep = 0 if cand.numel() < g.size else 1
        if global_ranking and g.id not in own_ratio:
            cap = min(int(math.floor(max_ratio * cand.numel())), cand.numel() - floor_keep)
            pool.append((g, cand, cap))
            continue
        r = own_ratio.get(g.id, ratio)
        n_remove = min(int(math.floor(r * cand.numel() + 1e-9)), cand.numel() - floor_keep)
        n_remove = _round_kept(g.size, n_remove, round_to)
        order = cand[torch.argsort(values[cand], stable=True)]
        kept[order[:max(n_remove, 0)]] = False
    if pool:
        _global(pool, values, kept, ratio, round_to)
    _keep_every_tensor_nonempty(groups, values, kept)
    removed = tuple((g.id, int((~kept[list(g.classes)]).sum())) for g in groups.groups
                    if bool((~kept[list(g.classes)]).any()))
    return PrunePlan(kept, removed)


def _global(pool, values, kept, ratio, round_to):
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
        removed = cand[~kept[cand]]
        want = _round_kept(g.size, removed.numel(), round_to)
        if want < removed.numel():
            best = removed[torch.argsort(values[removed], descending=True, stable=True)]
            kept[best[:removed.numel() - want]] = True


def _keep_every_tensor_nonempty(groups, values, kept):
    for seg in groups.segments:
        if not bool(kept[seg].any()):
            kept[seg[torch.argmax(values[seg])]] = True


@register_pass
@dataclass(frozen=True)
class Select(AnalysisPass):
    """Scores to a PrunePlan."""

    name = "select"
    ratio: float = 0.5
    ratios: tuple = field(default_factory=tuple)
    ignore: tuple = field(default_factory=tuple)
    round_to: int = 1
    global_ranking: bool = False
    max_ratio: float = 1.0

    def run(self, state: PruneState) -> PruneState:
        if state.scores is None:
            from .score_magnitude import magnitude_scores
            state = state.replace(scores=magnitude_scores(state.groups))
        ratios = tuple(self.ratios.items()) if isinstance(self.ratios, dict) else tuple(self.ratios)
        plan = select_channels(state.groups, state.scores, ratio=self.ratio, ratios=ratios,
                               ignore=tuple(self.ignore), round_to=self.round_to,
                               global_ranking=self.global_ranking, max_ratio=self.max_ratio)
        return state.replace(plan=plan)
