"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN.

The hidden size is one channel source shared by every layer and direction (the
module has one ``hidden_size``). Each weight's rows are gate blocks of the hidden
units (gate-major), so removing hidden unit j removes row j of every gate block;
``weight_hh`` columns and the next layer's ``weight_ih`` columns consume the
hidden units inside the module, which the oracle zeroes there.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def recurrent(ctx, node):
    m = ctx.module
    x = node.args[0] if node.args else node.kwargs["input"]
    if len(node.args) > 1 or node.kwargs.get("hx") is not None:
        raise ValueError("an explicit initial state is not analysed")
    gates = _GATES[type(m)]
    dirs = 2 if m.bidirectional else 1
    hvec = ctx.fresh((m.hidden_size,), f"{node.name} hidden units")
    # with proj_size, h = W_hr (o * tanh(c)): the cell's hidden units feed only the
    # projection, whose units are what the recurrence, the output and the next layer see
    proj = getattr(m, "proj_size", 0)
    pvec = ctx.fresh((proj,), f"{node.name} projected units") if proj else hvec
    rows = torch.cat([hvec] * gates)
    layer_in = ctx.vector(x, -1)
    ctx.consume(0)
    for layer in range(m.num_layers):
        for suffix in ([""] if dirs == 1 else ["", "_reverse"]):
            base = f"{node.target}."
            ctx.align(base + f"weight_ih_l{layer}{suffix}", ctx.along(rows, 0, 2), "out")
            ctx.align(base + f"weight_ih_l{layer}{suffix}", ctx.along(layer_in, 1, 2), "in")
            ctx.align(base + f"weight_hh_l{layer}{suffix}", ctx.along(rows, 0, 2), "out")
            ctx.align(base + f"weight_hh_l{layer}{suffix}", ctx.along(pvec, 1, 2), "in")
            ctx.consume_param(base + f"weight_hh_l{layer}{suffix}", ctx.along(pvec, 1, 2))
            if layer > 0:
                ctx.consume_param(base + f"weight_ih_l{layer}{suffix}", ctx.along(layer_in, 1, 2))
            if m.bias:
                ctx.align(base + f"bias_ih_l{layer}{suffix}", rows, "out")
                ctx.align(base + f"bias_hh_l{layer}{suffix}", rows, "out")
            if proj:
                ctx.align(base + f"weight_hr_l{layer}{suffix}", ctx.along(pvec, 0, 2), "out")
                ctx.align(base + f"weight_hr_l{layer}{suffix}", ctx.along(hvec, 1, 2), "in")
                ctx.consume_param(base + f"weight_hr_l{layer}{suffix}", ctx.along(hvec, 1, 2))
        layer_in = torch.cat([pvec] * dirs)
    out_ndim = ctx.meta(x).ndim
    output = ctx.along(layer_in, -1, out_ndim)
    state = ctx.along(pvec, -1, out_ndim)
    if isinstance(m, nn.LSTM):
        return (output, (state, ctx.along(hvec, -1, out_ndim)))
    return (output, state)


def rewrite_recurrent(r, old, new):
    """Sizes from the (sliced) weights: gate rows give the hidden size, the projection's
    rows the projected size."""
    m = r.module(old)
    m.hidden_size = m.weight_ih_l0.shape[0] // _GATES[type(m)]
    m.input_size = m.weight_ih_l0.shape[1]
    if getattr(m, "proj_size", 0):
        m.proj_size = m.weight_hr_l0.shape[0]
    m._init_flat_weights()


register(nn.LSTM, nn.GRU, nn.RNN, rewrite=rewrite_recurrent)(recurrent)
