"""Layout ops: the output's labels are a rearrangement of the input's.

``relabel`` runs the node's very own op on the integer label tensors (expanded to
the real shapes where the op needs them), so permute, transpose, flatten, squeeze,
flip, repeat, pixel_shuffle and friends are right by construction; the other
shape families (views, concat, indexing, windows) build on it. A roll or
triu/tril along a channel dim pins it; channel_shuffle couples the channels at
the same index of every group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .context import AnalysisContext, attr_target
from .registry import aten_ops, register


def concrete(ctx: AnalysisContext, a: Any, *, full: bool = True) -> Any:
    """``a`` (a node argument) with every tensor node replaced by its labels (expanded to
    its shape when ``full``) and every other node by its value."""
    if isinstance(a, torch.fx.Node):
        if ctx.is_tensor(a):  # expanded, not copied: dims where labels repeat keep stride 0
            return ctx.full(a) if full else ctx.labels(a)
        return ctx.value(a)
    if isinstance(a, (list, tuple)):
        return type(a)(concrete(ctx, v, full=full) for v in a)
    if isinstance(a, slice):
        return slice(concrete(ctx, a.start), concrete(ctx, a.stop), concrete(ctx, a.step))
    if isinstance(a, dict):
        return {k: concrete(ctx, v, full=full) for k, v in a.items()}
    return a


def _call(ctx: AnalysisContext, node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        return getattr(args[0], attr_target(node))(*args[1:], **kwargs)
    if node.op == "call_module":
        return ctx.module(*args, **kwargs)
    return cast(Callable[..., Any], node.target)(*args, **kwargs)


def _as_labels(out: Any) -> Any:
    if isinstance(out, (list, tuple)):
        return tuple(_as_labels(o) for o in out)
    return out


def relabel(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Run the node's own op on the label tensors."""
    args = concrete(ctx, node.args)
    kwargs = concrete(ctx, node.kwargs)
    try:  # on expanded label tensors first: no copy where the labels repeat
        return _as_labels(_call(ctx, node, args, kwargs))
    except RuntimeError:  # a view that the expanded strides do not allow
        args, kwargs = _contiguous(args), _contiguous(kwargs)
        return _as_labels(_call(ctx, node, args, kwargs))


def _contiguous(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.contiguous()
    if isinstance(a, (list, tuple)):
        return type(a)(_contiguous(v) for v in a)
    if isinstance(a, dict):
        return {k: _contiguous(v) for k, v in a.items()}
    return a


def roll(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """roll along the given dims; channels moving along a rolled dim are pinned (a roll
    with no dims rolls the flattened tensor, so any channel dim counts)."""
    out = relabel(ctx, node)
    a = ctx.named_args(("input", "shifts", "dims"))  # x.roll(shifts, dims)
    labels = ctx.labels(a["input"])
    if labels is None or not labels.ndim or max(labels.shape) == 1:
        return out
    dims = ctx.value(a.get("dims"))
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(labels.shape[d % labels.ndim] > 1 for d in dims):
        ctx.pin(labels, f"{node.name}: roll along a channel dim")
    return out


def triangle(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """triu/tril keep an element by its (row, column) position in the last two dims: the
    leading dims pass through, channels along the last two are pinned (removing one moves
    every later position across the diagonal)."""
    x = ctx.named_args(("input", "diagonal"))["input"]  # x.triu(diagonal)
    labels = ctx.labels(x)
    if labels is not None and labels.ndim >= 2 and (labels.shape[-1] > 1 or labels.shape[-2] > 1):
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "triu/tril")
        ctx.pin(labels, f"{node.name}: {op.split('.')[0]} along a channel dim")
    return ctx.labels_or_const(x)  # same shape, each element where it was


def channel_shuffle(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """channel_shuffle(x, g) is view(B, g, C/g, ...) -> transpose(1, 2) -> view(B, C, ...):
    channels at the same index inside every group go together, so the op still shuffles
    correctly at the smaller width."""
    a = ctx.named_args(("input", "groups"))
    x = a["input"]
    groups = ctx.module.groups if node.op == "call_module" else ctx.value(a["groups"])
    vec = ctx.vector(x, 1)
    blocks = vec.reshape(groups, -1)
    ctx.union(blocks, blocks[:1])
    shuffled = blocks.t().reshape(-1)
    return ctx.along(shuffled, 1, ctx.meta(node).ndim)


_F_SHUFFLE = getattr(F, "channel_shuffle", None)
register(torch.channel_shuffle, nn.ChannelShuffle,
         _F_SHUFFLE if _F_SHUFFLE is not torch.channel_shuffle else None,
         *aten_ops("channel_shuffle", "native_channel_shuffle"))(channel_shuffle)


# -- ops that only move positions ------------------------------------------------------
register("roll", torch.roll, *aten_ops("roll"))(roll)
register("triu", "tril", "triu_", "tril_", torch.triu, torch.tril, *aten_ops("triu", "tril", "triu_", "tril_"))(triangle)

register("flatten", "permute", "transpose", "t", "squeeze", "unsqueeze", "movedim", "moveaxis",
         "swapaxes", "swapdims", "flip", "rot90", "repeat", "repeat_interleave", "tile", "view_as",
         "reshape_as", "mT",
         torch.flatten, torch.permute, torch.transpose, torch.t, torch.squeeze, torch.unsqueeze,
         torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.flip, torch.rot90,
         torch.repeat_interleave, torch.tile, torch.pixel_shuffle, torch.pixel_unshuffle,
         nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle,
         *aten_ops("flatten", "permute", "transpose", "t", "squeeze", "unsqueeze", "movedim", "flip", "rot90",
                   "repeat", "repeat_interleave", "tile", "pixel_shuffle", "pixel_unshuffle", "numpy_T", "mT",
                   "view_as", "reshape_as"))(relabel)
