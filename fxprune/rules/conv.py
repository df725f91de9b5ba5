"""Convolutions (1d/2d/3d, transposed, grouped, depthwise) and linear layers, in
both dialects: ``call_module`` and functional calls whose weights come from
``get_attr``.

A convolution consumes its input channels (weight columns) and produces fresh
output channels (weight rows). Depthwise convolutions (``groups == C_in``)
carry their input's channels through instead. Grouped convolutions keep equal
group widths by removing the same local channels from every group.
"""

from __future__ import annotations

from typing import Any, cast

import math

import torch.nn.functional as F
import torch
import torch.fx
from torch import nn
from torch.utils import flop_counter

from ..errors import Unsupported
from ..labels import CONST, constant_along
from ..masked import MaskedCall, MaskedSemantics, compact, scatter
from .context import AnalysisContext, RewriteContext, attr_target, weight_operand
from .registry import aten_ops, meta_empty, one_float_input, register

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_F_CONV = (F.conv1d, F.conv2d, F.conv3d)
_F_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def is_transposed(target: torch.fx.node.Target) -> bool:
    """True for a functional or ATen transposed convolution."""
    if target in _F_CONV_T:
        return True
    packet = getattr(target, "overloadpacket", None)
    return packet is not None and packet.__name__.startswith("conv_transpose")


def _conv_parts(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """(input node, weight path, bias path or None, groups, transposed) for either dialect."""
    if node.op == "call_module":
        m = ctx.module
        bias = f"{node.target}.bias" if m.bias is not None else None
        return ctx.named_args(("input",))["input"], f"{node.target}.weight", bias, m.groups, isinstance(m, _CONV_T)
    a = ctx.named_args()
    # aten.convolution says whether it is transposed in an argument of its own
    transposed = is_transposed(node.target) or bool(ctx.value(a.get("transposed", False)))
    weight: Any = ctx.attr_path(a["weight"])  # a path, or the node computing it
    bias_arg = a.get("bias")
    bias = ctx.attr_path(bias_arg)
    if weight is None and not transposed and isinstance(a["weight"], torch.fx.Node):
        weight = a["weight"]  # computed in the graph: see computed_weight
    if weight is None or (bias_arg is not None and bias is None):
        raise Unsupported("weight and bias must be parameters of the module (get_attr)")
    groups = ctx.value(a.get("groups", 1))
    return a["input"], weight, bias, groups, transposed


def computed_weight(ctx: AnalysisContext, node: torch.fx.Node,
                    weight: torch.fx.Node) -> tuple[str, tuple[str, ...], bool]:
    """The parameter a convolution weight computed in the graph is made from: weight
    standardization (timm's StdConv2d, NFNet's ScaledStdConv2d: the weight normalized
    per output channel over its fan-in, times a per-channel gain), or a mask of its shape
    (PixelCNN's masked convolution: ``weight * mask``). It must come from one parameter of
    the weight's shape, otherwise only from buffers of that shape, per-output-channel
    tensors and scalars, and not from the model's inputs, and keep that parameter's rows
    in order; anything else is refused. Returns (the parameter, the same-shape buffers,
    whether every op on the way is elementwise)."""
    from .pointwise import pointwise
    from .registry import lookup

    shape = tuple(ctx.meta(weight).shape)
    source, partners, elementwise, seen, todo = None, [], True, set(), [weight]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            raise Unsupported("the weight depends on the model's inputs")
        if n.op == "get_attr":
            t = ctx.tensor(attr_target(n))
            if not isinstance(t, torch.Tensor) or t.numel() == 1:
                continue
            if tuple(t.shape) == shape and isinstance(t, nn.Parameter) and source in (None, n):
                source = n
            elif tuple(t.shape) == shape and not isinstance(t, nn.Parameter):
                partners.append(attr_target(n))
            elif t.ndim < 1 or any(s != 1 for s in t.shape[1:]) or t.shape[0] != shape[0]:
                raise Unsupported(f"the weight is computed from {n.target} of shape {tuple(t.shape)}, "
                                 f"which is neither the weight nor a per-output-channel tensor")
            continue
        rule = lookup(n, ctx.gm)
        elementwise = elementwise and rule is not None and rule.analyze is pointwise
        todo.extend(n.all_input_nodes)
    if source is None:
        raise Unsupported("the weight is computed from no parameter of its shape")
    if partners and not elementwise:
        raise Unsupported(f"the weight is computed from {partners[0]} of its shape by ops that are not elementwise")
    rows, src_rows = ctx.labels(weight), ctx.labels(source)
    k = ctx.classes(rows) if rows is not None else None
    if k is None or src_rows is None or k.shape[0] != shape[0] \
            or not all(constant_along(k, d) for d in range(1, k.ndim)) \
            or not torch.equal(k.reshape(k.shape[0], -1)[:, 0], ctx.classes(src_rows.reshape(-1))):
        raise Unsupported(f"the weight's rows are not {source.target}'s rows in order (the computation "
                         f"moves them)")
    return attr_target(source), tuple(dict.fromkeys(partners)), elementwise


def _channels_along_length(ctx: AnalysisContext, node: torch.fx.Node, x: Any,
                           cdim: int) -> tuple[torch.Tensor | None, bool]:
    """When ``x``'s channels lie along a spatial dim of the convolution (CoaT stacks class
    tokens into (B, 3, C) and convolves over the 3; ECA convolves along the channels): a
    position-wise conv (kernel 1, stride 1, no padding) keeps them where they are, and its
    own output channels are kept; any other conv mixes neighbouring channels, which are
    pinned (its own output channels are fresh and stay prunable: the caller goes on with
    input channels that are constants). Returns (output labels of a position-wise conv or
    None, whether the spatial dims carry channels)."""
    labels = ctx.labels(x)
    if labels is None:
        return None, False
    k = ctx.classes(labels)
    along = [d for d in range(cdim + 1, k.ndim) if not constant_along(k, d)]
    if not along:
        return None, False
    m = ctx.module if node.op == "call_module" else None
    pointwise = m is not None and not isinstance(m, _CONV_T) and all(v == 1 for v in m.kernel_size) \
        and all(v == 1 for v in m.stride) and not isinstance(m.padding, str) and not any(m.padding)
    if pointwise and ctx.meta(node).shape[cdim + 1:] == ctx.meta(x).shape[cdim + 1:]:
        return (labels.narrow(cdim, 0, 1) if labels.shape[cdim] > 1 else labels), True
    ctx.pin(labels, f"{node.name}: the convolution slides along a dim that carries channels")
    return None, True


def conv_channels(ctx: AnalysisContext, node: torch.fx.Node, in_vec: torch.Tensor, c_out: int,
                  groups: int) -> tuple[torch.Tensor, Any, Any]:
    """(output channel labels, input and output channels of one group), or (output
    labels, None, None) for a depthwise conv, whose outputs follow their input channel.
    Grouped convs keep equal group widths: the same local channels go in every group."""
    # the group's channels are typed Any (None for a depthwise conv): callers that exclude
    # depthwise (conv's other branches, torchvision's deform_conv2d) use them unnarrowed
    c_in = in_vec.numel()
    if groups > 1 and groups == c_in:
        return in_vec.repeat_interleave(c_out // c_in), None, None
    out_vec = ctx.fresh((c_out,), f"{node.name} output channels")
    in_blocks, out_blocks = in_vec.reshape(groups, -1), out_vec.reshape(groups, -1)
    if groups > 1:
        ctx.union(in_blocks, in_blocks[:1])
        ctx.union(out_blocks, out_blocks[:1])
    return out_vec, in_blocks[0], out_blocks[0]


def conv(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    x, weight, bias, groups, transposed = _conv_parts(ctx, node)
    computed = isinstance(weight, torch.fx.Node)
    w_shape = ctx.meta(weight).shape if computed else ctx.tensor(weight).shape
    out_ndim, wn = ctx.meta(node).ndim, len(w_shape)
    cdim = 1 if ctx.meta(x).ndim == wn else 0  # batched or unbatched input
    along_length, channels_on_length = _channels_along_length(ctx, node, x, cdim)
    if along_length is not None:
        return along_length
    # a weight computed in forward (see computed_weight) is checked before anything is linked
    source, partners, elementwise = computed_weight(ctx, node, weight) if computed else (None, (), False)
    in_vec = torch.full((ctx.meta(x).shape[cdim],), CONST, dtype=torch.int64) if channels_on_length \
        else ctx.vector(x, cdim)
    c_out = w_shape[1] * groups if transposed else w_shape[0]
    ctx.consume(0)
    out_vec, in_cols, out_cols = conv_channels(ctx, node, in_vec, c_out, groups)
    depthwise = in_cols is None
    if source is not None:
        # the computed weight's rows go with the output channels (so do the parameter's
        # rows and every per-channel gain); the parameter's columns are the inputs,
        # inexact because the computation mixes them
        _link_computed(ctx, node, weight, (source, partners, elementwise), out_vec,
                       None if depthwise else in_cols, in_vec, wn, "channels (weight standardization)")
    elif depthwise:  # weight (C_in, mult, k...) transposed, (C_out, 1, k...) otherwise
        ctx.align(weight, ctx.along(in_vec if transposed else out_vec, 0, wn), "channel")
    elif transposed:  # weight (C_in, C_out / g, k...)
        ctx.align(weight, ctx.along(in_vec, 0, wn), "in")
        ctx.align(weight, ctx.along(out_cols, 1, wn), "out")
    else:  # weight (C_out, C_in / g, k...)
        ctx.align(weight, ctx.along(out_vec, 0, wn), "out")
        ctx.align(weight, ctx.along(in_cols, 1, wn), "in")
    if bias is not None:
        ctx.align(bias, out_vec, "channel" if depthwise else "out")
    return ctx.along(out_vec, cdim, out_ndim)


def _new_groups(r: RewriteContext, x: Any, cdim: int, groups: int, c_in_old: int) -> int:
    return r.new_shape(x)[cdim] if groups > 1 and groups == c_in_old else groups


def rewrite_conv(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        x: Any = r.named_args(old, ("input",))["input"]
        cdim = 1 if len(r.old_shape(x)) == m.weight.ndim else 0  # batched (N, C, ...) or unbatched (C, ...)
        m.groups = _new_groups(r, x, cdim, m.groups, r.old_shape(x)[cdim])
        m.in_channels = r.new_shape(x)[cdim]
        m.out_channels = r.new_shape(old)[cdim]
        return
    a = r.named_args(old)
    x = a["input"]
    cdim = 1 if len(r.old_shape(x)) == len(r.old_shape(a["weight"])) else 0
    groups = a.get("groups", 1)
    if isinstance(groups, torch.fx.Node):
        return  # computed in forward (x.shape[1], batch x groups): it follows the sizes it is made of
    new_groups = _new_groups(r, x, cdim, cast(int, groups), r.old_shape(x)[cdim])  # an int once not a Node
    if new_groups != groups:
        r.set_arg(new, "groups", new_groups)


def conv_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.Conv1d/2d/3d with numeric padding: the output size from the module's attributes."""
    x = one_float_input(args, kwargs)
    if x is None or type(op) not in _CONV:
        return None
    shape = tuple(x.shape)
    if len(shape) != len(op.kernel_size) + 2 or shape[1] != op.in_channels or isinstance(op.padding, str):
        return None
    spatial = tuple((n + 2 * p - d * (ks - 1) - 1) // s + 1 for n, p, d, ks, s in
                    zip(shape[2:], op.padding, op.dilation, op.kernel_size, op.stride))
    return None if min(spatial) < 1 else meta_empty((shape[0], op.out_channels, *spatial), x.dtype)


def conv_flops(op: Any, args: tuple[Any, ...], out: Any) -> int:
    return int(flop_counter.conv_flop_count(list(args[0].shape), list(op.weight.shape), list(out.shape)))


register(*_CONV, *_CONV_T, *_F_CONV, *_F_CONV_T,
         *aten_ops("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                   "convolution"),
         rewrite=rewrite_conv, shape=conv_shape, flops=conv_flops)(conv)


def linear(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """y = x W^T + b: input features are weight columns, output features fresh rows."""
    weight: str | None
    if node.op == "call_module":
        x, weight = ctx.named_args(("input",))["input"], f"{node.target}.weight"
        bias = f"{node.target}.bias" if ctx.module.bias is not None else None
    else:
        a = ctx.named_args()
        x = a["input"]
        weight, out_dim = _linear_weight(ctx, a["weight"])
        bias_arg = a.get("bias")
        bias = ctx.attr_path(bias_arg)
        if weight is None and isinstance(a["weight"], torch.fx.Node):
            out_vec = _computed_dense(ctx, node, x, a["weight"], bias)
            return ctx.along(out_vec, -1, ctx.meta(node).ndim)
        if weight is None:
            raise Unsupported("the weight must be a parameter of the module (get_attr), possibly transposed")
    out_vec = dense(ctx, node, x, 0, weight, bias, out_dim=0 if node.op == "call_module" else out_dim)
    if bias is None and node.op != "call_module" and ctx.is_tensor(bias_arg):
        # a bias computed in the graph (Swin v2 concatenates q, zero k and v biases): its
        # positions go with the output features they are added to
        ctx.union(ctx.vector(bias_arg, 0), out_vec)
    return ctx.along(out_vec, -1, ctx.meta(node).ndim)


def _link_computed(ctx: AnalysisContext, node: torch.fx.Node, weight: torch.fx.Node,
                   found: tuple[str, tuple[str, ...], bool], out_vec: torch.Tensor, in_cols: torch.Tensor | None,
                   in_vec: torch.Tensor, ndim: int, inputs: str) -> None:
    """A weight computed in forward (``found``: computed_weight's answer): its rows go with
    the output channels (so do the parameter's rows and every per-channel gain); the
    parameter's columns, and a same-shape mask's, are the inputs (``in_cols``; None for a
    depthwise conv), inexact unless every op on the way is elementwise."""
    source, partners, elementwise = found
    ctx.union(ctx.vector(weight, 0), out_vec)
    if in_cols is None:
        return
    for path in (source, *partners):  # a mask of the weight's shape is sliced with it
        ctx.align(path, ctx.along(in_cols, 1, ndim), "in")
    if not elementwise:
        ctx.inexact(in_vec, f"{node.name}: its weight is computed from {source} across the input {inputs}: "
                            f"removing inputs changes the kept weights",
                    _masked_computed_weight(weight, (source, *partners), ctx.along(in_cols, 1, ndim)))


def _masked_computed_weight(weight: torch.fx.Node, paths: tuple[str, ...], columns: torch.Tensor) -> MaskedSemantics:
    """The masked semantics of a layer whose weight is computed in forward across its
    inputs: the weight is computed again from the kept columns of its parameter (and of
    same-shape buffers), its removed columns are zeros, and the layer runs with it (its
    removed inputs are zeroed, as for any consumer)."""
    def masked(call: MaskedCall) -> Any:
        assert call.kept_labels is not None  # the oracle passes it (and recompute) to masked semantics
        kept = call.kept_labels(columns)
        if kept is None:
            return call.run(call.args, call.kwargs)
        idx = (1, kept[1])
        assert call.recompute is not None
        small = call.recompute(weight, {p: (lambda t: compact(t, idx)) for p in paths})
        full = call.arg("weight")
        args, kwargs = list(call.args), dict(call.kwargs)
        call.with_arg(args, kwargs, "weight", scatter(small, idx, tuple(full.shape)))
        return call.run(tuple(args), kwargs)

    return masked


def _computed_dense(ctx: AnalysisContext, node: torch.fx.Node, x: Any, weight: torch.fx.Node,
                    bias: str | None) -> torch.Tensor:
    """F.linear with a weight computed in forward from one parameter of its shape (MADE's
    masked layers, ``mask * weight``; a standardized weight): as for a convolution (see
    computed_weight), its rows are the output features, the parameter's columns and any
    same-shape buffer's are the inputs, inexact unless every op on the way is elementwise."""
    found = computed_weight(ctx, node, weight)
    in_vec = ctx.vector(x, -1)
    ctx.consume(0)
    out_vec = ctx.fresh((ctx.meta(weight).shape[0],), f"{node.name} output features")
    _link_computed(ctx, node, weight, found, out_vec, in_vec, in_vec, 2, "features")
    if bias is not None:
        ctx.align(bias, out_vec, "out")
    elif ctx.is_tensor(ctx.named_args().get("bias")):
        ctx.union(ctx.vector(ctx.named_args()["bias"], 0), out_vec)
    return out_vec


def _linear_weight(ctx: AnalysisContext, w: Any) -> tuple[str | None, int]:
    """(parameter path, the dim holding the output features) of F.linear's weight: a
    parameter, or one seen through transposes used only here (a decoder tied to an
    encoder's weight, ``F.linear(h, enc.weight.t())``: the output features are its columns)."""
    path = ctx.attr_path(w)  # a parameter (or an exported weight norm's weight)
    if path is not None:
        return path, 0
    found = weight_operand(ctx.gm, w, 2)
    return (found[0], 1 if found[1] else 0) if found is not None else (None, 0)


def dense(ctx: AnalysisContext, node: torch.fx.Node, x: Any, argpos: int, weight: str, bias: str | None, *,
          out_dim: int) -> torch.Tensor:
    """A dense layer on the last dim of input ``argpos`` (node ``x``): weight rows (or
    columns, ``out_dim=1``: GPT-2's Conv1D stores (in, out)) are fresh output features,
    the other dim consumes the input's. Returns the output features' labels."""
    w = ctx.tensor(weight)
    in_vec = ctx.vector(x, -1)
    ctx.consume(argpos)
    out_vec = ctx.fresh((w.shape[out_dim],), f"{node.name} output features")
    ctx.align(weight, ctx.along(out_vec, out_dim, 2), "out")
    ctx.align(weight, ctx.along(in_vec, 1 - out_dim, 2), "in")
    if bias is not None:
        ctx.align(bias, out_vec, "out")
    return out_vec


def rewrite_linear(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        m.out_features, m.in_features = m.weight.shape


def linear_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """nn.Linear (its attributes) and F.linear (its weight's and bias's shapes)."""
    if type(op) is nn.Linear:
        x = one_float_input(args, kwargs)
        if x is None or x.ndim == 0 or x.shape[-1] != op.in_features:
            return None
        return meta_empty((*x.shape[:-1], op.out_features), x.dtype)
    if op is not F.linear:
        return None
    x, w, b = (list(args) + [kwargs.get("bias")])[:3] if len(args) >= 2 and set(kwargs) <= {"bias"} \
        else (None, None, None)
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.ndim == 2 and x.ndim >= 1
            and x.shape[-1] == w.shape[1] and x.dtype == w.dtype
            and (b is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (w.shape[0],)))):
        return None
    return meta_empty((*x.shape[:-1], w.shape[0]), x.dtype)


def linear_flops(op: Any, args: tuple[Any, ...], out: Any) -> int:
    k, n = args[0].shape[-1], out.shape[-1]
    return int(flop_counter.mm_flop((math.prod(out.shape[:-1]), k), (k, n)))


register(nn.Linear, F.linear, *aten_ops("linear"), rewrite=rewrite_linear, shape=linear_shape,
         flops=linear_flops)(linear)


def bilinear(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """y_k = x1 W_k x2^T + b_k: the weight (out, in1, in2) consumes the last dim of both
    inputs; its rows are fresh output features."""
    weight: str | None
    a = ctx.named_args(("input1", "input2"))
    if node.op == "call_module":
        weight = f"{node.target}.weight"
        bias = f"{node.target}.bias" if ctx.module.bias is not None else None
    else:
        weight, bias = ctx.attr_path(a["weight"]), ctx.attr_path(a.get("bias"))
        if weight is None or (bias is None and a.get("bias") is not None):
            raise Unsupported("the weight and bias must be parameters of the module (get_attr)")
    x1 = a["input1"] if "input1" in a else a["input"]  # (nn.Bilinear's first forward parameter is "input")
    x2 = a["input2"]
    out_vec = ctx.fresh((ctx.tensor(weight).shape[0],), f"{node.name} output features")
    ctx.align(weight, ctx.along(out_vec, 0, 3), "out")
    for pos, (name, x) in enumerate((("input1", x1), ("input2", x2))):
        ctx.align(weight, ctx.along(ctx.vector(x, -1), pos + 1, 3), "in")
        ctx.consume(pos, name)
    if bias is not None:
        ctx.align(bias, out_vec, "out")
    return ctx.along(out_vec, -1, ctx.meta(node).ndim)


def rewrite_bilinear(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        m.out_features, m.in1_features, m.in2_features = m.weight.shape


register(nn.Bilinear, F.bilinear, rewrite=rewrite_bilinear)(bilinear)
register(*aten_ops("bilinear"))(bilinear)  # export's form: no rewrite hook
