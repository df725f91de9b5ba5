"""Concatenation and splitting: cat, stack, split, chunk, tensor_split, unbind.

cat and stack run on the label tensors (expanded only along the dims that carry
labels or are concatenated); split and friends run the op itself on the labels,
and their rewrite hook gives the pieces their new sizes. unbind over a channel
dim would change the number of outputs: that dim is pinned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from ..errors import Unsupported
from ..arguments import bind_args
from .context import AnalysisContext, RewriteContext
from .layout import relabel
from .registry import aten_ops, meta_empty, register


def unbind(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """unbind over a labelled dim would change the number of outputs: pin that dim."""
    out = relabel(ctx, node)
    a = ctx.named_args(("input", "dim"))
    x = a["input"]
    dim = ctx.value(a.get("dim", 0))
    labels = ctx.labels(x)
    if labels is not None and labels.shape[dim % labels.ndim] > 1:
        ctx.pin(labels, f"{node.name}: unbind over a channel dim")
    return out


register("unbind", torch.unbind, *aten_ops("unbind"))(unbind)


def cat(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """cat/stack: the inputs' labels side by side along ``dim`` (stack: along a new dim).
    torch.concatenate and torch.concat also take the dim as ``axis``. cat leaves out a 1-d
    empty input beside tensors of other ranks, as torch does."""
    a = ctx.named_args(("tensors", "dim"))
    tensors = a["tensors"]
    dim = ctx.value(a["dim"] if "dim" in a else a.get("axis", 0))
    ndim = ctx.meta(node).ndim
    stack = node.target is torch.stack or getattr(node.target, "overloadpacket", None) is torch.ops.aten.stack
    d = None if stack else dim % ndim
    if d is not None and ndim != 1:  # torch skips 1-d empty tensors (a cache's initial torch.tensor([]))
        tensors = [t for t in tensors if ctx.meta(t).shape != (0,)]
    ls = [ctx.labels_or_const(t) for t in tensors]
    if d is None:
        return torch.stack([l.expand(ctx.meta(t).shape) for l, t in zip(ls, tensors)], dim)
    need = {k for l in ls for k in range(l.ndim) if l.shape[k] > 1} | {d}
    parts = []
    for l, t in zip(ls, tensors):
        shape = ctx.meta(t).shape
        parts.append(l.expand(tuple(s if k in need else 1 for k, s in enumerate(shape))))
    return torch.cat(parts, d)


def cat_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """torch.cat/concat of tensors of one dtype that agree off the cat dim."""
    if op is not torch.cat and op is not torch.concat:
        return None
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if set(kwargs) - {"tensors", "dim"} or not isinstance(tensors, (list, tuple)) or not tensors or \
            not isinstance(dim, int) or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    if first.ndim == 0 or not -first.ndim <= dim < first.ndim:
        return None
    d = dim % first.ndim
    rest = [first.shape[:d], first.shape[d + 1:]]
    if any(t.ndim != first.ndim or t.dtype != first.dtype or [t.shape[:d], t.shape[d + 1:]] != rest
           for t in tensors):
        return None
    return meta_empty((*first.shape[:d], sum(t.shape[d] for t in tensors), *first.shape[d + 1:]), first.dtype)


register(torch.cat, torch.concat, getattr(torch, "concatenate", None), torch.stack, *aten_ops("cat", "concat", "stack"),
         shape=cat_shape)(cat)


_SPLIT_NAMES = ("input", "sections", "dim")  # a method call's positional arguments


def _split_input(a: Mapping[str, Any]) -> Any:
    """The tensor split (torch.split calls it ``tensor``)."""
    return a["input"] if "input" in a else a["tensor"]


def rewrite_split(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """split/chunk with a changed dim becomes split with explicit new sizes."""
    a = r.named_args(old, _SPLIT_NAMES)
    x = _split_input(a)
    dim: Any = a.get("dim", 0)
    n_out = len(r.groups.node_labels[old.name])
    d = dim % len(r.old_shape(x))
    if r.old_shape(x)[d] == r.new_shape(x)[d]:
        return
    sizes = [r.new_shape(old, i)[d] for i in range(n_out)]
    # the whole call is rebuilt: the target changes (chunk, tensor_split become split)
    new.op, new.target = "call_function", torch.split
    new.args = (_split_input(bind_args(new, _SPLIT_NAMES).values), sizes, dim)
    new.kwargs = {}


def split(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """split/chunk/split_with_sizes: pieces of ``x`` along ``dim``, run on the labels."""
    return relabel(ctx, node)


register("split", "chunk", "split_with_sizes", torch.split, torch.chunk,
         *aten_ops("split", "split_with_sizes", "chunk", "unsafe_split"), rewrite=rewrite_split)(split)


def tensor_split(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """tensor_split(x, sections or indices, dim): pieces of ``x`` like split (the rewrite
    gives the pieces their new sizes); indices passed as a tensor are not analysed."""
    a = ctx.named_args(_SPLIT_NAMES)
    if any(ctx.is_tensor(v) for k, v in a.items() if k != "input"):
        raise Unsupported("split points computed in the graph are not analysed")
    return relabel(ctx, node)


register("tensor_split", torch.tensor_split, *aten_ops("tensor_split"), rewrite=rewrite_split)(tensor_split)
