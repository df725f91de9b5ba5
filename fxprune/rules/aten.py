"""The ATen dialect: the ops of a ``torch.export`` graph that have no functional twin.

Most ATen ops have the positional signature of their functional twin
(``aten.conv2d`` is ``F.conv2d``, ``aten.view(x, sizes)`` is ``x.view(sizes)``), so
their packets are keys of the twin's op spec, declared in the twin's family file
(``aten_ops(...)``); rules read arguments by name (``ctx.named_args``) where the ATen
order differs (``aten.embedding`` takes the weight first, ``aten.batch_norm`` the
affine parameters before the statistics). Every overload tagged ``pointwise`` in its
schema is elementwise with broadcasting, and an in-place op (``relu_``) uses the rule
of the op it mutates its input into (``fxprune.rules.registry``). The rest is here:
slice/select (getitem in another form), ``index`` (advanced indexing), ``addmm``
(GPT-2's ``Conv1D``: a linear layer with a transposed weight), ``_weight_norm``,
grouped matmuls, ``topk`` and ops whose output does not depend on their input's
values.
"""

from __future__ import annotations

from typing import Any

import sys
from operator import getitem as _getitem

import torch
import torch.fx

from . import contract, conv, indexing, pointwise
from ..errors import Unsupported
from ..labels import channel_dim, const_like
from ..meta import get_meta
from .context import AnalysisContext, RewriteContext, attr_target, get_tensor, op_name, weight_operand
from .registry import register, register_op_name

aten = torch.ops.aten


def _ops(*names: str) -> list[Any]:
    """The ATen packets of ``names`` that exist in this torch build."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def weight_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``_weight_norm(v, g, dim)``, an exported weight-normalized layer: its users align
    the weight through ``g`` and ``v`` (``AnalysisContext.align``); the value itself is
    only known as a weight."""
    a = ctx.named_args()
    v, g = ctx.attr_path(a["v"]), ctx.attr_path(a["g"])
    if v is None or g is None:
        raise Unsupported("g and v must be parameters of the module (get_attr)")
    ctx.weight_norms[f"<{node.name}>"] = (g, v, ctx.value(a["dim"]))
    return const_like(ctx.meta(node).ndim)


def rewrite_weight_norm(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    a = r.named_args(old)
    v, g = (get_tensor(r.groups.gm, attr_target(a[name])) for name in ("v", "g"))  # get_attr nodes
    r.fold_weight_norm(g, v, a["dim"])


register(aten._weight_norm, rewrite=rewrite_weight_norm)(weight_norm)



# -- slice and select: getitem spelled as ops ---------------------------------------------
def _slice_index(ctx: AnalysisContext, node: torch.fx.Node) -> tuple[Any, ...]:
    a = ctx.named_args()
    dim: int = ctx.value(a["dim"]) % ctx.meta(a["input"]).ndim
    start, end, step = (ctx.value(a[n]) for n in ("start", "end", "step"))
    end = None if isinstance(end, int) and end >= sys.maxsize else end  # "to the end"
    return (slice(None),) * dim + (slice(start, end, step),)


def aten_slice(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """aten.slice(x, dim, start, end, step) is x[..., start:end:step] along dim."""
    return indexing.index_labels(ctx, node, ctx.named_args()["input"], _slice_index(ctx, node))


def rewrite_slice(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    a = r.named_args(old)
    x = a["input"]
    if not isinstance(x, torch.fx.Node):
        return
    got = r.kept_index(r.node_labels(x))
    if got is None:
        return
    cdim, kept = got
    dim: Any = a["dim"]
    if dim % len(r.old_shape(x)) != cdim:
        return
    start: Any = a["start"]
    end: Any = a["end"]
    end = None if isinstance(end, int) and end >= sys.maxsize else end
    if a["step"] != 1:  # whole blocks of `step` went (see indexing.index_labels): same offset, to the end
        end = None
    else:
        start, end = indexing.new_bounds(r, x, cdim, kept, start, end)
    r.set_arg(new, "start", start)
    r.set_arg(new, "end", end)


register(aten.slice, rewrite=rewrite_slice)(aten_slice)


def aten_select(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """aten.select(x, dim, index) is x[..., index] along dim."""
    a = ctx.named_args()
    dim = ctx.value(a["dim"]) % ctx.meta(a["input"]).ndim
    index = ctx.value(a["index"])
    return indexing.index_labels(ctx, node, a["input"], (slice(None),) * dim + (index,))


register(aten.select)(aten_select)


# -- addmm: bias + mat1 @ mat2 -------------------------------------------------------------
def addmm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``beta * input + alpha * (mat1 @ mat2)``. With a parameter ``mat2`` (GPT-2's Conv1D)
    it is a linear layer whose weight is stored (in, out)."""
    named = ctx.named_args(("input", "mat1", "mat2"))
    bias, a, b = named["input"], named["mat1"], named["mat2"]
    weight = ctx.attr_path(b)
    bias_path = ctx.attr_path(bias)
    if weight is not None and bias_path is not None and ctx.tensor(bias_path).ndim == 1:
        return ctx.along(conv.dense(ctx, node, a, 1, weight, bias_path, out_dim=1), -1, 2)
    ctx.consume(1)
    product = contract.contract(ctx, node, [(a, "IK"), (b, "KJ")], "IJ")
    return pointwise.broadcast_labels(ctx, node, [(product, ctx.meta(node).shape),
                                                  (ctx.labels(bias), ctx.meta(bias).shape)])


register(aten.addmm, torch.addmm, "addmm")(addmm)


def baddbmm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``beta * input + alpha * (batch1 @ batch2)``, batched (BLOOM's ALiBi attention
    scores): a contraction over K plus a broadcast input."""
    named = ctx.named_args(("input", "batch1", "batch2"))
    bias, a, b = named["input"], named["batch1"], named["batch2"]
    ctx.consume(1, "batch1")
    product = contract.contract(ctx, node, [(a, "BIK"), (b, "BKJ")], "BIJ")
    return pointwise.broadcast_labels(ctx, node, [(product, ctx.meta(node).shape),
                                                  (ctx.labels(bias), ctx.meta(bias).shape)])


register(aten.baddbmm, torch.baddbmm, "baddbmm")(baddbmm)


# -- mixture of experts ---------------------------------------------------------------
def grouped_mm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``grouped_mm(x, W, offs)``: tokens sorted by expert, each block of rows times its
    expert's (in, out) matrix of W (experts, in, out). Every expert has the same width,
    so an input or output feature goes from all experts at once, like a dense layer."""
    a = ctx.named_args(("input", "weight"))
    x = a["input"]
    weight = a["mat2"] if "mat2" in a else a["weight"]  # aten._grouped_mm's, the transformers op's
    found = weight_operand(ctx.gm, weight, 3)
    if found is None or ctx.meta(x).ndim != 2:
        raise Unsupported("grouped_mm with a weight that is not a parameter of expert matrices")
    path, swapped = found
    in_dim, out_dim = (2, 1) if swapped else (1, 2)  # stored (experts, out, in) when swapped
    in_vec = ctx.vector(x, -1)
    ctx.consume(0)
    out_vec = ctx.fresh((ctx.tensor(path).shape[out_dim],), f"{node.name} output features")
    ctx.align(path, ctx.along(in_vec, in_dim, 3), "in")
    ctx.align(path, ctx.along(out_vec, out_dim, 3), "out")
    return ctx.along(out_vec, -1, 2)


register(getattr(aten, "_grouped_mm", None))(grouped_mm)
register_op_name("transformers::grouped_mm_fallback")(grouped_mm)


def topk(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Values and indices of the k largest along ``dim``: which entries win depends on the
    values there, so channels along ``dim`` are pinned; the other dims keep their labels."""
    a = ctx.named_args(("input", "k", "dim"))
    x = a["input"]
    labels = ctx.labels(x)
    ndim = ctx.meta(x).ndim
    dim = ctx.value(a.get("dim", -1)) % max(ndim, 1)
    if labels is None:
        return const_like(ndim), const_like(ndim)
    if labels.shape[dim] > 1:
        ctx.pin(labels, f"{node.name}: top-k over a channel dim")
        labels = labels.narrow(dim, 0, 1)
    return labels, const_like(ndim)


register(aten.topk, torch.topk, "topk")(topk)


# -- values that do not depend on the input's values ------------------------------------
_FACTORIES = ("zeros", "ones", "empty", "full", "new_zeros", "new_ones", "new_empty", "new_full")


def factory(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """A constant made in forward (``torch.zeros(size)``, ones, empty, full and the
    ``x.new_*`` twins): every position holds the same value, so any of them may go. Its
    positions are free labels, sized by what they meet (an LSTM's initial state, zero
    channels concatenated to a stream, a buffer of accumulated messages); the rewrite
    writes the kept counts into its size. Made at a tensor's shape read in forward
    (``h.new_zeros(h.shape)``), it has that tensor's positions, as ``zeros_like(h)`` does."""
    meta = ctx.meta(node)
    size = _size_arg(node)[0]
    of = _shape_read(size)
    if of is not None and ctx.labels(of) is not None and ctx.meta(of).shape == meta.shape:
        return ctx.labels(of)
    read = _channel_count_read(ctx, size, meta.ndim)
    if read is not None:
        return read
    if meta.ndim == 0 or size is None or isinstance(size, torch.fx.Node):  # computed in forward: kept
        return ctx.const_output()
    # only dims of a literal size: one read at run time (a batch or sequence length)
    # follows its source by itself and is no channel
    literal = [n if isinstance(v, int) else 1 for v, n in zip(size, meta.shape)]
    if max(literal, default=1) == 1:
        return ctx.const_output()
    return ctx.free_labels(node, tuple(literal), f"constant {node.name}")


def _channel_count_read(ctx: AnalysisContext, size: Any, ndim: int) -> torch.Tensor | None:
    """Labels for a constant with one size read at run time from a tensor's channel count
    (``torch.zeros(n, h.shape[1], 1)``): that tensor's channel positions along that dim,
    since the count follows them in the pruned model by itself; None otherwise (also
    beside a literal size above 1, whose positions are free)."""
    if not isinstance(size, (list, tuple)) or len(size) != ndim:
        return None
    found = []
    for d, v in enumerate(size):
        if isinstance(v, int) and v > 1:
            return None
        x, k = _count_of(v)
        labels = ctx.labels(x)
        if labels is not None and isinstance(k, int) and k % labels.ndim == channel_dim(labels):
            found.append((d, labels))
    if len(found) != 1:
        return None
    d, labels = found[0]
    return labels.reshape([-1 if i == d else 1 for i in range(ndim)])


def _count_of(v: Any) -> tuple[Any, Any]:
    """(tensor, dim) where ``v`` reads one size of a tensor (``x.shape[k]``,
    ``x.size()[k]``, ``x.size(k)``, ``aten.sym_size(x, k)``), else (None, None)."""
    if not isinstance(v, torch.fx.Node) or not v.args:
        return None, None
    if v.op == "call_function" and v.target is _getitem and len(v.args) == 2:
        of = _shape_read(v.args[0])
        return (of, v.args[1]) if of is not None else (None, None)
    if v.op == "call_method" and v.target == "size" and len(v.args) == 2:
        return v.args[0], v.args[1]
    if v.op == "call_function" and v.target is getattr(aten.sym_size, "int", None) and len(v.args) == 2:
        return v.args[0], v.args[1]
    return None, None


def _size_arg(node: torch.fx.Node) -> tuple[Any, tuple[str, int]]:
    """(size, how it is passed): ``"packed"`` (one list, tuple or shape node at ``at``),
    ``"varargs"`` (ints from ``at`` on) or ``"kw"`` (the ``size`` keyword)."""
    at = 1 if op_name(node).startswith("new_") else 0
    if len(node.args) > at:
        first = node.args[at]
        if isinstance(first, (list, tuple, torch.Size)) or isinstance(first, torch.fx.Node) and not _is_int(first):
            return first, ("packed", at)  # (a node holding one int is the first of several sizes)
        return list(node.args[at:]), ("varargs", at)
    return node.kwargs.get("size"), ("kw", at)


def _is_int(n: torch.fx.Node) -> bool:
    return isinstance(get_meta(n), int)


def _shape_read(size: Any) -> Any:
    """The tensor whose whole shape ``size`` is (``t.shape``, ``t.size()``), else None."""
    if not isinstance(size, torch.fx.Node) or not size.args:
        return None
    whole = (size.op == "call_function" and size.target is getattr and size.args[1:] == ("shape",)) or \
        (size.op == "call_method" and size.target == "size" and len(size.args) == 1 and not size.kwargs)
    return size.args[0] if whole else None


def rewrite_factory(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """The kept counts in the size of a constant whose positions were pruned."""
    before, after = r.old_shape(old), r.new_shape(old)
    if before == after:
        return
    size, (how, at) = _size_arg(old)  # (the new node's arguments have no shapes to tell)
    if isinstance(size, torch.fx.Node):  # a shape read at run time: it follows by itself
        return
    given: Any = new.kwargs["size"] if how == "kw" else new.args[at] if how == "packed" else new.args[at:]
    sizes = list(given)
    for k, (a, b) in enumerate(zip(before, after)):
        if a != b and not isinstance(sizes[k], torch.fx.Node):  # a count read at run time follows by itself
            sizes[k] = b
    if how == "kw":
        new.kwargs = {**new.kwargs, "size": sizes}
    elif how == "packed":
        new.args = (*new.args[:at], sizes, *new.args[at + 1:])
    else:
        new.args = (*new.args[:at], *sizes)


register(*_ops(*_FACTORIES, "scalar_tensor"), torch.zeros, torch.ones, torch.empty, torch.full,
         "new_zeros", "new_ones", "new_empty", "new_full", rewrite=rewrite_factory)(factory)


def aten_index(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """aten.index(x, [idx or None, ...]): advanced indexing (see ``indexing.gather_labels``)."""
    a = ctx.named_args()
    return indexing.gather_labels(ctx, node, a["input"], a["indices"], aten_list=True)


register(aten.index)(aten_index)
