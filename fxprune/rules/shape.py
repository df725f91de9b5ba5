"""Index and shape ops: the output's labels are a rearrangement of the input's.

The rule runs the very same op on the integer label tensors (expanded to the
real shapes where the op needs them), so view, reshape, flatten, permute, cat,
split, pixel_shuffle and friends are right by construction. Rewrite hooks
recompute the shape constants the plan changes (view sizes, split sizes, slice
bounds).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import Unsupported
from ..labels import CONST, channel_dim, const_like, constant_along
from .registry import register


def _concrete(ctx, a, *, full: bool = True):
    if isinstance(a, torch.fx.Node):
        if ctx.is_tensor(a):  # expanded, not copied: dims where labels repeat keep stride 0
            return ctx.full(a) if full else ctx.labels(a)
        return ctx.value(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(ctx, v, full=full) for v in a)
    if isinstance(a, slice):
        return slice(_concrete(ctx, a.start), _concrete(ctx, a.stop), _concrete(ctx, a.step))
    if isinstance(a, dict):
        return {k: _concrete(ctx, v, full=full) for k, v in a.items()}
    return a


def _call(ctx, node, args, kwargs):
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return ctx.module(*args, **kwargs)
    return node.target(*args, **kwargs)


def _as_labels(out):
    if isinstance(out, (list, tuple)):
        return tuple(_as_labels(o) for o in out)
    return out


def relabel(ctx, node):
    """Run the node's own op on the label tensors."""
    args = _concrete(ctx, node.args)
    kwargs = _concrete(ctx, node.kwargs)
    try:  # on expanded label tensors first: no copy where the labels repeat
        return _as_labels(_call(ctx, node, args, kwargs))
    except RuntimeError:  # a view that the expanded strides do not allow
        args, kwargs = _contiguous(args), _contiguous(kwargs)
        return _as_labels(_call(ctx, node, args, kwargs))


def _contiguous(a):
    if isinstance(a, torch.Tensor):
        return a.contiguous()
    if isinstance(a, (list, tuple)):
        return type(a)(_contiguous(v) for v in a)
    if isinstance(a, dict):
        return {k: _contiguous(v) for k, v in a.items()}
    return a


def _dim_arg(ctx, node, pos, name, default=0):
    if node.op == "call_module":
        return default
    return ctx.value(ctx.arg(pos, name, default))


def unbind(ctx, node):
    """unbind over a labelled dim would change the number of outputs: pin that dim."""
    out = relabel(ctx, node)
    x = node.args[0]
    dim = _dim_arg(ctx, node, 1, "dim", 0)
    labels = ctx.labels(x)
    if labels is not None and labels.shape[dim % labels.ndim] > 1:
        ctx.pin(labels, f"{node.name}: unbind over a channel dim")
    return out


def roll(ctx, node):
    """roll along the given dims; channels moving along a rolled dim are pinned (a roll
    with no dims rolls the flattened tensor, so any channel dim counts)."""
    out = relabel(ctx, node)
    labels = ctx.labels(node.args[0])
    if labels is None or not labels.ndim or max(labels.shape) == 1:
        return out
    dims = ctx.value(ctx.arg(2, "dims", None))
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(labels.shape[d % labels.ndim] > 1 for d in dims):
        ctx.pin(labels, f"{node.name}: roll along a channel dim")
    return out


def triangle(ctx, node):
    """triu/tril keep an element by its (row, column) position in the last two dims: the
    leading dims pass through, channels along the last two are pinned (removing one moves
    every later position across the diagonal)."""
    labels = ctx.labels(node.args[0])
    if labels is not None and labels.ndim >= 2 and (labels.shape[-1] > 1 or labels.shape[-2] > 1):
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "triu/tril")
        ctx.pin(labels, f"{node.name}: {op.split('.')[0]} along a channel dim")
    return ctx.labels_or_const(node.args[0])  # same shape, each element where it was


_FFT_1D = ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")
_FFT_2D = ("fft2", "ifft2", "rfft2", "irfft2", "hfft2", "ihfft2")
_FFT_ND = ("fftn", "ifftn", "rfftn", "irfftn", "hfftn", "ihfftn")


def _fft_dims(ctx, node, ndim: int) -> list[int]:
    """The dims a torch.fft transform (or export's _fft_r2c/_fft_c2r/_fft_c2c) runs over."""
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name.split("::")[-1]
        if name.startswith("_fft_"):  # _fft_r2c(self, dim, ...), _fft_c2r, _fft_c2c
            return [d % ndim for d in node.args[1]]
    else:
        name = node.target.__name__
    name = name.removeprefix("fft_")
    if name in _FFT_1D:
        return [ctx.value(ctx.arg(2, "dim", -1)) % ndim]
    dim = ctx.value(ctx.arg(2, "dim", (-2, -1) if name in _FFT_2D else None))
    if dim is None:
        size = ctx.value(ctx.arg(1, "s", None))
        return list(range(ndim - len(size), ndim)) if size is not None else list(range(ndim))
    return [d % ndim for d in ([dim] if isinstance(dim, int) else dim)]


def spectral(ctx, node):
    """A Fourier transform mixes every position along its dims and keeps the others
    apart: channels along a transformed dim are pinned (FNet mixing the hidden dim); a
    tensor whose labels vary along it besides (a learned filter, one per channel) moves
    those positions together; the transformed dims carry no channel in the output."""
    x = node.args[0]
    labels = ctx.labels(x)
    if labels is None:
        return None
    dims = _fft_dims(ctx, node, labels.ndim)
    varying = [d for d, n in enumerate(labels.shape) if n > 1]
    if varying and set(varying) <= set(dims):
        ctx.pin(labels, f"{node.name}: a Fourier transform along a channel dim")
        return const_like(labels.ndim)
    for d in dims:
        if labels.shape[d] > 1:  # positions along a transformed dim go with the rest of their row
            rows = labels.movedim(d, 0).reshape(labels.shape[d], -1)
            ctx.union(rows, rows[:1].expand_as(rows))
            labels = labels.narrow(d, 0, 1)
    return labels


register(*(getattr(torch.fft, n) for n in _FFT_1D + _FFT_2D + _FFT_ND if hasattr(torch.fft, n)))(spectral)


# -- getitem ---------------------------------------------------------------------
def _index_dims(index, ndim):
    """Map each entry of an index tuple to the input dim it consumes (None for newaxis)."""
    index = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    dims, d = [], 0
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


def getitem(ctx, node):
    x, index = node.args
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
    return index_labels(ctx, node, x, _concrete(ctx, index, full=False))


def setitem(ctx, node):
    """``x[index] = v`` (operator.setitem: x changes in place, nothing is returned). The
    written region's channels go with v's, as in ``x[index] + v``; the region is found
    (and its bounds rewritten) as for ``x[index]``."""
    from .pointwise import broadcast_labels

    x, index, v = node.args
    if not ctx.is_tensor(x):
        return None
    value = _concrete(ctx, index, full=False)
    region = index_labels(ctx, node, x, value)  # refuses index tensors
    shape = torch.empty(ctx.meta(x).shape, device="meta")[value].shape
    if ctx.is_tensor(v):
        broadcast_labels(ctx, node, [(region, shape), (ctx.labels(v), ctx.meta(v).shape)], out_shape=shape)
    return None


def rewrite_setitem(r, old, new):
    value = new.args[2]
    rewrite_getitem(r, old, new)  # the index, as for x[index]
    new.args = (*new.args[:2], value)


register(operator.setitem, rewrite=rewrite_setitem)(setitem)


def gather_labels(ctx, node, x, entries, *, aten_list: bool = False):
    """Labels of ``x[idx]`` with index tensors (a relative-position bias table indexed by
    a buffer). Which positions an index tensor picks is data, so the indexed dims of
    ``x`` are collapsed to one class; the other dims keep their labels. The op is then
    run on the labels with all-zero index tensors of the real shapes, so the output's
    dims land where indexing puts them. Indexing into a channel dim pins it."""
    labels = ctx.labels_or_const(x)
    ndim = ctx.meta(x).ndim
    if aten_list:  # aten.index(x, [idx or None per leading dim])
        entries = list(entries) + [None] * (ndim - len(entries))
        dims = list(range(ndim))
    else:
        entries, dims = _index_dims(tuple(entries), ndim)
    probe = []
    for e, d in zip(entries, dims):
        if ctx.is_tensor(e):
            meta = ctx.meta(e)
            if meta.dtype == torch.bool:
                raise Unsupported("boolean mask indexing is not analysed")
            labels = _picked_by_data(ctx, node, x, labels, d, "tensor index into a channel dim")
            probe.append(torch.zeros(meta.shape, dtype=torch.int64))
        elif e is None or e is Ellipsis or (isinstance(e, slice) and e == slice(None)):
            probe.append(e)
        else:
            raise Unsupported(f"index entry {e!r} mixed with tensor indices is not analysed")
    if aten_list:
        return torch.ops.aten.index.Tensor(labels, probe)
    return labels[tuple(probe)]


def _picked_by_data(ctx, node, x, labels, d, why):
    """``labels`` of ``x`` made one class along dim ``d``, whose positions an index tensor
    picks (which ones is data); a channel dim there is pinned with ``why``."""
    if labels.shape[d] > 1:
        if channel_dim(labels) == d and ctx.labels(x) is not None and not _is_free(ctx, x):
            ctx.pin(labels, f"{node.name}: {why}")
        ctx.union(labels.movedim(d, 0), labels.movedim(d, 0)[:1])
        labels = labels.narrow(d, 0, 1)
    return labels


def _gather_args(node):
    """(input, index, dim) of gather / take_along_dim (whose dim comes last, None: flat)."""
    def arg(i, name, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    if _op_name(node) == "take_along_dim":
        return arg(0, "input"), arg(1, "indices"), arg(2, "dim")
    return arg(0, "input"), arg(2, "index"), arg(1, "dim")


def _copied_dims(index) -> list[int]:
    """Dims along which ``index`` is a broadcast copy of a size-1 dim (``idx.expand(-1, C,
    -1)``, expand_as, broadcast_to): its values do not change along them, so any prefix of
    it there is the same index."""
    from ..meta import tensor_meta

    if not isinstance(index, torch.fx.Node) or _op_name(index) not in ("expand", "expand_as", "broadcast_to"):
        return []
    src, out = tensor_meta(index.args[0]), tensor_meta(index)
    if src is None or out is None:
        return []
    ins = (1,) * (len(out.shape) - len(src.shape)) + tuple(src.shape)
    return [k for k, (a, b) in enumerate(zip(ins, out.shape)) if a == 1 and b > 1]


def gather(ctx, node):
    """``torch.gather(x, dim, index)`` and ``take_along_dim``: ``out[.., i, ..] = x[..,
    index[.., i, ..], ..]``. Along ``dim`` the positions are data (one class; a channel dim
    there is pinned); along the other dims output position i is x's position i, so x's
    channels go through (tokens kept by a top-k, neighbours gathered by k-NN). Where the
    index spans those channels it must be a broadcast copy (``idx.expand(-1, C, -1)``:
    the rewrite narrows it to the kept count); an index of its own size there pins them."""
    x, index, dim = _gather_args(node)
    dim = ctx.value(dim)
    shape = ctx.meta(x).shape
    labels = ctx.labels_or_const(x)
    if dim is None:  # take_along_dim over the flattened input
        for d in range(len(shape)):
            labels = _picked_by_data(ctx, node, x, labels, d, "take_along_dim over the flattened channels")
        return const_like(ctx.meta(node).ndim)
    d = dim % len(shape)
    labels = _picked_by_data(ctx, node, x, labels, d, "gather along a channel dim")
    index_shape = ctx.meta(index).shape
    copied = _copied_dims(index)
    for k in range(len(shape)):
        if k == d or labels.shape[k] == 1 or index_shape[k] == 1 and _op_name(node) == "take_along_dim":
            continue  # take_along_dim broadcasts the index; gather does not
        if index_shape[k] != shape[k]:
            labels = _picked_by_data(ctx, node, x, labels, k, "gather reads part of a channel dim")
        elif k not in copied:
            labels = _picked_by_data(ctx, node, x, labels, k, "gather index spans the channels with a "
                                                             "size of its own, which would not follow them")
    return labels


def rewrite_gather(r, old, new):
    x = _gather_args(old)[0]
    _narrow_index(r, old, new, x, (1, "indices") if _op_name(old) == "take_along_dim" else (2, "index"))


def _narrow_index(r, old, new, x, arg):
    """Narrow a broadcast-copied index (argument ``arg``: position, name) to the kept
    count of the channels of ``x`` it spans."""
    pos, name = arg
    by_name = len(old.args) <= pos
    index = old.kwargs[name] if by_name else old.args[pos]
    dims = [k for k in _copied_dims(index) if r.old_shape(x)[k] != r.new_shape(x)[k]]
    if not dims:
        return
    value = new.kwargs[name] if by_name else new.args[pos]
    with new.graph.inserting_before(new):
        for k in dims:
            value = new.graph.call_method("narrow", (value, k, 0, r.new_shape(x)[k]))
    if by_name:
        new.kwargs = {**new.kwargs, name: value}
    else:
        new.args = (*new.args[:pos], value, *new.args[pos + 1:])


register(torch.gather, "gather", torch.take_along_dim, "take_along_dim", rewrite=rewrite_gather)(gather)


_SCATTERS = ("scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_")
_INDEX_WRITES = ("index_add", "index_add_", "index_copy", "index_copy_", "index_reduce", "index_reduce_")


def scatter(ctx, node):
    """``x.scatter(dim, index, src)`` and friends (scatter_add, scatter_reduce, index_add,
    index_copy, index_reduce; in place or not): ``src``'s positions along ``dim`` land
    where the index says (data: that dim is one class, a channel dim there is pinned);
    along the other dims position i of ``src`` is position i of ``x``, so their channels
    go together (messages summed into nodes of a graph). A scatter index spans those
    channels as a broadcast copy (narrowed by the rewrite) or pins them, as in gather."""
    from .pointwise import broadcast_labels

    x, dim = node.args[0], ctx.value(ctx.arg(1, "dim"))
    index = ctx.arg(2, "index")
    src = node.args[3] if len(node.args) > 3 else next(
        (node.kwargs[k] for k in ("src", "source", "value") if k in node.kwargs), None)
    shape = ctx.meta(x).shape
    d = dim % len(shape)
    why = f"{_op_name(node)} along a channel dim"
    labels = _picked_by_data(ctx, node, x, ctx.labels_or_const(x), d, why)
    real = [1 if k == d else n for k, n in enumerate(shape)]
    operands = [(labels, real)]
    if ctx.is_tensor(src):
        src_shape = ctx.meta(src).shape
        src_labels = _picked_by_data(ctx, node, src, ctx.labels_or_const(src), d, why)
        if _op_name(node) in _SCATTERS:  # the index's extent, not src's, is what is written
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
                labels = _picked_by_data(ctx, node, x, labels, k, reason)
                src_labels = _picked_by_data(ctx, node, src, src_labels, k, reason)
            operands = [(labels, real)]
        operands.append((src_labels, [1 if k == d else n for k, n in enumerate(src_shape)]))
    return broadcast_labels(ctx, node, operands, out_shape=real)


def rewrite_scatter(r, old, new):
    if _op_name(old) in _SCATTERS:
        _narrow_index(r, old, new, old.args[0], (2, "index"))


register(*_SCATTERS, *_INDEX_WRITES, torch.scatter, torch.scatter_add, torch.scatter_reduce, torch.index_add,
         torch.index_copy, torch.index_reduce, rewrite=rewrite_scatter)(scatter)


def index_select(ctx, node):
    """``x.index_select(dim, index)``: the positions along ``dim`` are data (one class; a
    channel dim there is pinned); the other dims keep their labels."""
    x = node.args[0]
    d = ctx.value(ctx.arg(1, "dim")) % ctx.meta(x).ndim
    return _picked_by_data(ctx, node, x, ctx.labels_or_const(x), d, "index_select along a channel dim")


register(torch.index_select, "index_select")(index_select)


def _is_free(ctx, x) -> bool:
    """A parameter used by value, whose positions are all fresh labels until an op decides."""
    return isinstance(x, torch.fx.Node) and x.op == "get_attr"


def index_labels(ctx, node, x, value):
    """Labels of ``x[value]`` for basic indexing (ints, slices, None, Ellipsis)."""
    labels = ctx.labels(x)
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
        name = _op_name(user)
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


def new_bounds(r, x, cdim: int, kept: torch.Tensor, start, stop) -> tuple:
    """Slice bounds along channel dim ``cdim`` of ``x`` moved to the pruned tensor: an int
    position in the old tensor becomes the count of kept channels before it. Bounds that
    are not ints (computed at run time from sizes, so already right) come back as they are."""
    size = r.old_shape(x)[cdim]
    out = []
    for b in (start, stop):
        if isinstance(b, int):
            pos = slice(b, None).indices(size)[0]
            out.append(int((kept < pos).sum()))
        else:
            out.append(b)
    return tuple(out)


def rewrite_getitem(r, old, new):
    x, index = old.args[:2]
    if not isinstance(x, torch.fx.Node) or r.node_labels(x) is None:
        return
    got = r.kept_index(r.node_labels(x))
    if got is None:
        return
    cdim, kept = got
    idx, dims = _index_dims(index, len(r.old_shape(x)))
    new_index = new.args[1]
    new_idx = list(new_index) if isinstance(new_index, tuple) else [new_index]
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
    new.args = (new.args[0], tuple(new_idx) if isinstance(new_index, tuple) else new_idx[0])


register(operator.getitem, "__getitem__", rewrite=rewrite_getitem)(getitem)


# -- cat / stack: expand only the dims that matter -------------------------------------
def cat(ctx, node):
    tensors = ctx.arg(0, "tensors")
    dim = ctx.value(ctx.arg(1, "dim", 0))
    ndim = ctx.meta(node).ndim
    stack = node.target is torch.stack or getattr(node.target, "overloadpacket", None) is torch.ops.aten.stack
    d = None if stack else dim % ndim
    ls = [ctx.labels_or_const(t) for t in tensors]
    if d is None:
        return torch.stack([l.expand(ctx.meta(t).shape) for l, t in zip(ls, tensors)], dim)
    need = {k for l in ls for k in range(l.ndim) if l.shape[k] > 1} | {d}
    parts = []
    for l, t in zip(ls, tensors):
        shape = ctx.meta(t).shape
        parts.append(l.expand(tuple(s if k in need else 1 for k, s in enumerate(shape))))
    return torch.cat(parts, d)


register(torch.cat, torch.concat, getattr(torch, "concatenate", None), torch.stack)(cat)


# -- view / reshape family -------------------------------------------------------------
def _shape_args(args):
    """The shape given to view/reshape/expand as a list, and how it was passed."""
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return list(args[0]), True
    return list(args), False


def rewrite_sizes(r, old, new):
    """view/reshape/expand: integer sizes of changed output dims become the new sizes."""
    old_out, new_out = r.old_shape(old), r.new_shape(old)
    sizes, packed = _shape_args(new.args[1:])  # the input is args[0] in both dialects
    old_sizes, _ = _shape_args(old.args[1:])
    if old.op == "call_function" and "shape" in old.kwargs:
        sizes, packed = list(new.kwargs["shape"]), True
        old_sizes = list(old.kwargs["shape"])
    sized = r.groups.channel_sized
    changed = False
    for k, (a, b) in enumerate(zip(old_out, new_out)):
        if k >= len(sizes) or (isinstance(sizes[k], int) and sizes[k] == -1):
            continue
        # a pruned dim gets its new size as a constant; so does a size the model computed
        # from a channel count (x.size(-1) // heads), which may have changed on its own
        from_channels = isinstance(old_sizes[k], torch.fx.Node) and old_sizes[k].name in sized
        if a != b or from_channels:
            sizes[k] = b
            changed = True
    if not changed:
        return
    # a view was valid for the original strides; at new sizes the same values may need a
    # copy (a reshape after a transpose that happened to be viewable), so emit reshape
    if old.op == "call_method" and old.target == "view":
        new.target = "reshape"
    elif old.op == "call_function" and old.target in (torch.ops.aten.view.default,
                                                      torch.ops.aten._unsafe_view.default):
        new.target = torch.ops.aten.reshape.default
    if old.op == "call_function" and "shape" in old.kwargs:
        new.kwargs = {**new.kwargs, "shape": sizes}
    else:
        new.args = (new.args[0], *([sizes] if packed else sizes))


def split_relabel(ctx, node):
    """view/reshape/unflatten: where one channel dim becomes two (hidden -> heads x head_dim)
    the analysis policy decides which of them stays prunable. A dim the graph unpacks right
    away (the 3 of a fused qkv reshaped to (3, heads, head_dim), then q, k, v = x[0], x[1],
    x[2]) stacks different tensors: it is not a candidate."""
    ctx.splits_channels = True
    ctx.avoid_dims = _unpacked_dims(node, ctx.meta(node).ndim)
    return relabel(ctx, node)


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", "")


def _unpacked_dims(node: torch.fx.Node, ndim: int) -> set[int]:
    """Dims of ``node``'s output that users index with an int (select, unbind, x[0]),
    looking through permute/transpose/contiguous."""
    found: set[int] = set()
    todo = [(node, list(range(ndim)))]  # (node, output dim of `node` -> dim of the original)
    while todo:
        cur, where = todo.pop()
        for user in cur.users:
            name = _op_name(user)
            args = user.args
            if name in ("contiguous", "clone", "alias", "detach"):
                todo.append((user, where))
            elif name == "permute" and len(args) > 1:
                perm = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
                if all(isinstance(p, int) for p in perm):
                    todo.append((user, [where[p % len(where)] for p in perm]))
            elif name in ("transpose", "swapaxes", "swapdims") and len(args) > 2 \
                    and isinstance(args[1], int) and isinstance(args[2], int):
                w = list(where)
                a, b = args[1] % len(w), args[2] % len(w)
                w[a], w[b] = w[b], w[a]
                todo.append((user, w))
            elif name in ("select", "unbind"):
                dim = args[1] if len(args) > 1 else user.kwargs.get("dim", 0)
                if isinstance(dim, int):
                    found.add(where[dim % len(where)])
            elif user.op == "call_function" and user.target is operator.getitem and \
                    isinstance(args[1], (int, tuple)):
                idx = args[1] if isinstance(args[1], tuple) else (args[1],)
                for d, i in enumerate(idx):
                    if i is Ellipsis:
                        break
                    if isinstance(i, int) and d < len(where):
                        found.add(where[d])
    return found


register("view", "reshape", torch.reshape, rewrite=rewrite_sizes)(split_relabel)


def expand(ctx, node):
    """Copies along new size-1 dims. Grouped-query attention repeats every kv head for
    its query heads (``k[:, :, None].expand(B, kv, rep, S, D)``, then a reshape to
    ``kv * rep`` heads). The copies get labels of their own, one per query head inside a
    group (the kv heads themselves then stay whole), with ``gqa="q_heads"``, and for a
    single kv head (multi-query attention: no kv group to remove) with whole heads."""
    out = split_relabel(ctx, node)
    x = node.args[0]
    labels = ctx.labels(x)
    if labels is None or not (ctx.gqa == "q_heads" or ctx.policy == "outer"):
        return out
    in_shape, out_shape = ctx.meta(x).shape, ctx.meta(node).shape
    if len(in_shape) != len(out_shape):
        return out
    cd = channel_dim(labels)
    for d in range(1, len(out_shape)):
        if in_shape[d] != 1 or out_shape[d] == 1 or not _merged_with_previous(node, d, out_shape):
            continue
        grouped = ctx.gqa == "q_heads" and cd == d - 1
        single_kv = ctx.policy == "outer" and in_shape[d - 1] == 1
        if grouped or single_kv:
            if cd is not None:
                kv = ctx.vector(x, cd)
                ctx.union(kv, kv[:1])
            copies = ctx.fresh((out_shape[d],), f"{node.name} query heads per kv head")
            return ctx.along(copies, d, len(out_shape))
    return out


def _merged_with_previous(node: torch.fx.Node, d: int, shape: tuple) -> bool:
    """Whether the only use of ``node`` (through contiguous/clone) reshapes dims d-1 and d
    of it into one (repeat_kv's reshape to kv * rep heads)."""
    users = list(node.users)
    while len(users) == 1 and _op_name(users[0]) in ("contiguous", "clone"):
        users = list(users[0].users)
    if len(users) != 1 or _op_name(users[0]) not in ("reshape", "view", "_unsafe_view"):
        return False
    from ..meta import tensor_meta

    out = tensor_meta(users[0])
    return out is not None and tuple(out.shape) == (*shape[:d - 1], shape[d - 1] * shape[d], *shape[d + 1:])


register("expand", rewrite=rewrite_sizes)(expand)


def rewrite_unflatten(r, old, new):
    old_out, new_out = r.old_shape(old), r.new_shape(old)
    if old_out == new_out:
        return
    in_ndim = len(r.old_shape(old.args[0]))  # dim counts the input's dims
    if old.op == "call_module":
        m = r.module(old)
        d = m.dim % in_ndim
        m.unflattened_size = tuple(new_out[d:d + len(m.unflattened_size)])
        return
    dim = old.args[1] if len(old.args) > 1 else old.kwargs["dim"]
    d = dim % in_ndim
    new_sizes = [new_out[d + k] if s != -1 and old_out[d + k] != new_out[d + k] else s
                 for k, s in enumerate(new.args[2] if len(new.args) > 2 else new.kwargs["sizes"])]
    new.args = (new.args[0], dim, new_sizes)
    new.kwargs = {k: v for k, v in new.kwargs.items() if k not in ("dim", "sizes")}


register("unflatten", torch.unflatten, nn.Unflatten, rewrite=rewrite_unflatten)(split_relabel)


def rewrite_split(r, old, new):
    """split/chunk with a changed dim becomes split with explicit new sizes."""
    x = old.args[0]
    dim = old.args[2] if len(old.args) > 2 else old.kwargs.get("dim", 0)
    n_out = len(r.groups.node_labels[old.name])
    d = dim % len(r.old_shape(x))
    if r.old_shape(x)[d] == r.new_shape(x)[d]:
        return
    sizes = [r.new_shape(old, i)[d] for i in range(n_out)]
    new.op, new.target = "call_function", torch.split
    new.args = (new.args[0], sizes, dim)
    new.kwargs = {}


register("split", "chunk", "split_with_sizes", torch.split, torch.chunk, rewrite=rewrite_split)(relabel)


def tensor_split(ctx, node):
    """tensor_split(x, sections or indices, dim): pieces of ``x`` like split (the rewrite
    gives the pieces their new sizes); indices passed as a tensor are not analysed."""
    if any(ctx.is_tensor(a) for a in (*node.args[1:], *node.kwargs.values())):
        raise Unsupported("split points computed in the graph are not analysed")
    return relabel(ctx, node)


register("tensor_split", torch.tensor_split, rewrite=rewrite_split)(tensor_split)


def rewrite_narrow(r, old, new):
    x = old.args[0]
    dim, start, length = (list(old.args[1:4]) + [None] * 3)[:3]
    got = r.kept_index(r.node_labels(x))
    if got is None or got[0] != dim % len(r.old_shape(x)):
        return
    kept = got[1]
    new.args = (new.args[0], dim, int((kept < start).sum()), r.new_shape(old)[got[0]])


register("narrow", torch.narrow, rewrite=rewrite_narrow)(relabel)

def expand_as(ctx, node):
    """``x.expand_as(y)``. A value that carries no channel, expanded from size 1 to
    ``y``'s shape (a norm kept with keepdim, then divided into ``y``: F.normalize as
    export writes it), has ``y``'s positions: its size follows ``y`` at run time and its
    values do not change along the expanded dims. Otherwise the op runs on the labels."""
    x, y = node.args[0], node.args[1]
    xl, yl = ctx.labels(x), ctx.labels(y)
    if yl is not None and (xl is None or not bool((ctx.classes(xl) != CONST).any())):
        shape = ctx.meta(x).shape
        shape = (1,) * (yl.ndim - len(shape)) + tuple(shape)
        if all(n == 1 or yl.shape[d] == 1 for d, n in enumerate(shape)):
            return yl
    return relabel(ctx, node)


register("expand_as")(expand_as)
register("unbind", torch.unbind)(unbind)
register("roll", torch.roll)(roll)
register("triu", "tril", "triu_", "tril_", torch.triu, torch.tril)(triangle)

register("flatten", "permute", "transpose", "t", "squeeze", "unsqueeze", "movedim", "moveaxis",
         "swapaxes", "swapdims", "flip", "rot90", "repeat", "repeat_interleave", "tile", "view_as",
         "reshape_as", "mT",
         torch.flatten, torch.permute, torch.transpose, torch.t, torch.squeeze, torch.unsqueeze,
         torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.flip, torch.rot90,
         torch.repeat_interleave, torch.tile, torch.pixel_shuffle, torch.pixel_unshuffle,
         nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle)(relabel)


def channel_shuffle(ctx, node):
    """channel_shuffle(x, g) is view(B, g, C/g, ...) -> transpose(1, 2) -> view(B, C, ...):
    channels at the same index inside every group go together, so the op still shuffles
    correctly at the smaller width."""
    x = node.args[0] if node.args else node.kwargs["input"]
    groups = ctx.module.groups if node.op == "call_module" else ctx.value(ctx.arg(1, "groups"))
    vec = ctx.vector(x, 1)
    blocks = vec.reshape(groups, -1)
    ctx.union(blocks, blocks[:1])
    shuffled = blocks.t().reshape(-1)
    return ctx.along(shuffled, 1, ctx.meta(node).ndim)


_F_SHUFFLE = getattr(F, "channel_shuffle", None)
register(torch.channel_shuffle, nn.ChannelShuffle,
         _F_SHUFFLE if _F_SHUFFLE is not torch.channel_shuffle else None)(channel_shuffle)


# -- sliding windows ---------------------------------------------------------------
def unfold_dim(ctx, node):
    """x.unfold(dim, size, step): windows along ``dim`` (halo attention's blocks). Along a
    non-channel dim every window position keeps its source's labels; windows over a
    channel dim overlap, and removing a channel would shift them all: pinned."""
    out = relabel(ctx, node)
    labels = ctx.labels(node.args[0])
    dim = ctx.value(ctx.arg(1, "dimension"))
    if labels is not None and labels.ndim and not constant_along(ctx.classes(labels), dim % labels.ndim):
        ctx.pin(labels, f"{node.name}: unfold windows along a channel dim")
    return out


def _window_input(ctx, node, what: str):
    """(channel dim, channel labels) of the input of F.unfold / F.fold, or None when
    channels also vary along the spatial (or block) dims, which are then pinned."""
    x = node.args[0] if node.args else node.kwargs["input"]
    labels = ctx.labels(x)
    if labels is None:
        return None
    ndim = len(ctx.meta(x).shape)
    batched = ndim == (4 if what == "unfold" else 3)  # (N, C, H, W) / (N, C * K, L), else unbatched
    cdim = 1 if batched else 0
    cls = ctx.classes(labels)
    if any(not constant_along(cls, d) for d in range(ndim) if d != cdim):
        ctx.pin(labels, f"{node.name}: {what} of a tensor whose channels vary along its other dims")
        return None
    return cdim, ctx.vector(x, cdim)


def im2col(ctx, node):
    """F.unfold / nn.Unfold (im2col): (N, C, *spatial) -> (N, C * K, L), channel c
    becoming rows c*K .. c*K + K - 1 (K = kernel positions). Removing a channel removes
    its block of rows, so the op is unchanged at the smaller width."""
    got = _window_input(ctx, node, "unfold")
    if got is None:
        return ctx.const_output()
    cdim, vec = got
    k = ctx.meta(node).shape[cdim] // vec.numel()
    return ctx.along(vec.repeat_interleave(k), cdim, ctx.meta(node).ndim)


def col2im(ctx, node):
    """F.fold / nn.Fold (col2im): (N, C * K, L) -> (N, C, *output_size), the K rows of a
    block summed into channel c: the rows of a block go together."""
    got = _window_input(ctx, node, "fold")
    if got is None:
        return ctx.const_output()
    cdim, vec = got
    blocks = vec.reshape(ctx.meta(node).shape[cdim], -1)
    ctx.union(blocks, blocks[:, :1])
    return ctx.along(blocks[:, 0].contiguous(), cdim, ctx.meta(node).ndim)


register("unfold")(unfold_dim)
register(F.unfold, nn.Unfold)(im2col)
register(F.fold, nn.Fold)(col2im)
