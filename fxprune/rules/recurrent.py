"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN and their cells.

The hidden size is one channel source shared by every layer and direction (the
module has one ``hidden_size``). Each weight's rows are gate blocks of the hidden
units (gate-major), so removing hidden unit j removes row j of every gate block;
``weight_hh`` columns and the next layer's ``weight_ih`` columns consume the
hidden units inside the module, which the oracle zeroes there. An initial state
passed in has the hidden units along its last dim (made with ``torch.zeros`` of a
literal size, the rewrite writes the kept count there). A cell (LSTMCell, GRUCell,
RNNCell) called step by step in ``forward`` gets the state as an argument: its
``weight_hh`` columns consume it, and every call shares the cell's hidden units.
"""

from __future__ import annotations

from typing import Any, cast

import math

import torch
import torch.fx
from torch import nn
from torch.utils import flop_counter

from ..errors import RewriteError, Unsupported
from .context import AnalysisContext, RewriteContext, op_name
from .registry import aten_ops, meta_empty, register

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}  # gate blocks per hidden unit, by layer type


def _initial_state(ctx: AnalysisContext, node: torch.fx.Node, states: int,
                   vectors: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Couple the state argument (``hx``: a tensor, or LSTM's (h, c)) with the hidden
    units along its last dim; ``h`` (the first) is consumed by ``weight_hh``."""
    by_name = len(node.args) < 2  # the oracle finds a consumed list entry by position
    hx = ctx.named_args(("input", "hx")).get("hx")
    if hx is None:
        return
    if isinstance(hx, (tuple, list)):
        parts = [ctx.labels(part) for part in hx]
    else:  # one tensor, or (an LSTM cell's previous step) one node holding (h, c)
        parts = list(ctx.tuple_labels(hx) or (ctx.labels(hx),))
    if len(parts) != states or (states > 1 and by_name):
        raise Unsupported("the initial state must be passed by position as the layer's (h, c) or h")
    for labels, vec in zip(parts, vectors):
        if labels is not None:
            ctx.union(labels, ctx.along(vec, -1, labels.ndim))
    if states > 1:
        ctx.consume(1, item=0)
    else:
        ctx.consume(1, "hx")


def recurrent(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """nn.LSTM, nn.GRU and nn.RNN modules, and export's ``lstm``/``gru``/``rnn_*`` ops
    (their weights passed as one list, per layer and direction: w_ih, w_hh, then the
    biases, then LSTM's projection)."""
    a = ctx.named_args(("input", "hx"))
    x = a["input"]
    if node.op == "call_module":
        m = ctx.module
        gates, layers, dirs = GATES[type(m)], m.num_layers, 2 if m.bidirectional else 1
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if m.bias else []) + \
            (["weight_hr"] if getattr(m, "proj_size", 0) else [])
        paths = [[f"{node.target}.{n}_l{layer}{suffix}" for n in names]
                 for layer in range(layers) for suffix in ([""] if dirs == 1 else ["", "_reverse"])]
        lstm = isinstance(m, nn.LSTM)
    else:
        name = op_name(node)
        if getattr(node.target, "_overloadname", "input") != "input":
            raise Unsupported(f"{node.target} (packed sequences) is not analysed")
        gates = {"lstm": 4, "gru": 3}.get(name, 1)
        flat, layers, dirs = a["params"], a["num_layers"], 2 if a["bidirectional"] else 1
        per = len(flat) // (layers * dirs)
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if a["has_biases"] else []) + \
            (["weight_hr"] if per in (3, 5) else [])
        found = [[ctx.attr_path(w) for w in flat[k * per:(k + 1) * per]] for k in range(layers * dirs)]
        if len(names) != per or any(p is None for chunk in found for p in chunk):
            raise Unsupported("the recurrent weights must be parameters of the module (get_attr)")
        paths = cast("list[list[str]]", found)  # every path found (checked above)
        lstm = name == "lstm"
    chunks = [dict(zip(names, chunk)) for chunk in paths]
    hidden = ctx.tensor(chunks[0]["weight_ih"]).shape[0] // gates
    hvec = ctx.fresh((hidden,), f"{node.name} hidden units")
    # with a projection, h = W_hr (o * tanh(c)): the cell's hidden units feed only the
    # projection, whose units are what the recurrence, the output and the next layer see
    proj = "weight_hr" in chunks[0]
    pvec = ctx.fresh((ctx.tensor(chunks[0]["weight_hr"]).shape[0],), f"{node.name} projected units") \
        if proj else hvec
    if proj:
        ctx.keep_wider(hvec, pvec, f"{node.name}: torch needs proj_size < hidden_size")
    rows = ctx.along(torch.cat([hvec] * gates), 0, 2)
    layer_in = ctx.vector(x, -1)
    ctx.consume(0)
    _initial_state(ctx, node, 2 if lstm else 1, (pvec, hvec))
    for layer in range(layers):
        for c in chunks[layer * dirs:(layer + 1) * dirs]:
            ctx.align(c["weight_ih"], rows, "out")
            ctx.align(c["weight_ih"], ctx.along(layer_in, 1, 2), "in")
            ctx.align(c["weight_hh"], rows, "out")
            ctx.align(c["weight_hh"], ctx.along(pvec, 1, 2), "in")
            ctx.consume_param(c["weight_hh"], ctx.along(pvec, 1, 2))
            if layer > 0:
                ctx.consume_param(c["weight_ih"], ctx.along(layer_in, 1, 2))
            for bias in ("bias_ih", "bias_hh"):
                if bias in c:
                    ctx.align(c[bias], rows.reshape(-1), "out")
            if proj:
                ctx.align(c["weight_hr"], ctx.along(pvec, 0, 2), "out")
                ctx.align(c["weight_hr"], ctx.along(hvec, 1, 2), "in")
                ctx.consume_param(c["weight_hr"], ctx.along(hvec, 1, 2))
        layer_in = torch.cat([pvec] * dirs)
    out_ndim = ctx.meta(x).ndim
    output = ctx.along(layer_in, -1, out_ndim)
    state = ctx.along(pvec, -1, out_ndim)
    states = (state, ctx.along(hvec, -1, out_ndim)) if lstm else (state,)
    if node.op == "call_module":
        return (output, states if lstm else state)
    return (output, *states)


def rewrite_recurrent(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Sizes from the (sliced) weights: gate rows give the hidden size, the projection's
    rows the projected size (the exported ops read them from the weights)."""
    if old.op != "call_module":
        return
    m = r.module(old)
    m.hidden_size = m.weight_ih_l0.shape[0] // GATES[type(m)]
    m.input_size = m.weight_ih_l0.shape[1]
    if getattr(m, "proj_size", 0):
        m.proj_size = m.weight_hr_l0.shape[0]
        if m.proj_size >= m.hidden_size:  # torch's kernels read such a layer out of bounds
            raise RewriteError(f"{old.target}: the plan keeps {m.hidden_size} hidden units and {m.proj_size} "
                               f"projected units of an nn.LSTM, and torch needs proj_size < hidden_size; "
                               f"prune it less (a smaller ratio, or ratios={{{old.target!r}: ...}}) or keep it "
                               f"whole with ignore=[{old.target!r}]")
    m._init_flat_weights()


def recurrent_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """(output, h_n) of nn.RNN/GRU, (output, (h_n, c_n)) of nn.LSTM, as meta tensors from
    the module's attributes (on meta these run a Python decomposition step by step: half
    a second for one bidirectional LSTM over 14 steps). Only for a plain input tensor and
    no initial state; anything else goes to the kernel, which checks it."""
    if type(op) not in GATES or kwargs or len(args) != 1:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (2, 3) \
            or x.shape[-1] != op.input_size or min(x.shape) < 1:
        return None
    d = 2 if op.bidirectional else 1
    out_size = getattr(op, "proj_size", 0) or op.hidden_size
    batch = () if x.ndim == 2 else (x.shape[0 if op.batch_first else 1],)
    output = meta_empty((*x.shape[:-1], d * out_size), x.dtype)
    h_n = meta_empty((d * op.num_layers, *batch, out_size), x.dtype)
    if type(op) is nn.LSTM:
        return output, (h_n, meta_empty((d * op.num_layers, *batch, op.hidden_size), x.dtype))
    return output, h_n


def recurrent_flops(op: Any, args: tuple[Any, ...], out: Any) -> int:
    """Per layer and direction: the input and hidden projections (and an LSTM's output
    projection), as ``torch.utils.flop_counter`` counts those matmuls."""
    x, m = args[0], op
    rows = math.prod(x.shape[:-1])
    gate = GATES[type(m)] * m.hidden_size
    width_out = getattr(m, "proj_size", 0) or m.hidden_size
    d = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        width = m.input_size if layer == 0 else d * width_out
        step = flop_counter.mm_flop((rows, width), (width, gate)) + \
            flop_counter.mm_flop((rows, width_out), (width_out, gate))
        if width_out != m.hidden_size:
            step += flop_counter.mm_flop((rows, m.hidden_size), (m.hidden_size, width_out))
        total += d * step
    return int(total)


register(nn.LSTM, nn.GRU, nn.RNN, *aten_ops("lstm", "gru", "rnn_tanh", "rnn_relu"), rewrite=rewrite_recurrent,
         shape=recurrent_shape, flops=recurrent_flops)(recurrent)


def cell(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """One step of an LSTMCell, GRUCell or RNNCell (or export's ``lstm_cell``,
    ``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``): (input, state) -> state."""
    a = ctx.named_args(("input", "hx"))
    x = a["input"]
    if node.op == "call_module":
        every = [f"{node.target}.{n}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        paths: list[str | None] = [p if ctx.module.bias or "bias" not in p else None for p in every]
        lstm = isinstance(ctx.module, nn.LSTMCell)
    else:
        weights = [a.get(n) for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
        paths = [ctx.attr_path(w) if w is not None else None for w in weights]
        if any(p is None and w is not None for p, w in zip(paths, weights)) or None in paths[:2]:
            raise Unsupported("the cell's weights must be parameters of the module (get_attr)")
        lstm = "lstm" in str(node.target)
    w_ih, w_hh = cast(str, paths[0]), cast(str, paths[1])  # both weights are found (checked above)
    hidden = ctx.tensor(w_hh).shape[1]
    hvec = ctx.fresh((hidden,), f"{node.name} hidden units")
    rows = ctx.along(torch.cat([hvec] * (ctx.tensor(w_ih).shape[0] // hidden)), 0, 2)
    ctx.align(w_ih, rows, "out")
    ctx.align(w_ih, ctx.along(ctx.vector(x, -1), 1, 2), "in")
    ctx.align(w_hh, rows, "out")
    ctx.align(w_hh, ctx.along(hvec, 1, 2), "in")
    for bias in paths[2:]:
        if bias is not None:
            ctx.align(bias, rows.reshape(-1), "out")
    ctx.consume(0)
    _initial_state(ctx, node, 2 if lstm else 1, (hvec, hvec))
    state = ctx.along(hvec, -1, ctx.meta(x).ndim)
    return (state, state) if lstm else state


def rewrite_cell(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    if old.op == "call_module":
        m = r.module(old)
        m.hidden_size, m.input_size = m.weight_hh.shape[1], m.weight_ih.shape[1]


register(nn.LSTMCell, nn.GRUCell, nn.RNNCell, *[getattr(torch.ops.aten, n) for n in (
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell") if hasattr(torch.ops.aten, n)],
    rewrite=rewrite_cell)(cell)
