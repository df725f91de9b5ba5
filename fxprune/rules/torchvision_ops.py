"""Rules for torchvision helper functions that torchvision marks with
``torch.fx.wrap`` (so they appear as single calls in a traced graph)."""

from __future__ import annotations

import torch

from ..labels import channel_dim, const_like
from .registry import register


def _targets(*names):
    try:
        from torchvision.models import swin_transformer
    except Exception:  # torchvision is optional
        return []
    return [getattr(swin_transformer, n) for n in names if hasattr(swin_transformer, n)]


def patch_merging_pad(ctx, node):
    """Swin's ``_patch_merging_pad(x)``: pads H and W of an (..., H, W, C) tensor and
    concatenates its four 2x2-strided sub-grids along C, so the output channels are the
    input channels four times over."""
    x = node.args[0]
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
