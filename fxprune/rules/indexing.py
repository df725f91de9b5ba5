"""Indexing: ``x[index]`` (getitem, with basic or tensor indices), slice assignment
(``operator.setitem``) and ``narrow``.

Basic indexing runs on the labels; an integer index into a channel dim pins it
(unless the result is only a shape template), a strided slice over whole aligned
blocks couples each block. Index tensors collapse the dims they index (see
``gather``). The rewrite hooks move slice bounds to the pruned tensor.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.fx

from ..errors import Unsupported
from ..labels import const_like
from .context import AnalysisContext, RewriteContext, op_name
from .gather import picked_by_data
from .layout import concrete, relabel
from .pointwise import broadcast_labels
from .registry import aten_ops, register


def _index_dims(index: Any, ndim: int) -> tuple[tuple[Any, ...], list[int | None]]:
    """Map each entry of an index tuple to the input dim it consumes (None for newaxis)."""
    index = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims: list[int | None] = []
    d = 0
    for i in index:
        if i is Ellipsis:
            d += ndim - n_real
            dims.append(None)
        elif i is None:
            dims.append(None)
        else:
            dims.append(d)
            d += 1
    return index, dims


_GETITEM = ("input", "index")  # operator.getitem(x, index), x.__getitem__(index)
_SETITEM = ("input", "index", "value")  # operator.setitem(x, index, value)


def getitem(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x[index]``: an entry of a tuple, or basic or advanced indexing of a tensor."""
    a = ctx.named_args(_GETITEM)
    x, index = a["input"], a["index"]
    tl = ctx.tuple_labels(x)
    if tl is not None:
        return tl[ctx.value(index)]
    if not ctx.is_tensor(x):
        if isinstance(x, torch.fx.Node) and x.op == "placeholder" and ctx.is_tensor(node):
            return const_like(ctx.meta(node).ndim)  # a tensor of a structured input (a dict of inputs)
        return None
    entries = index if isinstance(index, tuple) else (index,)
    if any(ctx.is_tensor(i) for i in entries):
        return gather_labels(ctx, node, x, entries)
    return index_labels(ctx, node, x, concrete(ctx, index, full=False))


def setitem(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x[index] = v`` (operator.setitem: x changes in place, nothing is returned). The
    written region's channels go with v's, as in ``x[index] + v``; the region is found
    (and its bounds rewritten) as for ``x[index]``."""
    a = ctx.named_args(_SETITEM)
    x, index, v = a["input"], a["index"], a["value"]
    if not ctx.is_tensor(x):
        return None
    value = concrete(ctx, index, full=False)
    region = index_labels(ctx, node, x, value)  # refuses index tensors
    shape = torch.empty(ctx.meta(x).shape, device="meta")[value].shape
    if ctx.is_tensor(v):
        broadcast_labels(ctx, node, [(region, shape), (ctx.labels(v), ctx.meta(v).shape)], out_shape=shape)
    return None


def rewrite_setitem(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    _rewrite_index(r, old, new, _SETITEM)  # the index, as for x[index]


register(operator.setitem, rewrite=rewrite_setitem)(setitem)


def gather_labels(ctx: AnalysisContext, node: torch.fx.Node, x: Any, entries: Any, *,
                  aten_list: bool = False) -> torch.Tensor:
    """Labels of ``x[idx]`` with index tensors (a relative-position bias table indexed by
    a buffer). Which positions an index tensor picks is data, so the indexed dims of
    ``x`` are collapsed to one class; the other dims keep their labels. The op is then
    run on the labels with all-zero index tensors of the real shapes, so the output's
    dims land where indexing puts them. Indexing into a channel dim pins it."""
    labels = ctx.labels_or_const(x)
    ndim = ctx.meta(x).ndim
    if aten_list:  # aten.index(x, [idx or None per leading dim])
        entries = list(entries) + [None] * (ndim - len(entries))
        dims: list[int | None] = list(range(ndim))
    else:
        entries, dims = _index_dims(tuple(entries), ndim)
    probe: list[Any] = []
    for e, d in zip(entries, dims):
        if ctx.is_tensor(e):
            meta = ctx.meta(e)
            if meta.dtype == torch.bool:
                raise Unsupported("boolean mask indexing is not analysed")
            d_in = cast(int, d)  # a tensor index consumes an input dim (None is only for newaxis, Ellipsis)
            labels = picked_by_data(ctx, node, x, labels, d_in, "tensor index into a channel dim")
            probe.append(torch.zeros(meta.shape, dtype=torch.int64))
        elif e is None or e is Ellipsis or (isinstance(e, slice) and e == slice(None)):
            probe.append(e)
        else:
            raise Unsupported(f"index entry {e!r} mixed with tensor indices is not analysed")
    if aten_list:
        out: torch.Tensor = torch.ops.aten.index.Tensor(labels, probe)
        return out
    return labels[tuple(probe)]


def index_labels(ctx: AnalysisContext, node: torch.fx.Node, x: Any, value: Any) -> torch.Tensor:
    """Labels of ``x[value]`` for basic indexing (ints, slices, None, Ellipsis)."""
    labels = cast(torch.Tensor, ctx.labels(x))  # x has labels (the code below indexes them)
    idx, dims = _index_dims(value, ctx.meta(x).ndim)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        raise Unsupported("advanced (tensor) indexing is not analysed")
    fast = []
    for i, d in zip(idx, dims):
        if d is None:
            fast.append(i)
            continue
        if labels.shape[d] > 1:
            if isinstance(i, int) and _shape_template(node):
                # one channel picked only for its shape (view_as(f[:, 0])): whichever
                # channel sits there after pruning has the same shape
                return const_like(ctx.meta(node).ndim)
            if isinstance(i, int):
                ctx.pin(labels, f"{node.name}: integer index into a channel dim")
            elif isinstance(i, slice) and i.step not in (None, 1):
                if _strided_blocks(i, ctx.meta(x).shape[d]):
                    # x[..., a::s]: aligned blocks of s channels go whole, so every kept
                    # block still has its a-th entry at the same offset (interleaved rotary
                    # pairs channel 2i with 2i + 1 this way)
                    blocks = ctx.vector(x, d).reshape(-1, i.step)
                    ctx.union(blocks, blocks[:, :1])
                else:
                    ctx.pin(labels, f"{node.name}: strided slice of a channel dim")
            fast.append(i)
        else:  # compressed dim: the label does not depend on the index
            fast.append(0 if isinstance(i, int) else slice(None))
    # slicing a compressed dim keeps size 1; shape check happens in the engine
    return labels[tuple(fast)]


_TEMPLATE_ARG = ("view_as", "expand_as", "reshape_as", "type_as")  # x.op(template)
_SHAPE_READERS = {"zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "new_empty", "new_full",
                  "size", "dim"}


def _shape_template(node: torch.fx.Node) -> bool:
    """Whether every use of ``node``'s value reads only its shape, dtype or device: the
    template argument of ``view_as``/``expand_as``/``type_as``, ``*_like``, ``.shape``,
    ``.size()``."""
    if not node.users:
        return False
    for user in node.users:
        name = op_name(user)
        if name in _TEMPLATE_ARG:
            if user.args[0] is node or node not in user.args[1:]:
                return False
        elif name in _SHAPE_READERS:
            if name.startswith("new_") and any(a is node for a in user.args[1:]):
                return False
        elif not (user.op == "call_function" and user.target is getattr
                  and user.args[1] in ("shape", "dtype", "device", "ndim")):
            return False
    return True


def _strided_blocks(i: slice, n: int) -> bool:
    """Whether ``x[a::s]`` over ``n`` channels picks offset ``a`` of every aligned block of
    ``s``: a positive step dividing ``n``, a start inside the first block, no early stop."""
    if not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
        return False
    start, stop, step = i.indices(n)
    return step > 1 and n % step == 0 and start < step and stop == n


def new_bounds(r: RewriteContext, x: torch.fx.Node, cdim: int, kept: torch.Tensor, start: Any,
               stop: Any) -> tuple[Any, Any]:
    """Slice bounds along channel dim ``cdim`` of ``x`` moved to the pruned tensor: an int
    position in the old tensor becomes the count of kept channels before it. Bounds that
    are not ints (computed at run time from sizes, so already right) come back as they are."""
    size = r.old_shape(x)[cdim]
    out: list[Any] = []
    for b in (start, stop):
        if isinstance(b, int):
            pos = slice(b, None).indices(size)[0]
            out.append(int((kept < pos).sum()))
        else:
            out.append(b)
    return tuple(out)


def rewrite_getitem(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    _rewrite_index(r, old, new, _GETITEM)


def _rewrite_index(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node, names: tuple[str, ...]) -> None:
    """Move the int bounds of slices of the channel dim in argument ``index`` of ``x[index]``
    (or of ``x[index] = v``) to the pruned tensor."""
    a = r.named_args(old, names)
    x, index = a["input"], a["index"]
    if not isinstance(x, torch.fx.Node) or r.node_labels(x) is None:
        return
    got = r.kept_index(r.node_labels(x))
    if got is None:
        return
    cdim, kept = got
    idx, dims = _index_dims(index, len(r.old_shape(x)))
    new_index = r.named_args(new, names)["index"]
    new_idx: list[Any] = list(new_index) if isinstance(new_index, tuple) else [new_index]
    for k, (i, d) in enumerate(zip(idx, dims)):
        if d != cdim or not isinstance(i, slice):
            continue
        if i.step not in (None, 1):  # whole blocks went (see index_labels): same offset, to the end
            new_idx[k] = slice(i.start, None, i.step)
            continue
        start, stop = new_bounds(r, x, cdim, kept, i.start, i.stop)
        start = start if isinstance(i.start, int) else new_idx[k].start
        stop = stop if isinstance(i.stop, int) else new_idx[k].stop
        new_idx[k] = slice(start, stop, new_idx[k].step)
    r.set_arg(new, "index", tuple(new_idx) if isinstance(new_index, tuple) else new_idx[0], names)


register(operator.getitem, "__getitem__", rewrite=rewrite_getitem)(getitem)


_NARROW = ("input", "dim", "start", "length")  # x.narrow(dim, start, length)


def rewrite_narrow(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Along the channel dim, an int ``start`` becomes the count of kept channels before
    it and an int ``length`` the kept count of the slice, each where the call passed it
    (bounds computed from sizes in forward follow the pruned sizes on their own)."""
    a = r.named_args(old, _NARROW)
    x, dim, start = a["input"], a["dim"], a["start"]
    got = r.kept_index(r.node_labels(x))
    if got is None or got[0] != dim % len(r.old_shape(x)):
        return
    cdim, kept = got
    if isinstance(start, int):  # else computed at run time from sizes: already right
        r.set_arg(new, "start", new_bounds(r, x, cdim, kept, start, None)[0], _NARROW)
    if isinstance(a["length"], int):
        r.set_arg(new, "length", r.new_shape(old)[cdim], _NARROW)


def narrow(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x.narrow(dim, start, length)``: a slice, run on the labels."""
    return relabel(ctx, node)


register("narrow", torch.narrow, *aten_ops("narrow"), rewrite=rewrite_narrow)(narrow)
