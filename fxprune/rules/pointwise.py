"""Pointwise ops: arithmetic with broadcasting, activations, dropout/identity,
dtype conversions, and softmax-like ops that mix values along one dim.

Aligned positions of the inputs get the same class. An input that broadcasts
along a dim where another input's channels vary (a ``(B, 1, H, W)`` spatial
attention map times a ``(B, C, H, W)`` feature map) is not aligned with those
channels: its own channels are pinned instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..labels import const_like
from ..masked import compact_apply
from .context import AnalysisContext, RewriteContext
from .registry import aten_ops, meta_empty, one_float_input, register, register_tag


def tensor_args(ctx: AnalysisContext, node: torch.fx.Node) -> list[Any]:
    found: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for v in a:
                walk(v)
        elif isinstance(a, dict):
            for v in a.values():
                walk(v)
        elif ctx.is_tensor(a):
            found.append(a)

    walk(node.args)
    walk(node.kwargs)
    return found


def _right_align(labels: torch.Tensor, ndim: int) -> torch.Tensor:
    return labels.reshape((1,) * (ndim - labels.ndim) + tuple(labels.shape))


def broadcast_union(ctx: AnalysisContext, node: torch.fx.Node, inputs: Iterable[Any]) -> torch.Tensor:
    """Union aligned positions of ``inputs`` (graph nodes) and return the output labels."""
    return broadcast_labels(ctx, node, [(ctx.labels(a), ctx.meta(a).shape) for a in inputs])


def broadcast_labels(ctx: AnalysisContext, node: torch.fx.Node, operands: Sequence[tuple[torch.Tensor | None, Any]],
                     out_shape: Any = None) -> torch.Tensor:
    """:func:`broadcast_union` over (labels or None, shape) pairs: operands that are not
    graph nodes (a product computed inside a rule) broadcast the same way. ``out_shape``
    defaults to the node's."""
    out_shape = tuple(ctx.meta(node).shape if out_shape is None else out_shape)
    ndim = len(out_shape)
    entries = []
    for labels, own_shape in operands:
        shape = (1,) * (ndim - len(own_shape)) + tuple(own_shape)
        labels = _right_align(labels if labels is not None else const_like(len(own_shape)), ndim)
        entries.append((labels, shape))
    # a dim of size 1, or expanded (stride 0: the labels of an arange expanded and
    # unsqueezed by the shape rules), holds one label: it does not vary
    varying = {d for labels, _ in entries for d in range(ndim) if labels.shape[d] > 1 and labels.stride(d)}
    aligned, spanning_constant = [], False
    for labels, shape in entries:
        if not all(shape[d] == out_shape[d] for d in varying):
            ctx.pin(labels, f"{node.name}: broadcast across channels of another operand")
        elif any(shape[d] > 1 and (labels.shape[d] == 1 or not labels.stride(d)) for d in varying) \
                and not bool(labels.any()):
            # no channel at full size along another operand's channels (a bias built with
            # torch.arange(...).expand(B * heads, ...), a model input): its size would not follow
            spanning_constant = True
        else:
            aligned.append(labels)
    if not aligned:
        return const_like(ndim)
    first = aligned[0]
    for other in aligned[1:]:
        ctx.union(first, other)
    if spanning_constant:  # the output carries no channel there; the operands say why
        for labels in aligned:
            ctx.pin(labels, f"{node.name}: combined with an operand that carries no prunable channel "
                            f"at these positions (a model input, or a constant made in forward)")
        return const_like(ndim)
    # after the unions every operand has the same class at every output position, so the
    # smallest one describes the output (a (1, 1, C) stream plus a (1, T, C) position
    # table stays (1, 1, C) instead of growing to T * C labels)
    return min(aligned, key=lambda l: l.numel())


def pointwise(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Elementwise op over every tensor argument."""
    if not ctx.is_tensor(node):
        return None  # arithmetic on sizes and other Python values
    return broadcast_union(ctx, node, tensor_args(ctx, node))


def input_arg(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Argument ``input`` of ``node`` (ATen's ``self``, a method's tensor, the first
    argument of a layer's forward), for rules that read no other argument: the other
    positional arguments of a call torch.fx cannot bind are named by position only."""
    return ctx.named_args(("input", *(f"arg{i}" for i in range(1, len(node.args)))))["input"]


def first_input(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """The value of the first argument passes through unchanged (identity-like ops)."""
    x = input_arg(ctx, node)
    return ctx.labels(x) if ctx.labels(x) is not None else const_like(ctx.meta(node).ndim)


def _softmax_dim(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    if node.op == "call_module":
        return -3 if isinstance(ctx.module, nn.Softmax2d) else ctx.module.dim  # Softmax2d: over C
    return ctx.value(ctx.named_args(("input", "dim", "dtype")).get("dim"))  # x.softmax(dim, dtype)


def mixing_along_dim(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """softmax-like: pointwise in shape, but each value depends on its whole row along ``dim``."""
    return _mixing(ctx, node, _softmax_dim(ctx, node))


def normalize(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """F.normalize(x, p, dim): x divided by its p-norm along ``dim`` (default 1). Over the
    channel dim with p > 0 a removed channel that is zeroed adds nothing to the norm, so
    zeroing the removed channels of the input (the oracle's mask: a consumer) gives the
    pruned result exactly; other p (a norm that zeros change) mix the channels."""
    a = ctx.named_args(("input", "p", "dim", "eps", "out"))
    labels = ctx.labels(a["input"])
    dim = ctx.value(a.get("dim", 1))
    if labels is not None and labels.shape[dim % labels.ndim] > 1 and zero_blind_norm(ctx.value(a.get("p", 2.0))):
        ctx.consume(0)
        return labels
    return _mixing(ctx, node, dim)


def zero_blind_norm(p: Any) -> bool:
    """Whether the p-norm of a vector is unchanged by zero entries (p > 0, inf, 'fro')."""
    return p in (None, "fro") or isinstance(p, (int, float)) and p > 0


def _mixing(ctx: AnalysisContext, node: torch.fx.Node, dim: Any) -> torch.Tensor:
    x = input_arg(ctx, node)
    labels = ctx.labels(x)
    if labels is not None and dim is not None:
        d = dim % labels.ndim
        if labels.shape[d] > 1:
            ctx.inexact(labels, f"{node.name}: normalizes across channels (dim {dim})", compact_apply)
    elif labels is not None and dim is None:
        ctx.inexact(labels, f"{node.name}: implicit-dim softmax", compact_apply)
    return labels if labels is not None else const_like(ctx.meta(node).ndim)


_ARITH = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
          operator.neg, operator.pow, operator.mod, operator.iadd, operator.isub, operator.imul,
          operator.itruediv, operator.abs, operator.eq, operator.ne, operator.lt, operator.le,
          operator.gt, operator.ge, operator.and_, operator.or_, operator.invert]
_TORCH = ["add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "neg",
          "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "pow", "square", "sin", "cos", "tanh",
          "sigmoid", "relu", "clamp", "clip", "maximum", "minimum", "where", "erf", "reciprocal",
          "sign", "floor", "ceil", "round", "lerp", "addcmul", "addcdiv", "masked_fill",
          "nan_to_num", "hardswish", "relu_", "sigmoid_", "selu", "celu", "exp2", "expm1",
          "logical_and", "logical_or", "logical_not", "eq", "ne", "lt", "le", "gt", "ge",
          "clamp_min", "clamp_max", "fmod", "remainder", "mish", "silu"]
_FUNCTIONAL = ["relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
               "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "softsign",
               "tanhshrink", "logsigmoid", "threshold", "hardshrink", "softshrink",
               "relu_", "elu_", "leaky_relu_", "hardtanh_", "rrelu"]
_METHODS = ["add", "sub", "mul", "div", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow",
            "sigmoid", "tanh", "relu", "clamp", "clip", "add_", "sub_", "mul_", "div_", "relu_",
            "sigmoid_", "clamp_", "masked_fill", "masked_fill_", "square", "reciprocal", "erf",
            "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "where",
            "hardswish", "sin", "cos", "exp_", "pow_", "maximum", "minimum", "lerp", "sign",
            "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "fill_", "zero_",
            "addcmul", "clamp_min", "clamp_max", "logical_not", "silu", "copy_"]
_ACT_MODULES = [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
                nn.Hardshrink, nn.Softshrink, nn.RReLU]

# shape shortcuts (the meta kernels of many run Python decompositions)
_SAME_SHAPE_ACTS = frozenset({nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                              nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish})
_UNARY = frozenset({F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
                    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, torch.sigmoid, F.tanh,
                    torch.tanh, torch.exp, torch.neg, torch.abs})  # of one tensor; the rest flags
_BINARY = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})


def unary_shape(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """An elementwise function of one floating-point tensor (its other arguments are flags
    and constants): the output has the input's shape and dtype."""
    x = args[0] if args else kwargs.get("input")
    others = list(args[1:]) + [v for k, v in kwargs.items() if k != "input"]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or \
            any(isinstance(v, torch.Tensor) for v in others):
        return None
    return meta_empty(x.shape, x.dtype)


def same_shape_module(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A layer called on one floating-point tensor whose output has its shape and dtype."""
    x = one_float_input(args, kwargs)
    return None if x is None else meta_empty(x.shape, x.dtype)


def binary_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Arithmetic of two operands, one a tensor at least: broadcast shape, promoted dtype."""
    if kwargs or len(args) != 2 or not any(isinstance(a, torch.Tensor) for a in args):
        return None
    if not all(isinstance(a, (torch.Tensor, int, float)) and not isinstance(a, bool) for a in args):
        return None
    try:
        shape = torch.broadcast_shapes(*(a.shape for a in args if isinstance(a, torch.Tensor)))  # type: ignore[no-untyped-call]
        return meta_empty(shape, torch.result_type(*args))
    except RuntimeError:
        return None


def pointwise_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if type(op) in _SAME_SHAPE_ACTS:
        return same_shape_module(op, args, kwargs)
    if op in _UNARY:
        return unary_shape(op, args, kwargs)
    if op in _BINARY:
        return binary_shape(args, kwargs)
    return None


register(*_ARITH, *[getattr(torch, n, None) for n in dict.fromkeys(_TORCH)],
         *[getattr(F, n, None) for n in dict.fromkeys(_FUNCTIONAL)
           if getattr(F, n, None) is not None and getattr(F, n, None) is not getattr(torch, n, None)],
         *dict.fromkeys(_METHODS), *_ACT_MODULES,
         *aten_ops("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "alias", "clone",
                   "contiguous", "detach", "to", "_to_copy", "type_as", "lift_fresh_copy", "zeros_like", "ones_like",
                   "empty_like", "full_like", "hardswish", "__and__", "__or__", "__xor__", "fill", "zero", "where",
                   "masked_fill", "copy_", "copy"), shape=pointwise_shape)(pointwise)
register_tag(torch.Tag.pointwise)(pointwise)  # every ATen op tagged pointwise without a rule of its own


def _stochastic_depth_targets() -> list[Any]:
    try:
        import torchvision.ops as tv_ops
    except Exception:  # torchvision is optional
        return []
    return [tv_ops.StochasticDepth, tv_ops.stochastic_depth]


_SAME_SHAPE_IDENTITIES = frozenset({nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                    nn.AlphaDropout})
_UNARY_IDENTITIES = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout})


def first_input_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if type(op) in _SAME_SHAPE_IDENTITIES:
        return same_shape_module(op, args, kwargs)
    return unary_shape(op, args, kwargs) if op in _UNARY_IDENTITIES else None


register(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
         nn.FeatureAlphaDropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
         torch.clone, torch.detach, torch.zeros_like, torch.ones_like, torch.empty_like,
         torch.full_like, "contiguous", "clone", "detach", "to", "float", "half",
         "double", "bfloat16", "long", "int", "short", "byte", "char", "bool", "type", "type_as", "cpu",
         "cuda", "requires_grad_",
         *_stochastic_depth_targets(), shape=first_input_shape)(first_input)

register(F.normalize)(normalize)

def softmax_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.Softmax and nn.LogSoftmax with an explicit, valid dim keep their input's shape."""
    x = one_float_input(args, kwargs)
    if x is None or type(op) not in (nn.Softmax, nn.LogSoftmax) or op.dim is None or \
            not -x.ndim <= op.dim < max(x.ndim, 1):
        return None
    return meta_empty(x.shape, x.dtype)


register(nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, F.softmin,
         torch.softmax, torch.log_softmax, torch.cumsum, torch.cumprod, "softmax", "log_softmax",
         "cumsum", "cumprod", *aten_ops("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod"),
         shape=softmax_shape)(mixing_along_dim)


def glu(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """glu(x, dim): the first half along ``dim`` gated by the second, so channel ``i`` of the
    output holds input channels ``i`` and ``i + half``: those go together."""
    a = ctx.named_args(("input", "dim"))
    dim = ctx.module.dim if node.op == "call_module" else ctx.value(a.get("dim", -1))
    labels = ctx.labels(a["input"])
    if labels is None:
        return const_like(ctx.meta(node).ndim)
    d = dim % labels.ndim
    if labels.shape[d] == 1:
        return labels
    half = labels.shape[d] // 2
    first = labels.narrow(d, 0, half)
    ctx.union(first, labels.narrow(d, half, half))
    return first


register(nn.GLU, F.glu, *aten_ops("glu"))(glu)


def prelu(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """PReLU: elementwise, with one learned slope per channel (dim 1, or dim 0 of a 1-d
    input) unless a single slope is shared."""
    a = ctx.named_args(("input", "weight"))
    x = a["input"]
    path: str | None
    if node.op == "call_module":
        weight, path = None, f"{node.target}.weight"
    else:
        weight = a["weight"]
        path = ctx.attr_path(weight)
    n = ctx.tensor(path).numel() if path is not None else math.prod(ctx.meta(weight).shape)
    ndim = ctx.meta(x).ndim
    if n == 1:
        return first_input(ctx, node)
    vec = ctx.vector(x, 1 if ndim > 1 else 0)
    if path is not None:
        ctx.align(path, vec, "channel")
    else:  # slopes computed in the graph: their positions go with the channels they scale
        ctx.union(ctx.vector(weight, 0), vec)
    return ctx.labels(x) if ctx.labels(x) is not None else ctx.along(vec, 1 if ndim > 1 else 0, ndim)


def rewrite_prelu(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        m.num_parameters = m.weight.numel()


register(nn.PReLU, F.prelu, rewrite=rewrite_prelu)(prelu)
register(*aten_ops("prelu", "_prelu_kernel"))(prelu)  # export's forms: no rewrite hook


def local_response_norm(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """Local response normalization divides each channel by the energy of its neighbours
    along dim 1: removing a channel changes its neighbours' values (inexact)."""
    return _mixing(ctx, node, 1)


register(nn.LocalResponseNorm, F.local_response_norm)(local_response_norm)
