"""Data-dependent indexing: gather, take_along_dim, index_select and the scatters
(scatter, scatter_add, scatter_reduce, index_add, index_copy, index_reduce).

Which positions an index tensor picks along its dim is data: that dim becomes one
class (a channel dim there is pinned). Along the other dims position i of the
output is position i of the input, so channels go through; an index spanning them
must be a broadcast copy (``idx.expand(-1, C, -1)``), which the rewrite narrows to
the kept count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..labels import channel_dim, const_like
from ..meta import tensor_meta
from .context import AnalysisContext, RewriteContext, op_name
from .pointwise import broadcast_labels
from .registry import aten_ops, register


def picked_by_data(ctx: AnalysisContext, node: torch.fx.Node, x: Any, labels: torch.Tensor, d: int,
                   why: str) -> torch.Tensor:
    """``labels`` of ``x`` made one class along dim ``d``, whose positions an index tensor
    picks (which ones is data); a channel dim there is pinned with ``why``."""
    if labels.shape[d] > 1:
        if channel_dim(labels) == d and ctx.labels(x) is not None and not _is_free(ctx, x):
            ctx.pin(labels, f"{node.name}: {why}")
        ctx.union(labels.movedim(d, 0), labels.movedim(d, 0)[:1])
        labels = labels.narrow(d, 0, 1)
    return labels


def _is_free(ctx: AnalysisContext, x: Any) -> bool:
    """A parameter used by value, whose positions are all fresh labels until an op decides."""
    return isinstance(x, torch.fx.Node) and x.op == "get_attr"


_GATHER = ("input", "dim", "index", "sparse_grad")  # x.gather(dim, index)
_TAKE_ALONG = ("input", "indices", "dim")  # x.take_along_dim(indices, dim): dim None is flat


def _gather_names(node: torch.fx.Node) -> tuple[str, str, tuple[str, ...]]:
    """(name of the index argument, of the dim argument, names of the positional
    parameters of a method call) of gather / take_along_dim."""
    if op_name(node) == "take_along_dim":
        return "indices", "dim", _TAKE_ALONG
    return "index", "dim", _GATHER


def _copied_dims(index: Any) -> list[int]:
    """Dims along which ``index`` is a broadcast copy of a size-1 dim (``idx.expand(-1, C,
    -1)``, expand_as, broadcast_to): its values do not change along them, so any prefix of
    it there is the same index."""
    if not isinstance(index, torch.fx.Node) or op_name(index) not in ("expand", "expand_as", "broadcast_to"):
        return []
    src, out = tensor_meta(index.args[0]), tensor_meta(index)
    if src is None or out is None:
        return []
    ins = (1,) * (len(out.shape) - len(src.shape)) + tuple(src.shape)
    return [k for k, (a, b) in enumerate(zip(ins, out.shape)) if a == 1 and b > 1]


def gather(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``torch.gather(x, dim, index)`` and ``take_along_dim``: ``out[.., i, ..] = x[..,
    index[.., i, ..], ..]``. Along ``dim`` the positions are data (one class; a channel dim
    there is pinned); along the other dims output position i is x's position i, so x's
    channels go through (tokens kept by a top-k, neighbours gathered by k-NN). Where the
    index spans those channels it must be a broadcast copy (``idx.expand(-1, C, -1)``:
    the rewrite narrows it to the kept count); an index of its own size there pins them."""
    index_name, dim_name, names = _gather_names(node)
    a = ctx.named_args(names)
    x, index, dim = a["input"], a[index_name], ctx.value(a.get(dim_name))
    shape = ctx.meta(x).shape
    labels = ctx.labels_or_const(x)
    if dim is None:  # take_along_dim over the flattened input
        for d in range(len(shape)):
            labels = picked_by_data(ctx, node, x, labels, d, "take_along_dim over the flattened channels")
        return const_like(ctx.meta(node).ndim)
    d = dim % len(shape)
    labels = picked_by_data(ctx, node, x, labels, d, "gather along a channel dim")
    index_shape = ctx.meta(index).shape
    copied = _copied_dims(index)
    for k in range(len(shape)):
        if k == d or labels.shape[k] == 1 or index_shape[k] == 1 and op_name(node) == "take_along_dim":
            continue  # take_along_dim broadcasts the index; gather does not
        if index_shape[k] != shape[k]:
            labels = picked_by_data(ctx, node, x, labels, k, "gather reads part of a channel dim")
        elif k not in copied:
            labels = picked_by_data(ctx, node, x, labels, k, "gather index spans the channels with a "
                                                             "size of its own, which would not follow them")
    return labels


def rewrite_gather(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    index_name, _, names = _gather_names(old)
    _narrow_index(r, old, new, index_name, names)


def _narrow_index(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node, name: str,
                  names: tuple[str, ...]) -> None:
    """Narrow a broadcast-copied index (argument ``name``; ``names``: the positional
    parameters of a method call) to the kept count of the channels of the input it spans."""
    a = r.named_args(old, names)
    x = a["input"]
    dims = [k for k in _copied_dims(a[name]) if r.old_shape(x)[k] != r.new_shape(x)[k]]
    if not dims:
        return
    value = r.named_args(new, names)[name]
    with new.graph.inserting_before(new):
        for k in dims:
            value = new.graph.call_method("narrow", (value, k, 0, r.new_shape(x)[k]))
    r.set_arg(new, name, value, names)


register(torch.gather, "gather", torch.take_along_dim, "take_along_dim", *aten_ops("gather", "take_along_dim"),
         rewrite=rewrite_gather)(gather)


_SCATTERS = ("scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_")
_INDEX_WRITES = ("index_add", "index_add_", "index_copy", "index_copy_", "index_reduce", "index_reduce_")


def _scatter_names(node: torch.fx.Node) -> tuple[str, ...]:
    """The positional parameters of a scatter method call (``x.scatter_add(dim, index,
    src)``, ``x.index_add(dim, index, source)``; a scalar ``value`` of scatter sits where
    ``src`` does)."""
    if op_name(node) in _INDEX_WRITES:
        return "input", "dim", "index", "source", "reduce"
    return "input", "dim", "index", "src", "reduce"


def scatter(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x.scatter(dim, index, src)`` and friends (scatter_add, scatter_reduce, index_add,
    index_copy, index_reduce; in place or not): ``src``'s positions along ``dim`` land
    where the index says (data: that dim is one class, a channel dim there is pinned);
    along the other dims position i of ``src`` is position i of ``x``, so their channels
    go together (messages summed into nodes of a graph). A scatter index spans those
    channels as a broadcast copy (narrowed by the rewrite) or pins them, as in gather."""
    a = ctx.named_args(_scatter_names(node))
    x, dim, index = a["input"], ctx.value(a["dim"]), a["index"]
    src = next((a[k] for k in ("src", "source", "value") if k in a), None)
    shape = ctx.meta(x).shape
    d = dim % len(shape)
    why = f"{op_name(node)} along a channel dim"
    labels = picked_by_data(ctx, node, x, ctx.labels_or_const(x), d, why)
    real = [1 if k == d else n for k, n in enumerate(shape)]
    operands = [(labels, real)]
    if ctx.is_tensor(src):
        src_shape = ctx.meta(src).shape
        src_labels = picked_by_data(ctx, node, src, ctx.labels_or_const(src), d, why)
        if op_name(node) in _SCATTERS:  # the index's extent, not src's, is what is written
            index_shape, copied = ctx.meta(index).shape, _copied_dims(index)
            for k in range(len(shape)):
                if k == d or (labels.shape[k] == 1 and src_labels.shape[k] == 1):
                    continue
                if not index_shape[k] == src_shape[k] == shape[k]:
                    reason = "scatter writes part of a channel dim"
                elif k not in copied:
                    reason = "scatter index spans the channels with a size of its own, which would not follow them"
                else:
                    continue
                labels = picked_by_data(ctx, node, x, labels, k, reason)
                src_labels = picked_by_data(ctx, node, src, src_labels, k, reason)
            operands = [(labels, real)]
        operands.append((src_labels, [1 if k == d else n for k, n in enumerate(src_shape)]))
    return broadcast_labels(ctx, node, operands, out_shape=real)


def rewrite_scatter(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if op_name(old) in _SCATTERS:
        _narrow_index(r, old, new, "index", _scatter_names(old))


register(*_SCATTERS, *_INDEX_WRITES, torch.scatter, torch.scatter_add, torch.scatter_reduce, torch.index_add,
         torch.index_copy, torch.index_reduce,
         *aten_ops("scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy", "index_reduce"),
         rewrite=rewrite_scatter)(scatter)


def index_select(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x.index_select(dim, index)``: the positions along ``dim`` are data (one class; a
    channel dim there is pinned); the other dims keep their labels."""
    a = ctx.named_args(("input", "dim", "index"))
    x = a["input"]
    d = ctx.value(a["dim"]) % ctx.meta(x).ndim
    return picked_by_data(ctx, node, x, ctx.labels_or_const(x), d, "index_select along a channel dim")


register(torch.index_select, "index_select", *aten_ops("index_select"))(index_select)
