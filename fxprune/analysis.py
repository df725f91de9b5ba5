"""The channel-dependency analysis (the ``channel-deps`` pass runs it).

Walks the graph once in topological order. Each node's rule (``fxprune.rules``)
relates the label tensors of its inputs and output; the union-find of
``fxprune.labels`` turns those relations into channel classes, and the classes
linked through shared label sources become :class:`ChannelGroup` s.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.fx
import torch.nn.utils.prune

from fxprune import rules  # noqa: F401  (fills the registry)
from fxprune.channels import Alignment, ChannelGroup, ChannelGroups, Member
from fxprune.errors import AnalysisError, ConfigError, RuleError, Unsupported
from fxprune.labels import CONST, LabelSpace, concat_tagged, constant_along, label_tensors, normalize, unique_runs
from fxprune.meta import TensorMeta, get_meta, has_meta
from fxprune.rules.context import AnalysisContext, attr_target
from fxprune.rules.registry import describe_target, lookup
from fxprune.weight_norm import weight_norm_of


# -- helpers -------------------------------------------------------------------
def _check(ctx: AnalysisContext, labels: Any, meta: Any, free: bool = False) -> Any:
    """Normalize a rule's output labels and check they fit the node's shape. A value made
    from free tensors alone keeps its labels as they are: which of its dims is the channel
    is decided where it meets one (a rotary table's chunk has more positions than
    channels, and normalizing it early would keep the positions)."""
    if isinstance(meta, TensorMeta):
        if not isinstance(labels, torch.Tensor):
            raise AnalysisError(f"rule for {ctx.where()} returned {type(labels).__name__} "
                                f"for a tensor output")
        if labels.ndim != meta.ndim or any(l not in (1, s) for l, s in zip(labels.shape, meta.shape)):
            raise AnalysisError(f"rule for {ctx.where()} returned labels of shape {tuple(labels.shape)} "
                                f"for a value of shape {meta.shape}")
        if free:
            return labels
        if not ctx.splits_channels:
            return normalize(ctx.space, labels, "auto")
        chose: list[int] = []
        out = normalize(ctx.space, labels, ctx.policy, ctx.avoid_dims, chose)
        if chose:  # a view split channels into blocks (heads x head_dim): the policy chose
            ctx.head_splits.append((ctx.current.name, out))
        return out
    if isinstance(meta, tuple):
        if not isinstance(labels, tuple) or len(labels) != len(meta):
            labels = (None,) * len(meta) if labels is None else labels
        return tuple(_check(ctx, l, m, free) for l, m in zip(labels, meta))
    return None


def _pin_outputs(ctx: AnalysisContext, node: torch.fx.Node) -> None:
    for inp in node.all_input_nodes:
        ctx.pin(ctx.labels(inp), "model output")
        for labels in ctx.tuple_labels(inp) or ():
            if isinstance(labels, torch.Tensor):
                ctx.pin(labels, "model output")


def _visit(ctx: AnalysisContext, node: torch.fx.Node) -> None:
    ctx.node = node
    ctx.splits_channels = False
    ctx.avoid_dims = set()
    meta = get_meta(node)
    if node.op == "placeholder":
        ctx.labels_of[node] = _check(ctx, ctx.const_output(), meta)
        return
    if node.op == "get_attr":
        return  # labelled lazily, when an op uses the tensor by value (a weight argument is not)
    if node.op == "output":
        _pin_outputs(ctx, node)
        return
    if not has_meta(node):
        raise AnalysisError(f"{node.format_node()} has no shape; capture with fxprune.trace first")
    rule = lookup(node, ctx.gm)
    hooked = _opaque_module(ctx, node) if node.op == "call_module" else None
    if hooked is not None:
        ctx.barrier(hooked)
        out = ctx.const_output()
    elif rule is None:
        out = _no_rule(ctx, node)
    else:
        try:
            out = rule.analyze(ctx, node)
        except AnalysisError:
            raise
        except Unsupported as exc:  # a deliberate refusal: a barrier, with the rule's reason
            ctx.barrier(f"{node.name}: rule {rule.name} does not analyse {describe_target(node, ctx.gm)}: {exc}")
            out = ctx.const_output()
        except Exception as exc:  # a bug in the rule: raised, unless the caller asked to keep going
            if ctx.strict:
                raise RuleError(f"rule {rule.name} failed on {node.format_node()} "
                                f"({type(exc).__name__}: {exc}). This is a bug in fxprune's rule for "
                                f"{describe_target(node, ctx.gm)}; analyze with strict=False to keep "
                                f"this node's channels instead, and please report it") from exc
            ctx.barrier(f"{node.name}: rule {rule.name} failed on {describe_target(node, ctx.gm)} "
                        f"({type(exc).__name__}: {exc}; a bug in the rule, its channels are kept)")
            out = ctx.const_output()
    tensors = [i for i in node.all_input_nodes if _carries_tensor(get_meta(i)) or i.op == "get_attr"]
    free = node in ctx.free_nodes or (bool(tensors) and hooked is None and rule is not None
                                      and all(i in ctx.free_nodes for i in tensors))
    if free:
        ctx.free_nodes.add(node)
    ctx.labels_of[node] = _check(ctx, out, meta, free)
    if not isinstance(meta, TensorMeta) and node.name not in ctx.channel_sized:
        _track_channel_sized(ctx, node)


def _opaque_module(ctx: AnalysisContext, node: torch.fx.Node) -> str | None:
    """Why the module called by ``node`` is opaque whatever its type: a parametrized
    weight (``spectral_norm``, ``orthogonal``) is computed from other tensors, and forward
    hooks on it or its children run in the pruned model as well; what they compute is not
    known here. Weight normalization, in either form, is known (``fxprune.weight_norm``):
    it is recorded for the rule instead."""
    for name, m in ctx.module.named_modules():
        where = f"{node.target}.{name}" if name else node.target
        norm = weight_norm_of(m) if not name else None
        if norm is not None:  # weight normalization: analysed through its g and v (fxprune.weight_norm)
            ctx.weight_norms[f"{where}.weight"] = (f"{where}.{norm.g}", f"{where}.{norm.v}", norm.dim)
            continue
        if torch.nn.utils.parametrize.is_parametrized(m):
            kinds = ", ".join(f"{k}: {', '.join(type(p).__name__ for p in plist)}"
                              for k, plist in m.parametrizations.items())
            return (f"{node.name}: module {where} has parametrized tensors ({kinds}); "
                    f"its channels are kept. torch.nn.utils.parametrize.remove_parametrizations(module, "
                    f"name) folds them into plain tensors that can be pruned")
        hooks = list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values())
        if hooks:
            kinds = ", ".join(sorted({getattr(h, "__name__", type(h).__name__) for h in hooks}))
            masks = [h._tensor_name for h in hooks if isinstance(h, torch.nn.utils.prune.BasePruningMethod)]
            fix = (f"torch.nn.utils.prune.remove(module, {masks[0]!r}) makes its mask permanent (a "
                   f"plain weight with zeros, which can be pruned)") if masks else "Remove the hooks to prune it"
            return (f"{node.name}: module {where} has forward hooks ({kinds}) that would run in the "
                    f"pruned model too; its channels are kept. {fix}")
    return None


def _track_channel_sized(ctx: AnalysisContext, node: torch.fx.Node) -> None:
    """Ints derived from a channel count stay marked through getitem and arithmetic."""
    marks = [ctx.channel_sized.get(i.name) for i in node.all_input_nodes]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(marks[0], set):
        size, index = get_meta(cast(torch.fx.Node, node.args[0])), ctx.value(node.args[1])
        positions = range(len(size)) if isinstance(size, (tuple, list)) else None
        if positions is None:  # an unknown length: the marked entries are not tracked
            ctx.channel_sized[node.name] = True
        elif isinstance(index, slice):  # x.shape[:2]: the marks follow their entries
            kept = {j for j, k in enumerate(positions[index]) if k in marks[0]}
            if kept:
                ctx.channel_sized[node.name] = kept
        elif isinstance(index, int) and -len(positions) <= index < len(positions):
            if positions[index] in marks[0]:  # x.shape[-1] is the same entry as x.shape[ndim - 1]
                ctx.channel_sized[node.name] = True
    elif any(m is True for m in marks):
        ctx.channel_sized[node.name] = True


def _carries_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    return isinstance(meta, tuple) and any(_carries_tensor(m) for m in meta)


def _carries_channels(ctx: AnalysisContext, node: torch.fx.Node) -> bool:
    """Whether any position of ``node``'s value belongs to a class other than CONST."""
    if node.op == "get_attr" and node not in ctx.labels_of:  # not labelled here: that would
        t = ctx.tensor(attr_target(node))                   # make it a sliceable source
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim > 0
    got = ctx.labels_of.get(node)
    found = got if isinstance(got, tuple) else (got,)
    return any(isinstance(l, torch.Tensor) and bool((ctx.classes(l) != CONST).any()) for l in found)


def _no_rule(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    # a layer with weights of its own makes channels from any input (a bag of embeddings
    # looked up by integer ids): it is a barrier, named, whatever its inputs carry
    own_weights = node.op == "call_module" and any(t.is_floating_point() for t in ctx.module.parameters())
    if not own_weights and not any(_carries_tensor(get_meta(i)) for i in node.all_input_nodes):
        # Python arithmetic on sizes, or a tensor made from no tensor (arange, zeros): it
        # carries no channel; a size that came from a channel count is tracked separately
        return ctx.const_output()
    if not own_weights and not any(_carries_channels(ctx, i) for i in node.all_input_nodes):
        # every input is a constant as far as channels go (a mask or position ids built
        # from arange): whatever the op does, its output is constant too
        return ctx.const_output()
    ctx.barrier(f"{node.name}: no rule for {describe_target(node, ctx.gm)}")
    return ctx.const_output()


# -- finalization ----------------------------------------------------------------
def _dense_classes(space: LabelSpace) -> tuple[torch.Tensor, int]:
    roots = space.all_roots()
    # classes numbered in the order of their root labels (what unique would give), in O(n):
    # a root is a label that is its own parent
    is_root = roots == torch.arange(roots.numel(), dtype=roots.dtype)
    number = torch.cumsum(is_root, 0) - 1
    return number[roots], int(is_root.sum())


def _family_components(space: LabelSpace, class_of: torch.Tensor, n: int) -> torch.Tensor:
    """Group root of every class: classes are linked when they share a label family
    (labels created together, e.g. one conv's output channels). Vectorized min-label
    propagation over the bipartite class-family graph."""
    fam = space.family_of
    keep = fam != 0  # the CONST family links nothing
    cls, fam = class_of[keep], fam[keep]
    comp = torch.arange(n, dtype=torch.int64)
    n_fam = len(space.families)
    while True:
        low = torch.full((n_fam,), n, dtype=torch.int64).scatter_reduce(0, fam, comp[cls], "amin")
        new = comp.scatter_reduce(0, cls, low[fam], "amin")
        new = new[new]  # pointer jumping
        if torch.equal(new, comp):
            return comp
        comp = new


def _build_groups(space: LabelSpace, class_of: torch.Tensor, n: int, alignments: tuple[Alignment, ...],
                  pinned: torch.Tensor, pin_why: dict[int, list[str]], inexact: torch.Tensor,
                  inexact_why: dict[int, list[str]],
                  ) -> tuple[tuple[ChannelGroup, ...], torch.Tensor, tuple[tuple[Member, ...], tuple[str, ...]]]:
    comp = _family_components(space, class_of, n)
    const_class = int(class_of[CONST])
    fam = space.family_of
    # group ids in order of first appearance; classes in source order inside a group
    first_label = torch.full((n,), len(space), dtype=torch.int64)
    first_label.scatter_reduce_(0, class_of, torch.arange(len(space)), "amin")
    order = torch.argsort(first_label)  # classes in source order
    order = order[order != const_class]
    uniq, inv = torch.unique(comp[order], return_inverse=True)
    first_pos = torch.full((uniq.numel(),), order.numel(), dtype=torch.int64)
    first_pos.scatter_reduce_(0, inv, torch.arange(order.numel()), "amin")
    rank = torch.empty_like(first_pos)
    rank[torch.argsort(first_pos)] = torch.arange(uniq.numel())
    gid_of = rank[inv]  # group id of each class, groups numbered by first appearance
    group_of_class = torch.full((n,), -1, dtype=torch.int64)
    group_of_class[order] = gid_of
    sort = torch.argsort(gid_of, stable=True)
    by_group = order[sort]
    counts = torch.bincount(gid_of, minlength=uniq.numel()).tolist()
    classes_of = _chunks(by_group.tolist(), counts)
    free = ~pinned[by_group]
    prunable_of = _chunks(by_group[free].tolist(),
                          torch.bincount(gid_of[sort][free],
                                         minlength=len(counts)).tolist())
    members: dict[int, list[Member]] = {}
    kept: list[tuple[Alignment, Member]] = []  # (alignment, member) whose channels joined the constants
    n_groups = len(counts) + 1
    # one (alignment, group) key per pair, in alignment order, for all alignments at once
    for key in _tagged_distinct([a.labels for a in alignments], group_of_class[class_of] + 1, n_groups).tolist():
        i, gid = divmod(key, n_groups)
        a = alignments[i]
        if gid > 0:
            members.setdefault(gid - 1, []).append(Member(a.path, a.dim, a.role))
        elif a.dim is not None:
            kept.append((a, Member(a.path, a.dim, a.role)))
    sources: dict[int, list[str]] = {}
    n_fam = len(space.families)
    keys = unique_runs((group_of_class[class_of] + 1) * n_fam + fam)  # one key per (group, family)
    for key in keys.tolist():
        gid, f = key // n_fam - 1, key % n_fam
        if gid >= 0 and f != 0:
            sources.setdefault(gid, []).append(space.families[f].what)
    group_inexact = torch.zeros(len(classes_of), dtype=torch.bool)
    has = group_of_class >= 0
    group_inexact.index_put_((group_of_class[has],), inexact[has], accumulate=True)
    reasons_pin: dict[int, list[str]] = {}
    reasons_inexact: dict[int, list[str]] = {}
    for table, notes in ((pin_why, reasons_pin), (inexact_why, reasons_inexact)):
        gids = group_of_class[torch.tensor(list(table), dtype=torch.int64)].tolist() if table else []
        for gid, why in zip(gids, table.values()):
            if gid >= 0:
                mine = notes.setdefault(gid, [])
                mine.extend(r for r in why if r not in mine)
    inexact_list = group_inexact.tolist()
    # a group no tensor is sliced by (a constant made in forward that met no channel)
    # saves nothing and would only change what the constant computes: it is kept
    groups = tuple(ChannelGroup(
        id=gid, classes=tuple(classes), prunable=tuple(prunable_of[gid]) if gid in members else (),
        members=tuple(dict.fromkeys(members.get(gid, []))), sources=tuple(sources.get(gid, ())),
        exact=not inexact_list[gid], inexact_reasons=tuple(reasons_inexact.get(gid, ())[:4]),
        pinned_reasons=tuple(reasons_pin.get(gid, ())[:4])) for gid, classes in enumerate(classes_of))
    # channels that met a constant (or a pinned value that met one) are no group: the
    # reasons noted on them are kept with the members they hold
    # (the columns that read a model input were constants from the start: not listed)
    why_const = tuple(r for r in pin_why.get(const_class, ()) if r != "constant")
    kept_members = tuple(dict.fromkeys(m for a, m in kept if not bool((a.labels == CONST).all()))) \
        if why_const else ()
    return groups, group_of_class, (kept_members, why_const if kept_members else ())


def _chunks(flat: list[int], counts: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    at = 0
    for k in counts:
        out.append(flat[at:at + k])
        at += k
    return out


def _tagged_distinct(labels: list[torch.Tensor], table: torch.Tensor, bound: int) -> torch.Tensor:
    """The distinct pairs ``(i, table[l])`` for the labels ``l`` of ``labels[i]``
    (``table`` maps into ``[0, bound)``), as sorted keys ``i * bound + table[l]``. A
    tensor's keys come in runs (an alignment usually belongs to one group, a concat's
    parts to a few): only the first of each run is sorted."""
    if not labels:
        return torch.zeros(0, dtype=torch.int64)
    flat, tag = concat_tagged(labels)
    return unique_runs(tag * bound + table[flat])


def _segments(labels_of: dict[torch.fx.Node, Any], class_of: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The classes along the channel dim of every tensor (each must keep one), one entry
    per distinct sequence: a class may repeat inside an entry, which changes nothing for
    the check."""
    tensors = label_tensors(labels_of.values())
    if not tensors:
        return ()
    flat = class_of[torch.cat([l.reshape(-1) for l in tensors])]
    distinct: dict[bytes, torch.Tensor] = {}
    for cls, l in zip(torch.split(flat, [l.numel() for l in tensors]), tensors):
        if sum(n > 1 for n in l.shape) > 1:
            # a table whose labels vary along several dims (a position embedding, tokens by
            # hidden) usually repeats its classes along all but one: one copy is enough
            k = cls.view(l.shape)
            for d in range(k.ndim):
                if k.shape[d] > 1 and constant_along(k, d):
                    k = k.narrow(d, 0, 1)
            cls = k.reshape(-1)
        if cls.numel():
            distinct.setdefault(cls.numpy().tobytes(), cls)
    return tuple(distinct.values())


POLICIES = ("inner", "outer")


GQA_MODES = ("kv_groups", "q_heads")


def analyze_channels(gm: torch.fx.GraphModule, *, policy: str = "inner",
                     frontend: str = "fx", gqa: str = "kv_groups", strict: bool = True) -> ChannelGroups:
    """Compute the channel groups of a captured graph (every node needs shape meta).

    ``policy`` decides which dim stays prunable when a view splits a channel dim
    into two (``inner``: the inner dim, e.g. head_dim; ``outer``: whole blocks).
    ``gqa`` decides how grouped-query attention loses heads with ``outer``: whole kv
    groups (``kv_groups``: a kv head with its query heads) or the same query heads
    inside every group (``q_heads``: kv heads stay). A rule that declines a node
    (:class:`~fxprune.errors.Unsupported`) pins its channels; a rule that fails otherwise
    is a bug, raised as :class:`~fxprune.errors.RuleError` (``strict=False``: pinned too,
    the reason says it is a bug).
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r} is not one of {', '.join(POLICIES)} (fxprune.prune also "
                          f"takes 'heads', 'head_dim' and 'both')")
    if gqa not in GQA_MODES:
        raise ConfigError(f"gqa={gqa!r} is not one of {', '.join(GQA_MODES)}")
    space = LabelSpace()
    ctx = AnalysisContext(gm, space, policy)
    ctx.gqa = gqa
    ctx.strict = strict
    for node in gm.graph.nodes:
        _visit(ctx, node)
    for path, labels, _, _ in ctx.alignments:
        why = ctx.opaque_tensors.get(id(ctx.tensor(path)))
        if why is not None:
            space.pin(labels, why)
    # alignments are made separable once every union of the walk is known
    alignments = tuple(Alignment(p, normalize(space, l), r, nd) for p, l, r, nd in ctx.alignments)
    # a free tensor's labels (and those of values made from free tensors alone) are left
    # as created until their users are known; separable now
    def separable(labels: Any) -> Any:
        if isinstance(labels, tuple):
            return tuple(separable(l) for l in labels)
        return normalize(space, labels) if isinstance(labels, torch.Tensor) else labels

    node_labels = {node.name: separable(labels) if node in ctx.free_nodes else labels
                   for node, labels in ctx.labels_of.items()}
    class_of, n = _dense_classes(space)
    pinned, pin_why = space.class_notes(space.pinned, class_of, n)
    inexact, inexact_why = space.class_notes(space.inexact, class_of, n)

    groups, group_of_class, (const_members, const_reasons) = _build_groups(
        space, class_of, n, alignments, pinned, pin_why, inexact, inexact_why)
    head_groups: set[int] = set()
    for _, labels in ctx.head_splits:
        gids = group_of_class[class_of[labels.reshape(-1)]]
        head_groups.update(int(g) for g in torch.unique(gids).tolist() if g >= 0)
    return ChannelGroups(
        gm=gm, class_of=class_of, n_classes=n, class_pinned=pinned, class_inexact=inexact,
        node_labels=node_labels, alignments=alignments,
        # (an entry may also be (position, item): an operand in a list, see AnalysisContext.consume)
        consumers=cast("tuple[tuple[str, int | str], ...]", tuple(ctx.consumers)),
        groups=groups, group_of_class=group_of_class, barriers=tuple(ctx.barriers),
        policy=policy, frontend=frontend, segments=_segments(ctx.labels_of, class_of),
        channel_sized=frozenset(k for k, v in ctx.channel_sized.items() if v is True),
        param_consumers=tuple(ctx.param_consumers), head_groups=frozenset(head_groups),
        head_splits=tuple(dict.fromkeys(name for name, _ in ctx.head_splits)),
        constant_members=const_members, constant_reasons=const_reasons, mixing=tuple(ctx.mixing),
        wider=tuple(ctx.wider))
