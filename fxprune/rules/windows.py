"""Sliding windows: ``Tensor.unfold`` (windows along a dim), ``F.unfold``/``nn.Unfold``
(im2col: a channel becomes its block of kernel rows) and ``F.fold``/``nn.Fold``
(col2im: a block of rows summed back into one channel)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..labels import constant_along
from .context import AnalysisContext
from .layout import relabel
from .pointwise import input_arg
from .registry import aten_ops, register


def unfold_dim(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """x.unfold(dim, size, step): windows along ``dim`` (halo attention's blocks). Along a
    non-channel dim every window position keeps its source's labels; windows over a
    channel dim overlap, and removing a channel would shift them all: pinned."""
    out = relabel(ctx, node)
    a = ctx.named_args(("input", "dimension", "size", "step"))
    labels = ctx.labels(a["input"])
    dim = ctx.value(a["dimension"])
    if labels is not None and labels.ndim and not constant_along(ctx.classes(labels), dim % labels.ndim):
        ctx.pin(labels, f"{node.name}: unfold windows along a channel dim")
    return out


def _window_input(ctx: AnalysisContext, node: torch.fx.Node, what: str) -> tuple[int, torch.Tensor] | None:
    """(channel dim, channel labels) of the input of F.unfold / F.fold, or None when
    channels also vary along the spatial (or block) dims, which are then pinned."""
    x = input_arg(ctx, node)
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


def im2col(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """F.unfold / nn.Unfold (im2col): (N, C, *spatial) -> (N, C * K, L), channel c
    becoming rows c*K .. c*K + K - 1 (K = kernel positions). Removing a channel removes
    its block of rows, so the op is unchanged at the smaller width."""
    got = _window_input(ctx, node, "unfold")
    if got is None:
        return ctx.const_output()
    cdim, vec = got
    k = ctx.meta(node).shape[cdim] // vec.numel()
    return ctx.along(vec.repeat_interleave(k), cdim, ctx.meta(node).ndim)


def col2im(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """F.fold / nn.Fold (col2im): (N, C * K, L) -> (N, C, *output_size), the K rows of a
    block summed into channel c: the rows of a block go together."""
    got = _window_input(ctx, node, "fold")
    if got is None:
        return ctx.const_output()
    cdim, vec = got
    blocks = vec.reshape(ctx.meta(node).shape[cdim], -1)
    ctx.union(blocks, blocks[:, :1])
    return ctx.along(blocks[:, 0].contiguous(), cdim, ctx.meta(node).ndim)


register("unfold", *aten_ops("unfold"))(unfold_dim)
register(F.unfold, nn.Unfold, *aten_ops("im2col"))(im2col)
register(F.fold, nn.Fold, *aten_ops("col2im"))(col2im)
