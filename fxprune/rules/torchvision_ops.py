"""Rules for torchvision helper functions that torchvision marks with
``torch.fx.wrap`` (so they appear as single calls in a traced graph)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..labels import channel_dim, const_like
from ..errors import Unsupported
from .conv import conv_channels
from .context import AnalysisContext
from .registry import register


def _targets(*names: str) -> list[Any]:
    try:
        from torchvision.models import swin_transformer
    except Exception:  # torchvision is optional
        return []
    return [getattr(swin_transformer, n) for n in names if hasattr(swin_transformer, n)]


def patch_merging_pad(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Swin's ``_patch_merging_pad(x)``: pads H and W of an (..., H, W, C) tensor and
    concatenates its four 2x2-strided sub-grids along C, so the output channels are the
    input channels four times over."""
    x = ctx.named_args(("x",))["x"]
    labels = ctx.labels(x)
    ndim = ctx.meta(x).ndim
    if labels is None:
        return None
    cd = channel_dim(labels)
    if cd is not None and cd != ndim - 1:
        ctx.pin(labels, f"{node.name}: patch merging over a channel dim")
        return const_like(ndim)
    return torch.cat([labels] * 4, -1) if cd is not None else labels


register(*_targets("_patch_merging_pad"))(patch_merging_pad)


def deform_conv2d(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """torchvision's deformable convolution (input, weight, offset, mask, bias, stride,
    padding, dilation, groups, offset groups, use_mask): a convolution over the input's
    channels whose sampling positions come from ``offset`` (and ``mask``). Their channels
    are kernel positions: pinned. Input channels of every offset group (and weight group)
    keep equal widths."""
    a = ctx.named_args()
    x, weight, offset, mask, bias = (a[n] for n in ("input", "weight", "offset", "mask", "bias"))
    groups, offset_groups = a["groups"], a["offset_groups"]
    path = ctx.attr_path(weight)
    if path is None or not isinstance(groups, int) or not isinstance(offset_groups, int):
        raise Unsupported("the weight must be a parameter and the group counts numbers")
    for t, what in ((offset, "offsets"), (mask, "mask")):
        labels = ctx.labels(t)
        if labels is not None and labels.ndim == 4 and labels.shape[1] > 1:
            ctx.pin(labels, f"{node.name}: the deformable convolution's {what} (their channels are kernel positions)")
    in_vec = ctx.vector(x, 1)
    if groups > 1 and groups == in_vec.numel():
        raise Unsupported("a depthwise deformable convolution is not analysed")
    ctx.consume(0)
    w = ctx.tensor(path)
    out_vec, in_cols, _ = conv_channels(ctx, node, in_vec, w.shape[0], groups)
    if offset_groups > 1:
        blocks = in_vec.reshape(offset_groups, -1)
        ctx.union(blocks, blocks[:1])
    ctx.align(path, ctx.along(out_vec, 0, w.ndim), "out")
    ctx.align(path, ctx.along(in_cols, 1, w.ndim), "in")
    bias_path = ctx.attr_path(bias)
    if bias_path is not None:
        ctx.align(bias_path, out_vec, "out")
    elif ctx.is_tensor(bias):  # zeros made in forward for a layer without bias
        ctx.union(ctx.vector(bias, 0), out_vec)
    return ctx.along(out_vec, 1, ctx.meta(node).ndim)


try:
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    register(torch.ops.torchvision.deform_conv2d)(deform_conv2d)
except (ImportError, AttributeError, RuntimeError):  # torchvision is optional
    pass
