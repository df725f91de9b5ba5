"""Views: view, reshape, unflatten, expand, expand_as.

Where a view splits one channel dim into two (hidden -> heads x head_dim) the
analysis policy picks which of them stays prunable (``split_relabel``); expand's
copies of a kv head become query heads of their own under grouped-query
attention. The rewrite hooks write the new sizes of pruned dims into the size
arguments (a ``view`` whose sizes change becomes ``reshape``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from ..labels import CONST, channel_dim
from ..meta import tensor_meta
from .context import AnalysisContext, RewriteContext, op_name
from .layout import relabel
from .pointwise import input_arg
from .registry import aten_ops, register


def _shape_args(args: Any) -> tuple[list[Any], bool]:
    """The shape given to view/reshape/expand as a list, and how it was passed."""
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return list(args[0]), True
    return list(args), False


def rewrite_sizes(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """view/reshape/expand: integer sizes of changed output dims become the new sizes. A
    function (``torch.reshape``, ATen's view/reshape/expand) takes them as one argument
    (``shape`` or ``size``), which is rewritten where the call passed it; a method takes
    them as varargs or one sequence after the tensor, and is rebuilt in the same form."""
    old_out, new_out = r.old_shape(old), r.new_shape(old)
    key: str | None = None  # the size argument of a function; a method takes varargs
    if old.op == "call_function":
        bound = r.named_args(old)
        key = "shape" if "shape" in bound else "size"
        if not isinstance(bound[key], (list, tuple, torch.Size)):
            return  # one size tuple computed at run time: it follows the sizes it is made of
        sizes, packed = list(r.named_args(new)[key]), True
        old_sizes = list(bound[key])
    else:
        sizes, packed = _shape_args(new.args[1:])  # x.view(*sizes) or x.view(sizes)
        old_sizes, _ = _shape_args(old.args[1:])
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
    if key is None:
        if old.target == "view":
            new.target = "reshape"
        new.args = (new.args[0], *([sizes] if packed else sizes))
    elif old.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
        # aten.reshape(self, shape) names its sizes apart from view(self, size): both by position
        new.args, new.kwargs = (r.named_args(new)["input"], sizes), {}
        new.target = torch.ops.aten.reshape.default
    else:
        r.set_arg(new, key, sizes)


def split_relabel(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """view/reshape/unflatten: where one channel dim becomes two (hidden -> heads x head_dim)
    the analysis policy decides which of them stays prunable. A dim the graph unpacks right
    away (the 3 of a fused qkv reshaped to (3, heads, head_dim), then q, k, v = x[0], x[1],
    x[2]) stacks different tensors: it is not a candidate."""
    ctx.splits_channels = True
    ctx.avoid_dims = _unpacked_dims(node, ctx.meta(node).ndim)
    return relabel(ctx, node)


def _unpacked_dims(node: torch.fx.Node, ndim: int) -> set[int]:
    """Dims of ``node``'s output that users index with an int (select, unbind, x[0]),
    looking through permute/transpose/contiguous."""
    found: set[int] = set()
    todo = [(node, list(range(ndim)))]  # (node, output dim of `node` -> dim of the original)
    while todo:
        cur, where = todo.pop()
        for user in cur.users:
            name = op_name(user)
            args: Any = user.args
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


register("view", "reshape", torch.reshape, *aten_ops("view", "_unsafe_view", "reshape"),
         rewrite=rewrite_sizes)(split_relabel)


def expand(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Copies along new size-1 dims. Grouped-query attention repeats every kv head for
    its query heads (``k[:, :, None].expand(B, kv, rep, S, D)``, then a reshape to
    ``kv * rep`` heads). The copies get labels of their own, one per query head inside a
    group (the kv heads themselves then stay whole), with ``gqa="q_heads"``, and for a
    single kv head (multi-query attention: no kv group to remove) with whole heads."""
    out = split_relabel(ctx, node)
    x = input_arg(ctx, node)  # x.expand(*sizes)
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


def _merged_with_previous(node: torch.fx.Node, d: int, shape: tuple[int, ...]) -> bool:
    """Whether the only use of ``node`` (through contiguous/clone) reshapes dims d-1 and d
    of it into one (repeat_kv's reshape to kv * rep heads)."""
    users = list(node.users)
    while len(users) == 1 and op_name(users[0]) in ("contiguous", "clone"):
        users = list(users[0].users)
    if len(users) != 1 or op_name(users[0]) not in ("reshape", "view", "_unsafe_view"):
        return False
    out = tensor_meta(users[0])
    return out is not None and tuple(out.shape) == (*shape[:d - 1], shape[d - 1] * shape[d], *shape[d + 1:])


register("expand", *aten_ops("expand"), rewrite=rewrite_sizes)(expand)


_UNFLATTEN = ("input", "dim", "sizes")  # x.unflatten(dim, sizes)


def rewrite_unflatten(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """The integer sizes of the pruned dims among ``sizes`` (a module's
    ``unflattened_size``) become their new sizes."""
    old_out, new_out = r.old_shape(old), r.new_shape(old)
    if old_out == new_out:
        return
    a = r.named_args(old, _UNFLATTEN)
    in_ndim = len(r.old_shape(a["input"]))  # dim counts the input's dims
    if old.op == "call_module":
        m = r.module(old)
        d = m.dim % in_ndim
        m.unflattened_size = tuple(new_out[d:d + len(m.unflattened_size)])
        return
    d = a["dim"] % in_ndim
    sizes: Any = r.named_args(new, _UNFLATTEN)["sizes"]
    new_sizes = [new_out[d + k] if s != -1 and old_out[d + k] != new_out[d + k] else s
                 for k, s in enumerate(sizes)]
    r.set_arg(new, "sizes", new_sizes, _UNFLATTEN)


register("unflatten", torch.unflatten, nn.Unflatten, *aten_ops("unflatten"), rewrite=rewrite_unflatten)(split_relabel)


def expand_as(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``x.expand_as(y)``. A value that carries no channel, expanded from size 1 to
    ``y``'s shape (a norm kept with keepdim, then divided into ``y``: F.normalize as
    export writes it), has ``y``'s positions: its size follows ``y`` at run time and its
    values do not change along the expanded dims. Otherwise the op runs on the labels."""
    a = ctx.named_args(("input", "other"))  # x.expand_as(other)
    x, y = a["input"], a["other"]
    xl, yl = ctx.labels(x), ctx.labels(y)
    if yl is not None and (xl is None or not bool((ctx.classes(xl) != CONST).any())):
        shape = ctx.meta(x).shape
        shape = (1,) * (yl.ndim - len(shape)) + tuple(shape)
        if all(n == 1 or yl.shape[d] == 1 for d, n in enumerate(shape)):
            return yl
    return relabel(ctx, node)


register("expand_as", *aten_ops("expand_as"))(expand_as)
