"""Normalization layers: batch, instance, group, layer and RMS norm, as modules and
as functional calls.

Batch and instance norm act per channel (exact). Layer norm over a pruned dim
and group norm with several channels per group mix channels: their groups are
marked inexact. Group norm keeps its group count by removing the same local
channels from every group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import Unsupported
from ..labels import const_like
from ..masked import MaskedCall, compact, scatter
from ..meta import get_meta, is_multi
from .context import AnalysisContext, RewriteContext
from .registry import aten_ops, meta_empty, one_float_input, register

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
       nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _channel_tensors(ctx: AnalysisContext, node: torch.fx.Node, names: list[str],
                     computed: list[Any] | None = None) -> list[tuple[str, str]]:
    """Attribute paths of the per-channel tensors ``names`` (module attributes, or named
    arguments read by get_attr). Where ``computed`` is given, tensors computed in the
    graph are collected there instead of being refused."""
    found: list[tuple[str, str]] = []
    if node.op == "call_module":
        for name in names:
            if getattr(ctx.module, name, None) is not None:
                found.append((f"{node.target}.{name}", name))
        return found
    args = ctx.named_args()
    for name in names:
        a = args.get(name)
        if a is None:
            continue
        path = ctx.attr_path(a)
        if path is None and computed is not None and ctx.is_tensor(a):
            computed.append(a)
            continue
        if path is None:
            raise Unsupported(f"{name} must be a parameter or buffer of the module (get_attr)")
        found.append((path, name))
    return found


def _role(name: str) -> str:
    """Affine parameters of a norm are "norm" members, running statistics "stat"."""
    return "stat" if name.startswith("running") else "norm"


def batch_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Per-channel affine (and statistics) along dim 1."""
    x = ctx.named_args(("input", "running_mean", "running_var", "weight", "bias"))["input"]
    # read by name, aligned in the order the call passes them (F.batch_norm: the statistics
    # first; ATen: the affine parameters first)
    names = ["weight", "bias", "running_mean", "running_var"]
    if not isinstance(node.target, torch._ops.OpOverload):
        names = names[2:] + names[:2]
    cdim = 1 if ctx.meta(x).ndim > 1 else 0
    vec = ctx.vector(x, cdim)
    computed: list[Any] = []  # an affine weight computed in the graph (NFNet's gain * scale)
    for path, name in _channel_tensors(ctx, node, names, computed):
        ctx.align(path, vec, _role(name))
    for a in computed:
        ctx.union(ctx.vector(a, 0), vec)
    out = ctx.labels(x) if ctx.labels(x) is not None else ctx.along(vec, cdim, ctx.meta(x).ndim)
    if is_multi(node):  # native batch norm ops: (output, saved statistics...)
        return (out, *(None if m is None else const_like(m.ndim) for m in get_meta(node)[1:]))
    return out


def rewrite_batch_norm(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        x = r.named_args(old, ("input",))["input"]
        r.module(old).num_features = r.new_shape(x)[1 if len(r.old_shape(x)) > 1 else 0]


def batch_norm_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.BatchNorm1d/2d/3d keep their input's shape (their meta kernels run Python
    decompositions: computing the shape is ~100x cheaper)."""
    x = one_float_input(args, kwargs)
    if x is None or type(op) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or \
            x.ndim < 2 or x.shape[1] != op.num_features:
        return None  # let the kernel raise its own error
    return meta_empty(x.shape, x.dtype)


register(*_BN, F.batch_norm, F.instance_norm, rewrite=rewrite_batch_norm, shape=batch_norm_shape)(batch_norm)
# export's forms (the affine parameters before the statistics): no rewrite hook
register(*aten_ops("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training",
                   "_native_batch_norm_legit", "native_batch_norm"))(batch_norm)


_LAYER_NORM = ("input", "normalized_shape", "weight", "bias", "eps")
_GROUP_NORM = ("input", "num_groups", "weight", "bias", "eps")


def layer_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Normalizes over the last ``len(normalized_shape)`` dims, with per-position affine."""
    a = ctx.named_args(_LAYER_NORM)
    x = a["input"]
    if node.op == "call_module":
        nd = len(ctx.module.normalized_shape)
    else:
        nd = len(ctx.value(a["normalized_shape"]))
    labels = ctx.labels(x)
    ndim = ctx.meta(x).ndim
    if labels is None:
        return None
    if any(labels.shape[d] > 1 for d in range(ndim - nd, ndim)):
        ctx.inexact(labels, f"{node.name}: layer norm over the channel dim", masked_layer_norm)
    lead = tuple(0 for _ in range(ndim - nd))
    param_labels = labels[lead] if lead else labels
    if any(labels.shape[d] > 1 for d in range(ndim - nd)):
        # channels vary along a leading dim: the affine params see every class there
        param_labels = torch.zeros((1,) * nd, dtype=torch.int64)  # CONST: not sliced
    for path, _ in _channel_tensors(ctx, node, ["weight", "bias"]):  # rms_norm has no bias
        ctx.align(path, param_labels, "norm")
    return labels


def masked_layer_norm(call: MaskedCall) -> Any:
    """Layer (or RMS) norm over the kept positions: the input, the normalized shape and
    the affine parameters lose the removed channels, the output gets them back as zeros."""
    module: Any = call.module  # nn.LayerNorm or nn.RMSNorm, or None for a functional call
    kept = call.input_kept()
    x = call.arg("input")
    if kept is None:
        return call.run(call.args, call.kwargs)
    rms = "rms" in (type(module).__name__.lower() if module is not None
                    else getattr(call.node.target, "__name__", str(call.node.target)))
    if module is not None:
        m = module
        nd = len(m.normalized_shape)
        weight, bias = m.weight, getattr(m, "bias", None)
    else:
        nd = len(call.arg("normalized_shape"))
        weight = call.arg("weight")
        bias = None if rms else call.arg("bias")
    dim, idx = kept
    pdim = dim - (x.ndim - nd)
    xs = compact(x, kept)
    w = compact(weight, (pdim, idx)) if weight is not None else None
    shape = list(xs.shape[x.ndim - nd:])
    if module is not None:
        y = F.rms_norm(xs, shape, w, module.eps) if rms else F.layer_norm(xs, shape, w, compact(
            bias, (pdim, idx)) if bias is not None else None, module.eps)
    else:
        args, kwargs = list(call.args), dict(call.kwargs)
        call.with_arg(args, kwargs, "input", xs)
        call.with_arg(args, kwargs, "normalized_shape", shape)
        call.with_arg(args, kwargs, "weight", w)
        if not rms and bias is not None:
            call.with_arg(args, kwargs, "bias", compact(bias, (pdim, idx)))
        y = call.run(tuple(args), kwargs)
    return scatter(y, kept, tuple(x.shape))


def rewrite_layer_norm(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    a = r.named_args(old, _LAYER_NORM)
    x = a["input"]
    if old.op == "call_module":
        m = r.module(old)
        nd = len(m.normalized_shape)
        m.normalized_shape = tuple(r.new_shape(x)[-nd:])
        return
    shape_arg: Any = a["normalized_shape"]
    if isinstance(shape_arg, torch.fx.Node):
        return  # computed in forward (x.shape[-1:]): it follows the sizes it is made of
    r.set_arg(new, "normalized_shape", list(r.new_shape(x)[-len(shape_arg):]), _LAYER_NORM)


def layer_norm_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.LayerNorm and F.layer_norm over the input's trailing dims keep its shape."""
    if type(op) is nn.LayerNorm:
        x = one_float_input(args, kwargs)
        ns = tuple(op.normalized_shape)
        if x is None or x.ndim < len(ns) or tuple(x.shape[x.ndim - len(ns):]) != ns:
            return None
        return meta_empty(x.shape, x.dtype)
    if op is not F.layer_norm and op is not torch.layer_norm:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return None
    bound = {**dict(zip(names, args)), **kwargs}
    x, ns_arg = bound.get("input"), bound.get("normalized_shape")
    if not isinstance(x, torch.Tensor) or not isinstance(ns_arg, (int, tuple, list)):
        return None
    ns = (ns_arg,) if isinstance(ns_arg, int) else tuple(ns_arg)
    params = [bound[k] for k in ("weight", "bias") if bound.get(k) is not None]
    if len(ns) > x.ndim or tuple(x.shape[x.ndim - len(ns):]) != ns or \
            any(not isinstance(p, torch.Tensor) or tuple(p.shape) != ns for p in params):
        return None
    return meta_empty(x.shape, x.dtype)


register(nn.LayerNorm, F.layer_norm, getattr(nn, "RMSNorm", None), getattr(F, "rms_norm", None),
         *aten_ops("layer_norm", "rms_norm"), rewrite=rewrite_layer_norm, shape=layer_norm_shape)(layer_norm)


def group_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Statistics per group of channels along dim 1; per-channel affine."""
    a = ctx.named_args(_GROUP_NORM)
    x = a["input"]
    if node.op == "call_module":
        num_groups = ctx.module.num_groups
    else:
        num_groups = ctx.value(a["num_groups"])
    vec = ctx.vector(x, 1)
    blocks = vec.reshape(num_groups, -1)
    if blocks.shape[1] > 1:
        if ctx.policy == "outer":  # remove whole groups: statistics of the others stay exact
            ctx.union(blocks, blocks[:, :1])
        else:
            ctx.union(blocks, blocks[:1])
            ctx.inexact(vec, f"{node.name}: group norm statistics mix the channels of a group",
                        masked_group_norm)
    for path, _ in _channel_tensors(ctx, node, ["weight", "bias"]):
        ctx.align(path, vec, "norm")
    return ctx.labels(x)


def masked_group_norm(call: MaskedCall) -> Any:
    """Group norm over the kept channels: every group lost the same local channels, so
    the group count stays and each group's statistics cover its kept channels."""
    kept = call.input_kept()
    x = call.arg("input")
    if kept is None:
        return call.run(call.args, call.kwargs)
    xs = compact(x, kept)
    idx = (0, kept[1])
    if call.module is not None:
        m: Any = call.module  # nn.GroupNorm
        y = F.group_norm(xs, m.num_groups, compact(m.weight, idx), compact(m.bias, idx), m.eps)
    else:
        args, kwargs = list(call.args), dict(call.kwargs)
        call.with_arg(args, kwargs, "input", xs)
        call.with_arg(args, kwargs, "weight", compact(call.arg("weight"), idx))
        call.with_arg(args, kwargs, "bias", compact(call.arg("bias"), idx))
        y = call.run(tuple(args), kwargs)
    return scatter(y, kept, tuple(x.shape))


def rewrite_group_norm(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    a = r.named_args(old, _GROUP_NORM)
    x = a["input"]
    c_old, c_new = r.old_shape(x)[1], r.new_shape(x)[1]
    if old.op == "call_module":
        m = r.module(old)
        per = c_old // m.num_groups
        if per == 1 or r.groups.policy == "outer":
            m.num_groups = c_new // per
        m.num_channels = c_new
        return
    per = c_old // a["num_groups"]
    if per == 1 or r.groups.policy == "outer":
        r.set_arg(new, "num_groups", c_new // per, _GROUP_NORM)


def group_norm_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.GroupNorm keeps its input's shape."""
    x = one_float_input(args, kwargs)
    if x is None or type(op) is not nn.GroupNorm or x.ndim < 2 or x.shape[1] != op.num_channels:
        return None
    return meta_empty(x.shape, x.dtype)


register(nn.GroupNorm, F.group_norm, *aten_ops("group_norm"), rewrite=rewrite_group_norm,
         shape=group_norm_shape)(group_norm)
