"""Traceable decompositions of opaque torch.nn modules.

``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers are leaves for
torch.fx and their forwards (fused fast paths) are not traceable; the tracer
calls the functions here instead, which compute the same function from the
module's own parameters and submodules with ops the channel rules understand
(linear, view, transpose, scaled dot-product attention), so heads and head_dim
become prunable and the pruned graph needs no attention module at all.

Masks keep torch's meaning: an attention mask of rank 2 or 3 (batch times heads)
and a key padding mask, each boolean (True: may not attend) or additive, merged
into one SDPA mask. Their rank and dtype decide the ops, so a mask that is traced
(a model input, one made in forward) is looked up on the example inputs
(``DecomposingTracer.example_meta``); where that is not possible the trace fails and the
auto front end uses torch.export instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def mha_supported(m: nn.Module) -> bool:
    """Whether :func:`multihead_attention` reproduces ``m``."""
    return type(m) is nn.MultiheadAttention


def _rank_and_dtype(t, what: str) -> tuple[int, torch.dtype]:
    """(rank, dtype) of a tensor that may be traced (then read on the example inputs);
    a TypeError where they are not known."""
    if isinstance(t, torch.Tensor):
        return t.dim(), t.dtype
    meta = t.tracer.example_meta(t) if isinstance(t, torch.fx.Proxy) and hasattr(t.tracer, "example_meta") else None
    if meta is None:
        raise TypeError(f"the rank and dtype of the {what} are not known while tracing (they decide how "
                        f"it is applied); torch.export captures such calls")
    return len(meta.shape), meta.dtype


def _describe(t, what: str) -> tuple[int, bool]:
    """(rank, whether floating point) of a tensor that may be traced."""
    rank, dtype = _rank_and_dtype(t, what)
    return rank, dtype.is_floating_point


def _careful(t) -> bool:
    """Whether ``t`` is traced by a tracer that reads ranks and dtypes where it helps (see
    ``DecomposingTracer.careful``)."""
    return isinstance(t, torch.fx.Proxy) and getattr(t.tracer, "careful", False)


def _as_additive(mask, attend: bool, dtype):
    """A boolean SDPA mask (True: may attend) as an additive one."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask.logical_not(), float("-inf")) if attend else mask


def sdpa_mask(attn_mask, key_padding_mask, b: int, h: int, n: int, s: int, dtype):
    """nn.MultiheadAttention's masks as one SDPA mask broadcastable to (b, h, n, s):
    (mask, is_additive), or (None, False). Boolean masks mean "may not attend" in torch's
    modules and "may attend" in SDPA; additive ones are added to the scores in both."""
    parts = []
    if attn_mask is not None:
        rank, additive = _describe(attn_mask, "attention mask")
        mask = attn_mask.reshape(b, h, n, s) if rank == 3 else attn_mask
        parts.append((mask if additive else mask.logical_not(), additive))
    if key_padding_mask is not None:
        _, additive = _describe(key_padding_mask, "key padding mask")
        mask = key_padding_mask.reshape(b, 1, 1, s)
        parts.append((mask if additive else mask.logical_not(), additive))
    if len(parts) < 2:
        return parts[0] if parts else (None, False)
    (a, a_add), (k, k_add) = parts
    if not a_add and not k_add:
        return a & k, False
    return _as_additive(a, not a_add, dtype) + _as_additive(k, not k_add, dtype), True


def _attend_one_more(mask):
    """A mask over one more key at the end, which every query may attend (zero: neither
    masked as a boolean nor shifted as an additive mask)."""
    return None if mask is None else F.pad(mask, (0, 1))


def multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                        need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                        is_causal: bool = False):
    """``m(query, key, value, ...)`` written with traceable functional ops. Inputs are taken
    as batched; a tracer that reads ranks (``careful``: a retrace after the batched graph
    did not run) also decomposes one unbatched sequence (L, E)."""
    unbatched = _careful(query) and _describe(query, "query")[0] == 2
    if unbatched:  # one sequence: a batch of one, batch first
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = _batch_first(query, key, value)
    separate = None if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    out, weights = _attention(query, key, value, m.embed_dim, m.num_heads, m.in_proj_weight, m.in_proj_bias,
                              separate, m.bias_k, m.bias_v, m.add_zero_attn, m.dropout if m.training else 0.0,
                              m.out_proj.weight, m.out_proj.bias, key_padding_mask, need_weights, attn_mask,
                              average_attn_weights, is_causal, m.out_proj.weight.dtype)
    if unbatched:
        return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


class NotDecomposable(Exception):
    """A call the functional decompositions do not reproduce; the tracer records it whole."""


def multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                                 bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                 is_causal=False):
    """``F.multi_head_attention_forward`` (sequence first, the graphs Dynamo makes of
    ``nn.MultiheadAttention``) written with traceable functional ops.

    Raises :class:`NotDecomposable`, before any op is traced, for what it does not
    reproduce: precomputed keys or values (``static_k``/``static_v``), or a query, mask or
    output projection whose rank or dtype is not known while tracing."""
    if static_k is not None or static_v is not None:
        raise NotDecomposable("static_k/static_v (precomputed keys and values) are not decomposed")
    if is_causal and attn_mask is None:
        raise NotDecomposable("is_causal needs attn_mask in F.multi_head_attention_forward")
    try:
        rank = _describe(query, "query")[0]
        for mask, what in ((attn_mask, "attention mask"), (key_padding_mask, "key padding mask")):
            if mask is not None:
                _describe(mask, what)
        dtype = _rank_and_dtype(out_proj_weight, "output projection")[1]
    except TypeError as exc:
        raise NotDecomposable(str(exc)) from exc
    if not isinstance(embed_dim_to_check, int) or not isinstance(num_heads, int):
        raise NotDecomposable("the embedding size or the number of heads is not a constant")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # torch trusts the hint here: SDPA's causal mask, whatever attn_mask holds
    unbatched = rank == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    else:
        query, key, value = _batch_first(query, key, value)
    separate = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else None
    out, weights = _attention(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                              separate, bias_k, bias_v, add_zero_attn, dropout_p if training else 0.0,
                              out_proj_weight, out_proj_bias, key_padding_mask, need_weights, attn_mask,
                              average_attn_weights, is_causal, dtype)
    if unbatched:
        return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
    return out.transpose(0, 1), weights


def _batched_self_attention_inputs(query, mask, dtype_of) -> torch.dtype:
    """Checks shared by torch's fused fast paths, which take batched, batch-first inputs:
    no mask (they take one in a layout of their own), a query of rank 3. The dtype of
    ``dtype_of``."""
    if mask is not None:
        raise NotDecomposable("a fused attention fast path with a mask is not decomposed")
    try:
        rank, dtype = _describe(query, "query")[0], _rank_and_dtype(dtype_of, "output projection")[1]
    except TypeError as exc:
        raise NotDecomposable(str(exc)) from exc
    if rank != 3:
        raise NotDecomposable("a fused attention fast path on an input that is not batched")
    return dtype


def native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                                proj_bias, mask=None, need_weights=True, average_attn_weights=True, mask_type=None):
    """``torch._native_multi_head_attention``, the fused fast path of
    ``nn.MultiheadAttention`` (batch first), written with traceable ops. Without a mask only."""
    dtype = _batched_self_attention_inputs(query, mask, proj_weight)
    return _attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, None, None, None, False, 0.0,
                      proj_weight, proj_bias, None, need_weights, None, average_attn_weights, False, dtype)


def transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                  use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                                  norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None,
                                  mask_type=None):
    """``torch._transformer_encoder_layer_fwd``, the fused fast path of
    ``nn.TransformerEncoderLayer`` (batch first, in inference), written with traceable
    ops. Without a mask only."""
    dtype = _batched_self_attention_inputs(src, mask, proj_weight)

    def attend(x):
        return _attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, None, None, None, False, 0.0,
                          proj_weight, proj_bias, None, False, None, True, False, dtype)[0]

    def feed_forward(x):
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), ffn_weight_2, ffn_bias_2)

    def norm1(x):
        return F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)

    def norm2(x):
        return F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)

    x = src
    if norm_first:
        x = x + attend(norm1(x))
        return x + feed_forward(norm2(x))
    x = norm1(x + attend(x))
    return norm2(x + feed_forward(x))


def _batch_first(query, key, value):
    """Sequence-first query, key and value made batch first; one transpose for what is
    one value (self-attention stays recognizable)."""
    q = query.transpose(0, 1)
    k = q if key is query else key.transpose(0, 1)
    v = q if value is query else k if value is key else value.transpose(0, 1)
    return q, k, v


def _attention(query, key, value, e: int, h: int, in_proj_weight, in_proj_bias, separate, bias_k, bias_v,
               add_zero_attn: bool, dropout_p: float, out_weight, out_bias, key_padding_mask, need_weights: bool,
               attn_mask, average_attn_weights: bool, is_causal: bool, dtype):
    """Multi-head attention on batched, batch-first inputs: the in-projection (packed in
    ``in_proj_weight``, or ``separate`` (q, k, v) weights), learned and zero extra keys,
    SDPA over ``h`` heads and the out-projection. (out, weights or None)."""
    d = e // h
    if separate is None:
        if query is key and key is value:
            q, k, v = F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, in_proj_weight, in_proj_bias)[..., :e]
            k = F.linear(key, in_proj_weight, in_proj_bias)[..., e:2 * e]
            v = F.linear(value, in_proj_weight, in_proj_bias)[..., 2 * e:]
    else:
        q, k, v = (F.linear(x, w) for x, w in zip((query, key, value), separate))
        if in_proj_bias is not None:
            q, k, v = q + in_proj_bias[:e], k + in_proj_bias[e:2 * e], v + in_proj_bias[2 * e:]
    b, n = q.shape[0], q.shape[1]
    if bias_k is not None:  # add_bias_kv: one more key and value, learned, that every query sees
        k = torch.cat([k, bias_k.expand(b, 1, e)], dim=1)
        v = torch.cat([v, bias_v.expand(b, 1, e)], dim=1)
        attn_mask, key_padding_mask = _attend_one_more(attn_mask), _attend_one_more(key_padding_mask)
    s = k.shape[1]
    q = q.reshape(b, n, h, d).transpose(1, 2)
    k = k.reshape(b, s, h, d).transpose(1, 2)
    v = v.reshape(b, s, h, d).transpose(1, 2)
    if add_zero_attn:  # and one more of zeros (zeros_like: they are zeros in every channel)
        k = torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2)
        attn_mask, key_padding_mask = _attend_one_more(attn_mask), _attend_one_more(key_padding_mask)
        s = s + 1
    mask, additive = sdpa_mask(attn_mask, key_padding_mask, b, h, n, s, dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal and mask is None, scale=d ** -0.5)
    out = F.linear(out.transpose(1, 2).reshape(b, n, e), out_weight, out_bias)
    weights = None
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) * (d ** -0.5)
        if mask is not None:
            scores = scores + mask if additive else scores.masked_fill(mask.logical_not(), float("-inf"))
        weights = scores.softmax(dim=-1)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    return out, weights


def _self_block(m, x, mask, padding, is_causal):
    out = multihead_attention(m.self_attn, x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False,
                              is_causal=is_causal)[0]
    return m.dropout1(out)


def _ff_block(m, x, dropout_out):
    return dropout_out(m.linear2(m.dropout(m.activation(m.linear1(x)))))


def encoder_layer(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                  is_causal: bool = False):
    """``nn.TransformerEncoderLayer`` without its fused fast path."""
    x = src
    if m.norm_first:
        x = x + _self_block(m, m.norm1(x), src_mask, src_key_padding_mask, is_causal)
        return x + _ff_block(m, m.norm2(x), m.dropout2)
    x = m.norm1(x + _self_block(m, x, src_mask, src_key_padding_mask, is_causal))
    return m.norm2(x + _ff_block(m, x, m.dropout2))


def decoder_layer(m: nn.TransformerDecoderLayer, tgt, memory, tgt_mask=None, memory_mask=None,
                  tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal: bool = False,
                  memory_is_causal: bool = False):
    """``nn.TransformerDecoderLayer`` with traceable attention."""
    def cross(x):
        out = multihead_attention(m.multihead_attn, x, memory, memory, key_padding_mask=memory_key_padding_mask,
                                  attn_mask=memory_mask, need_weights=False, is_causal=memory_is_causal)[0]
        return m.dropout2(out)

    x = tgt
    if m.norm_first:
        x = x + _self_block(m, m.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + cross(m.norm2(x))
        return x + _ff_block(m, m.norm3(x), m.dropout3)
    x = m.norm1(x + _self_block(m, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = m.norm2(x + cross(x))
    return m.norm3(x + _ff_block(m, x, m.dropout3))


def encoder(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder``: its layers in turn (each decomposed), then the norm.

    With a key padding mask, eager PyTorch runs an encoder in inference (no gradient) on
    nested tensors where it can, which leaves the padded positions zero before the final
    norm. The decomposition computes densely and zeroes them under the same conditions:
    those known while tracing, and, where the encoder checks it, the padding being at the
    end of every sequence. Without that check eager takes the first (number of unpadded)
    positions of each sequence as its tokens, wherever the padding is; so does this."""
    padding, zero = src_key_padding_mask, None
    if src_key_padding_mask is not None and mask is None and getattr(m, "use_nested_tensor", False) \
            and torch.backends.mha.get_fastpath_enabled() and not m.layers[0].training \
            and not torch.is_autocast_enabled() and _describe(src, "encoder input")[0] == 3:
        _, additive = _describe(src_key_padding_mask, "key padding mask")
        pad = src_key_padding_mask.ne(0) if additive else src_key_padding_mask
        valid = pad.logical_not()
        if getattr(m, "mask_check", True):
            zero = pad & valid[:, 1:].le(valid[:, :-1]).all()
        else:
            position = torch.ones_like(pad, dtype=torch.long).cumsum(1) - 1
            zero = padding = position >= valid.sum(1, keepdim=True)
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=padding, is_causal=bool(is_causal))
    if zero is not None:
        x = x.masked_fill(zero.unsqueeze(-1), 0.0)
    return m.norm(x) if m.norm is not None else x


def decoder(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
            memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.TransformerDecoder``: its layers in turn (each decomposed), then the norm. (A
    causal ``tgt_mask`` is applied as the mask it is; torch only uses the hint to choose
    a kernel.)"""
    x = tgt
    for layer in m.layers:
        x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                  memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                  memory_is_causal=memory_is_causal)
    return m.norm(x) if m.norm is not None else x


def transformer(m: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.Transformer``: the encoder on the source, the decoder on the target and memory."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def decomposition(m: nn.Module, kwargs: dict[str, Any]):
    """The traceable replacement for module ``m`` called with ``kwargs``, or None."""
    if type(m) is nn.MultiheadAttention and mha_supported(m):
        return multihead_attention
    if type(m) is nn.TransformerEncoderLayer and type(m.self_attn) is nn.MultiheadAttention:
        return encoder_layer
    if type(m) is nn.TransformerDecoderLayer:
        return decoder_layer
    if type(m) is nn.TransformerEncoder:
        return encoder
    if type(m) is nn.TransformerDecoder:
        return decoder
    if type(m) is nn.Transformer:
        return transformer
    return None


def function_decomposition(target: Any):
    """The traceable replacement for a call of the function ``target``, or None. It raises
    :class:`NotDecomposable` (before tracing any op) for a call it does not reproduce."""
    return _FUNCTIONS.get(target)


_FUNCTIONS: dict[Any, Any] = {
    F.multi_head_attention_forward: multi_head_attention_forward,
    torch._native_multi_head_attention: native_multi_head_attention,
    torch._transformer_encoder_layer_fwd: transformer_encoder_layer_fwd,
}
