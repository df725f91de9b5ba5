"""Traceable decompositions of opaque torch.nn modules.

``nn.MultiheadAttention`` is a leaf for torch.fx and its forward is not
traceable; the tracer calls :func:`multihead_attention` instead, which computes
the same function from the module's own parameters with ops the channel rules
understand (linear, view, transpose, scaled dot-product attention), so heads
and head_dim become prunable and the pruned graph needs no MHA module at all.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn


def mha_supported(m: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether :func:`multihead_attention` reproduces ``m`` for these call options."""
    return (type(m) is nn.MultiheadAttention and m.bias_k is None and not m.add_zero_attn
            and kwargs.get("key_padding_mask") is None)


def multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                        need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                        is_causal: bool = False):
    """``m(query, key, value, ...)`` written with traceable functional ops."""
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    e, h = m.embed_dim, m.num_heads
    d = e // h
    if m._qkv_same_embed_dim:
        if query is key and key is value:
            q, k, v = F.linear(query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, m.in_proj_weight, m.in_proj_bias)[..., :e]
            k = F.linear(key, m.in_proj_weight, m.in_proj_bias)[..., e:2 * e]
            v = F.linear(value, m.in_proj_weight, m.in_proj_bias)[..., 2 * e:]
    else:
        q, k, v = F.linear(query, m.q_proj_weight), F.linear(key, m.k_proj_weight), F.linear(value, m.v_proj_weight)
        if m.in_proj_bias is not None:
            q, k, v = q + m.in_proj_bias[:e], k + m.in_proj_bias[e:2 * e], v + m.in_proj_bias[2 * e:]
    b, n, s = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, n, h, d).transpose(1, 2)
    k = k.reshape(b, s, h, d).transpose(1, 2)
    v = v.reshape(b, s, h, d).transpose(1, 2)
    mask = attn_mask
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(b, h, n, s)
    if mask is not None and mask.dtype.is_floating_point is False:
        mask = mask.logical_not()  # torch MHA: True means "may not attend"; SDPA: "may attend"
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=m.dropout if m.training else 0.0,
                                         is_causal=is_causal and mask is None, scale=d ** -0.5)
    out = F.linear(out.transpose(1, 2).reshape(b, n, e), m.out_proj.weight, m.out_proj.bias)
    weights = None
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) * (d ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(mask.logical_not(), float("-inf")) if not mask.dtype.is_floating_point \
                else scores + mask
        weights = scores.softmax(dim=-1)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights
