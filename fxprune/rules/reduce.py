"""Reductions, pooling and other spatial ops, padding, and size queries.

A reduction over a dim the channels do not vary along passes the labels
through. A sum or a p-norm (p > 0) over the channel dim contracts them (zeroed
channels add nothing: the oracle masks its input); a mean, max or variance over
it mixes them (inexact). Spatial ops
(pooling, interpolation) must not touch the channel dim; when they do, the
channels are pinned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import builtins
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..labels import channel_dim, const_like
from ..masked import MaskedCall, compact_apply
from ..meta import is_multi, tensor_meta
from .layout import relabel
from .pointwise import broadcast_labels, input_arg, zero_blind_norm
from .context import AnalysisContext
from .registry import aten_ops, meta_empty, one_float_input, register

_SUM_LIKE = {"sum", "nansum"}
_NORMS = {"norm": "p", "linalg_vector_norm": "ord", "vector_norm": "ord"}  # name -> its p argument
_STATISTICS = {"std", "var", "std_mean", "var_mean"}  # (input, dim, unbiased, keepdim)
_broadcast_shapes = cast(Callable[..., torch.Size], torch.broadcast_shapes)  # torch leaves it untyped


def _name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t.overloadpacket.__name__)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _reduce_names(name: str) -> tuple[str, ...]:
    """The positional parameters of reduction ``name`` as a method call or a builtin whose
    overloads torch.fx does not choose between (``x.max(1)``, ``torch.std(x, 1)``)."""
    if name in _NORMS:
        return "input", _NORMS[name], "dim", "keepdim", "dtype"
    if name in _STATISTICS:
        return "input", "dim", "unbiased", "keepdim"
    return "input", "dim", "keepdim", "dtype"


def reduce(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """A reduction over ``dim`` (all dims when it is None or empty), kept as size 1 with
    ``keepdim``; ``max``/``min`` of two tensors are elementwise."""
    name = _name(node)
    a = ctx.named_args(_reduce_names(name))
    x = a["input"]
    ndim = ctx.meta(x).ndim
    labels = ctx.labels_or_const(x)
    if name in ("max", "min") and ctx.is_tensor(a.get("other", a.get("dim"))):
        from .pointwise import pointwise
        return pointwise(ctx, node)  # elementwise max(x, y)
    dim = ctx.value(a.get("dim"))
    if name in ("max", "min", "median") and not isinstance(dim, (int, list, tuple)):
        dim = None  # max(x, other) would be pointwise; max(x) reduces all
    if name in _STATISTICS and isinstance(dim, bool):
        dim = None  # std(x, unbiased): over all dims
    keepdim = bool(ctx.value(a.get("keepdim", False)))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = set(range(ndim))
    else:
        dims = {d % ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    cd = channel_dim(labels)
    out_ndim = ndim if keepdim else ndim - len(dims)
    if cd is not None and cd in dims:
        if name in _SUM_LIKE or name in _NORMS and zero_blind_norm(ctx.value(a.get(_NORMS[name], 2))):
            ctx.consume(0)  # the removed channels, zeroed, add nothing (a p-norm with p > 0 too)
        else:
            ctx.inexact(labels, f"{node.name}: {name} over the channel dim", compact_apply)
        out = const_like(out_ndim)
    else:
        out = labels
        for d in sorted(dims, reverse=True):
            out = out.narrow(d, 0, 1)
            if not keepdim:
                out = out.squeeze(d)
    return (out, out) if is_multi(node) else out


def compare(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """``cosine_similarity(a, b, dim)`` and ``pairwise_distance(a, b, p, eps, keepdim)``
    (over the last dim): the inputs meet position by position (their channels pair up,
    broadcasting), then the dim is reduced. Over the channel dim, cosine similarity is a
    sum of products divided by norms of sums: zeroing the removed channels of both inputs
    (the oracle's consumer masks) gives exactly the pruned result; a distance adds ``eps``
    at every position, removed ones too (inexact)."""
    cosine = _name(node) == "cosine_similarity"
    args = ctx.named_args(("x1", "x2", "dim", "eps") if cosine else ("x1", "x2", "p", "eps", "keepdim"))
    a, b = args["x1"], args["x2"]
    shape = _broadcast_shapes(ctx.meta(a).shape, ctx.meta(b).shape)
    labels = broadcast_labels(ctx, node, [(ctx.labels(a), ctx.meta(a).shape), (ctx.labels(b), ctx.meta(b).shape)],
                              out_shape=shape)
    dim = ctx.value(args.get("dim", 1)) if cosine else -1
    keepdim = False if cosine else bool(ctx.value(args.get("keepdim", False)))
    d = dim % len(shape)
    if labels.shape[d] > 1 and channel_dim(labels) == d:
        if cosine:
            ctx.consume(0)
            ctx.consume(1)
        else:
            ctx.inexact(labels, f"{node.name}: distance over the channel dim (eps at every position)",
                        compact_apply)
        return const_like(len(shape) if keepdim else len(shape) - 1)
    out = labels.narrow(d, 0, 1)
    return out if keepdim else out.squeeze(d)


register(F.cosine_similarity, F.pairwise_distance, "cosine_similarity", "pairwise_distance")(compare)


_REDUCTIONS = ["sum", "nansum", "mean", "nanmean", "amax", "amin", "max", "min", "std", "var",
               "norm", "logsumexp", "prod", "median", "all", "any"]
register(*[getattr(torch, n) for n in _REDUCTIONS], *_REDUCTIONS, torch.linalg.vector_norm,
         *aten_ops(*_REDUCTIONS, "linalg_vector_norm"))(reduce)


def _spatial_rank(node: torch.fx.Node, module: Any) -> int | None:
    name = type(module).__name__ if module is not None else _name(node)
    for k in (1, 2, 3):
        if f"{k}d" in name:
            return k
    return None


def spatial(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Pooling and resampling: act on the trailing spatial dims, channel-wise."""
    x = input_arg(ctx, node)
    labels = ctx.labels(x)
    ndim = ctx.meta(x).ndim
    k = _spatial_rank(node, ctx.module if node.op == "call_module" else None)
    k = ndim - 2 if k is None else k
    if labels is None:
        return const_like(ctx.meta(node).ndim) if ctx.is_tensor(node) else None
    cd = channel_dim(labels)
    if cd is not None and cd >= ndim - k:
        ctx.pin(labels, f"{node.name}: spatial op over a channel dim")
        labels = const_like(ndim)
    for d in range(ndim - k, ndim):
        # a value not yet normalized (a position table interpolated to the input's size)
        # has a label per position: each output position mixes several of them
        if labels.shape[d] > 1:
            rows = labels.movedim(d, 0)
            ctx.union(rows, rows[:1])
            labels = labels.narrow(d, 0, 1)
    return (labels, labels) if is_multi(node) else labels


_POOL_MODULES = [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
                 nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                 nn.FractionalMaxPool2d]
_POOL_FUNCTIONS = ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
                   "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                   "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
                   "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
                   "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
                   "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
                   "adaptive_max_pool3d_with_indices"]
_fs = []
for n in _POOL_FUNCTIONS:
    for owner in (F, torch):
        f = getattr(owner, n, None)
        if f is not None and f not in _fs:
            _fs.append(f)
_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def spatial_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.AdaptiveAvgPool1d/2d/3d: the output size from the module (None: the input's)."""
    k = _ADAPTIVE_AVG.get(type(op))
    x = one_float_input(args, kwargs)
    if k is None or x is None:
        return None
    size = op.output_size
    size = (size,) * k if isinstance(size, int) else tuple(size)
    shape = tuple(x.shape)
    if len(shape) not in (k + 1, k + 2) or len(size) != k or min(shape[-k:]) < 1:
        return None
    return meta_empty(shape[:-k] + tuple(n if o is None else o for o, n in zip(size, shape[-k:])), x.dtype)


register(*_POOL_MODULES, *_fs, *aten_ops(
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_bicubic2d_aa",
    "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d"), shape=spatial_shape)(spatial)


def grid_sample(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Sampling at given coordinates: each channel is resampled on its own (the grid's
    last dim holds coordinates, never channels)."""
    grid = ctx.named_args(("input", "grid", "mode", "padding_mode", "align_corners"))["grid"]
    ctx.pin(ctx.labels(grid), f"{node.name}: sampling coordinates")
    return spatial(ctx, node)


def affine_grid(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Sampling coordinates from affine coefficients: they are not channels."""
    theta = ctx.named_args(("theta", "size", "align_corners"))["theta"]
    ctx.pin(ctx.labels(theta), f"{node.name}: affine transform coefficients")
    return const_like(ctx.meta(node).ndim)


register(F.grid_sample, *aten_ops("grid_sampler", "grid_sampler_2d", "grid_sampler_3d"))(grid_sample)
register(F.affine_grid, *aten_ops("affine_grid_generator"))(affine_grid)


register(torch.var_mean, torch.std_mean)(reduce)  # two reductions over the same dims


def pad(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Constant padding of the channel dim adds CONST channels; other dims pass through."""
    a = ctx.named_args(("input", "pad", "mode", "value"))
    x = a["input"]
    labels = ctx.labels(x)
    ndim = ctx.meta(x).ndim
    if node.op == "call_module":
        m = ctx.module
        amounts = list(m.padding) if isinstance(m.padding, (tuple, list)) else [m.padding] * (2 * (ndim - 2))
        mode = "constant" if "Constant" in type(m).__name__ or "Zero" in type(m).__name__ else "other"
    else:
        amounts = list(ctx.value(a["pad"]))
        # aten.constant_pad_nd(self, pad, value) has no mode argument
        mode = "constant" if _name(node) == "constant_pad_nd" else ctx.value(a.get("mode", "constant"))
    if labels is None:
        return const_like(ndim)
    cd = channel_dim(labels)
    touched = {ndim - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] or amounts[2 * i + 1]}
    if cd is None or cd not in touched:
        return labels
    if mode != "constant":
        ctx.pin(labels, f"{node.name}: {mode} padding of a channel dim")
        return const_like(ndim)
    i = ndim - 1 - cd
    only = [0] * (2 * i) + amounts[2 * i:2 * i + 2]
    return F.pad(labels, only, value=0)  # value 0 is the CONST label


register(F.pad, nn.ZeroPad1d if hasattr(nn, "ZeroPad1d") else None, nn.ZeroPad2d,
         getattr(nn, "ZeroPad3d", None), nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
         nn.ReflectionPad1d, nn.ReflectionPad2d, getattr(nn, "ReflectionPad3d", None),
         nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
         getattr(nn, "CircularPad1d", None), getattr(nn, "CircularPad2d", None),
         getattr(nn, "CircularPad3d", None), *aten_ops("pad", "constant_pad_nd"))(pad)


# -- size queries ----------------------------------------------------------------
_SHAPE_SINKS = {"view", "reshape", "expand", "split", "chunk", "narrow", "unflatten", "new_zeros",
                "new_ones", "new_empty", "new_full", "repeat", "tile", "flatten", "permute",
                "transpose", "size", "_assert", "eq", "ne", "layer_norm", "rms_norm"}
_SHAPE_FUNCTIONS = (torch.reshape, torch.split, torch.zeros, torch.ones, torch.empty, torch.full,
                    torch.arange, torch.narrow, torch.unflatten, torch._assert)


def is_shape_sink(node: torch.fx.Node) -> bool:
    """Whether ``node`` takes ints as shapes (sizes of a view, a factory, a layer norm's
    normalized shape, the bounds of a tensor's slice: ``x[..., : x.shape[-1] // 2]``),
    not as values."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and tensor_meta(node.args[0]) is not None
    return _name(node) in _SHAPE_SINKS or node.op == "call_function" and node.target in _SHAPE_FUNCTIONS


def _feeds_only_shapes(node: torch.fx.Node, seen: set[torch.fx.Node] | None = None,
                       entries: tuple[int, set[int]] | None = None) -> bool:
    """True when every use of an int derived from a size ends up as a shape argument.
    ``entries`` = (length, channel positions) when ``node`` is a size tuple: an index
    that picks none of the channel positions (``x.shape[-2:]``) does not use them."""
    seen = seen if seen is not None else set()
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        if entries is not None and user.op == "call_function" and user.target is operator.getitem \
                and isinstance(user.args[1], (int, slice)):
            n, channels = entries
            index = user.args[1]
            picked = range(n)[index] if isinstance(index, slice) else \
                [index % n] if -n <= index < n else []
            if not channels.intersection(picked):
                continue
        if is_shape_sink(user):
            continue
        if user.op == "call_function" and user.target in (operator.getitem, operator.floordiv,
                                                          operator.mul, operator.add, operator.sub,
                                                          operator.mod, builtins.int):
            if not _feeds_only_shapes(user, seen):
                return False
        else:
            return False
    return True


# fields of torch.return_types (max, min, sort, topk, kthvalue, mode, median, cummax, ...)
_FIELDS = {"values": 0, "indices": 1}


def size_query(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """x.size(), x.shape, x.dim(), x.numel(): no labels; using a channel count as a
    *value* (not a shape) changes results when channels go, so it marks them inexact."""
    x: Any = node.args[0]
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] != "shape":
        if not ctx.is_tensor(node):
            return None  # dtype, device, ...
        if node.args[1] in ("T", "mT", "H", "mH"):
            return relabel(ctx, node)
        if ctx.labels(x) is not None:
            return ctx.labels(x)  # .real, .imag, .data: same positions
        # a field of a returned structure (x.max(dim).values, topk(...).indices)
        field: Any = node.args[1]
        parts, index = ctx.tuple_labels(x), _FIELDS.get(field)
        if parts is not None and index is not None and index < len(parts) and parts[index] is not None:
            return parts[index]
        ctx.barrier(f"{node.name}: attribute {node.args[1]!r} of {x.name if hasattr(x, 'name') else x} "
                    f"is not known")
        return ctx.const_output()
    labels = ctx.labels(x)
    cd = None if labels is None else channel_dim(labels)
    if labels is None or cd is None:
        return None
    dim = ctx.named_args(("input", "dim")).get("dim") if node.target == "size" or _name(node) == "sym_size" \
        else None  # x.size(dim)
    if dim is not None:
        if ctx.value(dim) % labels.ndim != cd:
            return None
        ctx.channel_sized[node.name] = True
    entries = None
    if node.target in ("size", "shape") or node.target is builtins.getattr:
        ctx.channel_sized[node.name] = {cd}  # a size tuple: which entries count channels
        entries = (labels.ndim, {cd})
    else:
        ctx.channel_sized[node.name] = True
    if not _feeds_only_shapes(node, entries=entries):
        ctx.inexact(labels, f"{node.name}: the channel count is used as a value", kept_count)
    return None


def kept_count(call: MaskedCall) -> Any:
    """The size query as the pruned model answers it: on a tensor whose channel dim holds
    the kept channels only. The oracle uses this value where the count is a value (a
    scale, a divisor) and the full one where it is a shape."""
    kept = call.input_kept()
    value = call.arg("input")
    if kept is None or not isinstance(value, torch.Tensor):
        return call.run(call.args, call.kwargs)
    shape = list(value.shape)
    shape[kept[0]] = kept[1].numel()
    args, kwargs = list(call.args), dict(call.kwargs)
    call.with_arg(args, kwargs, "input", torch.empty(shape, dtype=value.dtype, device="meta"))
    return call.run(tuple(args), kwargs)


# a flag on the function (a value beside the full one: see fxprune.verify), which mypy does not model
kept_count.counts = True  # type: ignore[attr-defined]


# aten.sym_size(x, dim) is x.size(dim) at run time
register("size", "dim", "numel", torch.numel, builtins.getattr, builtins.len, *aten_ops("sym_size"))(size_query)
