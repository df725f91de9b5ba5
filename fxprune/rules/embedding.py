"""Embedding lookups (and bags of them, summed, averaged or maxed per bag): the
embedding dim is a fresh channel source (the weight's columns). A weight tied to an
output projection is the same tensor: its alignments are unioned, so both uses prune
together."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..labels import const_like
from ..meta import get_meta, is_multi
from ..errors import Unsupported
from .context import AnalysisContext, RewriteContext
from .registry import aten_ops, register


def embedding(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    weight: str | None
    if node.op == "call_module":
        weight = f"{node.target}.weight"
    else:
        weight = ctx.attr_path(ctx.named_args()["weight"])  # (ATen takes it first: by name alike)
        if weight is None:
            raise Unsupported("the embedding weight must be a parameter of the module (get_attr)")
    w = ctx.tensor(weight)
    vec = ctx.fresh((w.shape[1],), f"{node.name} embedding dim")
    ctx.align(weight, ctx.along(vec, 1, 2), "out")
    if _max_norm(ctx, node) is not None:  # rows rescaled by their norm over the embedding dim
        ctx.inexact(vec, f"{node.name}: max_norm renormalizes each looked-up row over the embedding dim")
    if is_multi(node):  # aten embedding_bag: (output, offsets to bags, bag sizes, max indices)
        out, *rest = get_meta(node)
        return (ctx.along(vec, -1, out.ndim), *(None if m is None else const_like(m.ndim) for m in rest))
    return ctx.along(vec, -1, ctx.meta(node).ndim)


def _max_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """The max_norm of an embedding lookup (F.embedding's 4th argument, F.embedding_bag's
    4th), or None."""
    if node.op == "call_module":
        return getattr(ctx.module, "max_norm", None)
    if isinstance(node.target, torch._ops.OpOverload):
        return None  # ATen: the renorm is an op of its own (embedding_renorm_), with no rule
    return ctx.named_args().get("max_norm")


def rewrite_embedding(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        m.embedding_dim = m.weight.shape[1]


register(nn.Embedding, nn.EmbeddingBag, F.embedding, F.embedding_bag, rewrite=rewrite_embedding)(embedding)
# export's forms (aten.embedding takes the weight first); the rewrite has nothing to update there
register(*aten_ops("embedding", "embedding_bag", "_embedding_bag"))(embedding)
