"""nn.MultiheadAttention and nn.Transformer*Layer are traced as functional
decompositions: the captured graph reproduces the module, heads and head_dim
prune under the oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify


class MHANet(nn.Module):
    def __init__(self, batch_first, cross=False, packed=True):
        super().__init__()
        kw = {} if packed else {"kdim": 12, "vdim": 12}
        self.inp = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
        self.out = nn.Linear(16, 3)
        self.cross = cross
        self.packed = packed

    def forward(self, x):
        h = self.inp(x)
        if not self.packed:
            y, _ = self.attn(h, x, x, need_weights=False)
        elif self.cross:
            y, _ = self.attn(h, h * 2.0, h + 1.0)
        else:
            y, _ = self.attn(h, h, h)
        return self.out(y + h)


CASES = {
    "batch_first": (lambda: MHANet(True), (2, 5, 12)),
    "seq_first": (lambda: MHANet(False), (5, 2, 12)),
    "cross_inputs": (lambda: MHANet(True, cross=True), (2, 5, 12)),
    "separate_kv_dims": (lambda: MHANet(True, packed=False), (2, 5, 12)),
    "encoder_layer": (lambda: nn.Sequential(nn.Linear(12, 16), nn.TransformerEncoderLayer(16, 4, 32, batch_first=True),
                                            nn.Linear(16, 3)), (2, 5, 12)),
    "encoder_layer_norm_first": (lambda: nn.Sequential(nn.Linear(12, 16), nn.TransformerEncoderLayer(
        16, 4, 32, batch_first=True, norm_first=True, activation="gelu"), nn.Linear(16, 3)), (2, 5, 12)),
    "encoder_stack": (lambda: nn.Sequential(nn.Linear(12, 16), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32), 2, enable_nested_tensor=False), nn.Linear(16, 3)), (5, 2, 12)),
}


@pytest.mark.parametrize("policy", ["inner", "outer"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_modules_prune_exactly(name, policy):
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = make().eval()
    x = torch.randn(shape)
    gm = fxprune.trace(model, x)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)
                   for n in gm.graph.nodes)
    prune_and_verify(model, x, ratio=0.5, policy=policy, healthy=False)


def test_decoder_layer_decomposition_matches():
    torch.manual_seed(0)

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True).eval()

        def forward(self, tgt, memory):
            return self.layer(tgt, memory)

    model = Dec().eval()
    inputs = (torch.randn(2, 4, 16), torch.randn(2, 6, 16))
    gm = fxprune.trace(model, inputs)
    with torch.no_grad():
        assert torch.allclose(gm(*inputs), model(*inputs), atol=1e-5)


class MaskedMHA(nn.Module):
    """Attention with torch's masks: a key padding mask and/or an attention mask, each
    boolean (True: may not attend) or additive, given as inputs, held as a buffer or made
    in forward; the attention weights are used too."""

    def __init__(self, batch_first=True, mask="none", weights=False, **extra):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **extra)
        self.out = nn.Linear(16, 3)
        self.batch_first, self.mask, self.weights = batch_first, mask, weights
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(5))

    def forward(self, x, pad, attn_mask=None):
        h = self.inp(x)
        if self.mask == "buffer":
            attn_mask = self.causal
        elif self.mask == "made":  # boolean, from the padding: a query may not see later keys
            attn_mask = (pad.logical_not().cumsum(-1) > 3)[0].unsqueeze(0).expand(5, 5)
        y, w = self.attn(h, h, h, key_padding_mask=pad, attn_mask=attn_mask, need_weights=self.weights)
        out = self.out(y + h)
        if not self.weights:
            return out
        w = w[..., :1]  # (B, L, 1): the weight each query gives the first key
        return out + (w if self.batch_first else w.transpose(0, 1))


def _padding(dtype=torch.bool, at_start=False):
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True  # the first sequence has 3 tokens
    if at_start:
        pad = pad.flip(-1)
    return pad if dtype is torch.bool else torch.zeros(2, 5).masked_fill(pad, float("-inf"))


def _per_head_mask():
    mask = torch.rand(8, 5, 5) > 0.6  # (batch * heads, L, S)
    mask[..., 0] = False  # every query sees a key (a row with none gives NaN in torch)
    return mask


MASKED = {
    "bool_padding": (lambda: MaskedMHA(), lambda: (_padding(),)),
    "additive_padding": (lambda: MaskedMHA(), lambda: (_padding(torch.float32),)),
    "seq_first_padding_and_weights": (lambda: MaskedMHA(batch_first=False, weights=True), lambda: (_padding(),)),
    "padding_and_bool_mask": (lambda: MaskedMHA(), lambda: (_padding(), torch.ones(5, 5, dtype=torch.bool).triu(1))),
    "padding_and_per_head_mask": (lambda: MaskedMHA(), lambda: (_padding(), _per_head_mask())),
    "bool_padding_and_additive_buffer": (lambda: MaskedMHA(mask="buffer", weights=True), lambda: (_padding(),)),
    "additive_padding_and_mask_made_in_forward": (lambda: MaskedMHA(mask="made"),
                                                  lambda: (_padding(torch.float32),)),
    # add_bias_kv / add_zero_attn: one learned key and value, one of zeros, seen by every
    # query (the masks grow by a column); they were kept opaque, every channel pinned
    "bias_kv_padding_and_per_head_mask": (lambda: MaskedMHA(add_bias_kv=True),
                                          lambda: (_padding(), _per_head_mask())),
    "bias_kv_zero_attn_seq_first_weights": (lambda: MaskedMHA(batch_first=False, weights=True, add_bias_kv=True,
                                                              add_zero_attn=True),
                                            lambda: (_padding(torch.float32), torch.ones(5, 5, dtype=torch.bool).triu(1))),
    "zero_attn_padding": (lambda: MaskedMHA(add_zero_attn=True), lambda: (_padding(),)),
}


@pytest.mark.parametrize("policy", ["inner", "outer"])
@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_attention_is_decomposed_and_prunes(name, policy):
    """Masks decide the ops (rank 3 goes per head, booleans flip for SDPA), so a traced
    mask's rank and dtype are read on the example inputs: the symbolic trace decomposes
    the call instead of keeping it opaque (every channel pinned) or failing over to export."""
    torch.manual_seed(0)
    make, masks = MASKED[name]
    model = make().eval()
    x = torch.randn(2, 5, 12) if model.batch_first else torch.randn(5, 2, 12)
    inputs = (x, *masks())
    gm = fxprune.trace(model, inputs)
    with torch.no_grad():
        assert torch.allclose(gm(*inputs), model(*inputs), atol=1e-5)
    assert gm.meta["fxprune_frontend"] == "fx"
    result, _ = prune_and_verify(model, inputs, ratio=0.5, policy=policy, healthy=False)
    assert not result.groups.barriers
    assert result.groups.group_of("inp.weight").is_prunable


class PaddedEncoder(nn.Module):
    def __init__(self, nested=True, norm=True, mask_check=True):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm else None,
                                         enable_nested_tensor=nested, mask_check=mask_check)
        self.out = nn.Linear(16, 3)

    def forward(self, x, pad):
        return self.out(self.enc(self.inp(x), src_key_padding_mask=pad))


@pytest.mark.parametrize("nested,norm,mask_check", [(True, True, True), (True, False, True), (False, True, True),
                                                    (True, True, False)])
def test_encoder_with_padding_matches_eager_at_every_position(nested, norm, mask_check):
    """Eager nn.TransformerEncoder runs a padded batch on nested tensors when it can (no
    gradient, padding at the end, or no mask check): the padded positions come out zero
    before the final norm. The decomposition reproduces that where eager does it, and
    keeps the dense values where it does not (padding first with the mask check on); the
    oracle compares every position, padded ones included."""
    torch.manual_seed(0)
    model = PaddedEncoder(nested, norm, mask_check).eval()
    x = torch.randn(2, 5, 12)
    for pad in (_padding(), _padding(at_start=True), _padding(torch.float32)):
        result, v = prune_and_verify(model, (x, pad), ratio=0.5, healthy=False)
        assert result.frontend == "fx" and not result.groups.barriers
        with torch.no_grad():
            ref, got = model(x, pad), fxprune.trace(model, (x, pad))(x, pad)
        assert torch.allclose(got, ref, atol=1e-5)  # padded rows included
        if nested and not norm:  # the zeros reach the output layer: its bias alone
            assert torch.allclose(ref[0, 3:], model.out.bias.expand(2, 3)) == (mask_check is False or
                                                                             not bool(pad[0, 0]))


def test_decoder_layer_with_padding_masks_prunes():
    torch.manual_seed(0)

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(12, 16)
            self.layer = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, tgt, memory, tgt_pad, mem_pad):
            h = self.layer(self.inp(tgt), self.inp(memory), tgt_key_padding_mask=tgt_pad,
                           memory_key_padding_mask=mem_pad, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4))
            return self.out(h)

    tgt_pad = torch.tensor([[False, False, False, True], [False] * 4])
    inputs = (torch.randn(2, 4, 12), torch.randn(2, 5, 12), tgt_pad, _padding())
    result, _ = prune_and_verify(Dec().eval(), inputs, ratio=0.5, healthy=False)
    assert result.frontend == "fx" and not result.groups.barriers


class EinsumRelativeAttention(nn.Module):
    """torchvision MaxViT's attention: q, k, v chunked from one projection, scores and
    output by einsum, a relative-position bias gathered from a table."""

    def __init__(self):
        super().__init__()
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

        self.inp = nn.Linear(8, 16)
        self.attn = RelativePositionalMultiHeadAttention(16, 4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


class ThreeWay(nn.Module):
    """A three-operand einsum: the channel summed between the second and third operands
    never meets the first."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(6, 4)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # x: (n, 6)
        a, b, c = self.a(x), self.b(x), self.c(x)
        return self.head(torch.einsum("ni,nj,nj->ni", [a, b, c]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("net,shape", [(EinsumRelativeAttention, (1, 2, 16, 8)), (ThreeWay, (7, 6))])
def test_einsum_contractions_are_zeroed_in_every_operand(net, shape, seed):
    """The oracle zeroes removed channels in every einsum operand: with q/k channels
    removed (contracted into the scores), or the channel summed between the last two
    operands, the pruned model matches (the first operand alone does not carry them)."""
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(shape)
    result, v = prune_and_verify(model, x, ratio=0.5,
                                 pipeline=f"channel-deps,score-random{{seed={seed}}},select{{ratio=0.5}},rewrite")
    assert v.exact_groups > 0 and not result.groups.barriers


class EllipsisEinsum(nn.Module):
    """einsum with ``...``: a hand-written linear layer over any leading dims, attention
    written batch-agnostically, and an implicit output (``...ij,...jk``: ellipsis first)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 16) * 0.4)
        self.k, self.v, self.head = nn.Linear(16, 16), nn.Linear(16, 12), nn.Linear(12, 2)

    def forward(self, x):  # x: (b, n, 6)
        h = torch.relu(torch.einsum("...d,de->...e", x, self.w))
        scores = torch.einsum("b...qd,b...kd->b...qk", h, self.k(h)).softmax(-1)
        return self.head(torch.einsum("...ij,...jk", scores, self.v(h)))


def test_einsum_with_ellipsis_is_analysed():
    # was "einsum with ellipsis is not analysed": every channel pinned
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    groups = fxprune.analyze(EllipsisEinsum().eval(), x)
    assert not groups.barriers
    assert groups.group_of("w", "free") is groups.group_of("k.weight", "out")  # h meets k(h) over d
    assert groups.group_of("v.weight").is_prunable
    result, v = prune_and_verify(EllipsisEinsum().eval(), x, ratio=0.5)
    m = result.module
    assert m.get_parameter("w").shape == (6, 8) and m.get_parameter("v.weight").shape == (6, 8)
    assert v.exact_groups >= 2


class SDPAGroupedQuery(nn.Module):
    """Grouped-query attention left to SDPA (``enable_gqa=True``): 4 query heads, 2 kv
    heads, head_dim 4; no repeat_kv in the graph."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 4).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(self.o(a.transpose(1, 2).reshape(b, t, 16)).mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("policy, gqa, q_out, kv_out", [
    ("head_dim", "kv_groups", 8, 4),  # 4 and 2 heads of head_dim 2
    ("heads", "kv_groups", 8, 4),     # one kv head with its two query heads
    ("heads", "q_heads", 8, 8),       # both kv heads, one query head each
])
def test_sdpa_enable_gqa_keeps_query_heads_per_kv_head(policy, gqa, q_out, kv_out, frontend):
    torch.manual_seed(0)
    result, v = prune_and_verify(SDPAGroupedQuery(), torch.randn(2, 5, 16), ratio=0.5, policy=policy,
                                 gqa=gqa, frontend=frontend)
    assert not result.groups.barriers and v.exact_groups >= 2
    m = result.module
    assert m.get_parameter("q.weight").shape[0] == q_out
    assert m.get_parameter("k.weight").shape[0] == m.get_parameter("v.weight").shape[0] == kv_out


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al.): the keys' and values' features meet in a
    (head_dim x head_dim) matrix, k^T v, before the queries read it."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(16, 3 * 32), nn.Linear(32, 4), 4

    def forward(self, x):
        b, n, _ = x.shape
        return self.attend(*self.qkv(x).view(b, n, 3, self.heads, 8).permute(2, 0, 3, 1, 4))

    def attend(self, q, k, v):  # (b, heads, n, 8) each
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        norm = 1 / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + 1e-6)
        y = torch.einsum("bhnd,bhde,bhn->bhne", q, kv, norm)
        return self.out(y.transpose(1, 2).flatten(2))


def test_linear_attention_prunes_heads_and_says_why_head_dim_stays():
    """Fused qkv ties q's, k's and v's head_dim together (one view splits them), and k's
    features cross v's in k^T v: the head_dim group is pinned with that reason, not
    dropped from the table; whole heads prune."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    groups = fxprune.analyze(LinearAttention(), x)
    g = groups.group_of("qkv.weight")
    assert g is not None and not g.is_prunable
    assert any("cross in the output" in r for r in g.pinned_reasons) and "cross in the output" in str(groups)
    result, _ = prune_and_verify(LinearAttention(), x, ratio=0.5, policy="heads")
    assert result.module.get_parameter("qkv.weight").shape[0] == 48  # 2 of 4 heads, q, k and v


class LinearAttentionSplit(LinearAttention):
    """The same with separate projections: only k's features must stay (they cross v's)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(16, 32)
        del self.qkv

    def forward(self, x):
        b, n, _ = x.shape
        return self.attend(*(p(x).view(b, n, self.heads, 8).transpose(1, 2) for p in (self.q, self.k, self.v)))


def test_crossing_channels_follow_one_operand():
    """In k^T v one operand's channels are followed and the other's pinned: v's head_dim
    (and the output projection's columns) prune, q's and k's stay, with the reason."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    groups = fxprune.analyze(LinearAttentionSplit(), x)
    assert any("cross in the output" in r for r in groups.group_of("k.weight").pinned_reasons)
    assert groups.group_of("q.weight") is groups.group_of("k.weight")
    assert groups.group_of("v.weight").is_prunable
    result, v = prune_and_verify(LinearAttentionSplit(), x, ratio=0.5)
    m = result.module
    assert m.get_parameter("k.weight").shape == (32, 16) and m.get_parameter("q.weight").shape == (32, 16)
    assert m.get_parameter("v.weight").shape == (16, 16) and m.get_parameter("out.weight").shape == (4, 16)
    assert v.exact_groups >= 1


def test_ordinary_models_list_no_constants():
    groups = fxprune.analyze(MHANet(True), torch.randn(2, 5, 12))
    assert groups.constant_members == () and "kept with the constants" not in str(groups)


class Seq2Seq(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.src, self.tgt = nn.Embedding(30, 16), nn.Embedding(30, 16)
        if stack == "transformer":
            self.body = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True)
        else:
            self.body = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                              norm=nn.LayerNorm(16))
        self.out = nn.Linear(16, 30)

    def forward(self, src, tgt, src_pad):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        if self.stack == "transformer":
            h = self.body(self.src(src), self.tgt(tgt), tgt_mask=causal, src_key_padding_mask=src_pad,
                          memory_key_padding_mask=src_pad)
        else:
            h = self.body(self.tgt(tgt), self.src(src), tgt_mask=causal, memory_key_padding_mask=src_pad,
                          tgt_is_causal=True)
        return self.out(h)


@pytest.mark.parametrize("stack", ["transformer", "decoder"])
def test_whole_transformer_and_decoder_stacks_are_decomposed(stack):
    """nn.Transformer and nn.TransformerDecoder were opaque leaves (every channel of the
    embeddings pinned); they decompose into their layers, masks included."""
    torch.manual_seed(0)
    src, tgt = torch.randint(0, 30, (2, 6)), torch.randint(0, 30, (2, 5))
    result, v = prune_and_verify(Seq2Seq(stack).eval(), (src, tgt, _padding().repeat(1, 2)[:, :6]), ratio=0.5,
                                 healthy=False)
    assert result.frontend == "fx" and not result.groups.barriers
    assert result.groups.group_of("src.weight", "out").is_prunable and v.exact_groups >= 3


def test_unbatched_attention_input_is_decomposed_on_a_second_trace():
    """nn.MultiheadAttention also takes one unbatched sequence (L, E). The decomposition
    takes inputs as batched (reading a query's rank costs a run of everything before it),
    so the first graph does not run on such an input; capture traces again reading ranks
    on the example inputs instead of blaming the inputs, and the sequence is a batch of one."""
    torch.manual_seed(0)

    class Unbatched(nn.Module):
        def __init__(self, weights):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(12, 16), nn.MultiheadAttention(16, 4), nn.Linear(16, 3)
            self.weights = weights

        def forward(self, x, pad):
            h = self.inp(x)
            y, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=self.weights)
            return self.out(y) + (w[:, :1] if self.weights else 0.0)

    pad = torch.tensor([False, False, False, False, True])
    for weights in (False, True):
        result, _ = prune_and_verify(Unbatched(weights).eval(), (torch.randn(5, 12), pad), ratio=0.5)
        assert result.frontend == "fx" and not result.groups.barriers
        assert result.module.get_parameter("inp.weight").shape[0] == 8


# -- torch's functional and fused attention, as Dynamo's graphs hold them ---------------
def _mha_args(e=16, h=4, separate=False, bias_kv=False):
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return dict(embed_dim_to_check=e, num_heads=h, in_proj_weight=None if separate else rand(3 * e, e),
                in_proj_bias=rand(3 * e), bias_k=rand(1, 1, e) if bias_kv else None,
                bias_v=rand(1, 1, e) if bias_kv else None, add_zero_attn=False, dropout_p=0.0,
                out_proj_weight=rand(e, e), out_proj_bias=rand(e), training=False,
                use_separate_proj_weight=separate, q_proj_weight=rand(e, e) if separate else None,
                k_proj_weight=rand(e, 12) if separate else None, v_proj_weight=rand(e, 12) if separate else None)


def _causal(n, additive):
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.zeros(n, n).masked_fill(upper, float("-inf")) if additive else upper


FUNCTIONAL = {  # name: (query shape, key/value shape or None for self-attention, argument changes)
    "self": ((5, 2, 16), None, {}),
    "unbatched": ((5, 16), None, {}),
    "cross": ((5, 2, 16), (7, 2, 16), {}),
    "separate_kv_dims": ((5, 2, 16), (7, 2, 12), {"separate": True}),
    "bias_kv_zero_attn": ((5, 2, 16), None, {"bias_kv": True, "add_zero_attn": True}),
    "bool_mask_weights": ((5, 2, 16), None, {"attn_mask": _causal(5, False), "need_weights": True}),
    "additive_3d_mask_per_head_weights": ((5, 2, 16), None, {
        "attn_mask": torch.randn(8, 5, 5), "need_weights": True, "average_attn_weights": False}),
    "padding_and_mask": ((5, 2, 16), None, {"attn_mask": _causal(5, False),
                                            "key_padding_mask": torch.tensor([[0, 0, 0, 1, 1], [0] * 5]).bool()}),
    "causal_hint": ((5, 2, 16), None, {"attn_mask": _causal(5, False), "is_causal": True, "need_weights": False}),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_multi_head_attention_decomposition_matches_torch(name):
    from fxprune.decompose import multi_head_attention_forward

    q_shape, kv_shape, change = FUNCTIONAL[name]
    change = dict(change)
    args = _mha_args(separate=change.pop("separate", False), bias_kv=change.pop("bias_kv", False))
    args.update(change)
    torch.manual_seed(0)
    q = torch.randn(q_shape)
    k = v = q if kv_shape is None else torch.randn(kv_shape)
    if kv_shape is not None:
        v = torch.randn(kv_shape)
    want = F.multi_head_attention_forward(q, k, v, **args)
    got = multi_head_attention_forward(q, k, v, **args)
    assert torch.allclose(got[0], want[0], atol=1e-5) and want[0].abs().max() > 1e-2
    if args.get("need_weights", True):
        assert got[1].shape == want[1].shape and torch.allclose(got[1], want[1], atol=1e-5)


def test_fused_fast_paths_decompose_to_the_same_values():
    from fxprune.decompose import native_multi_head_attention, transformer_encoder_layer_fwd

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    a = _mha_args()
    weights = (a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"])
    for need in (True, False):
        want = torch._native_multi_head_attention(x, x, x, 16, 4, *weights, None, need)
        got = native_multi_head_attention(x, x, x, 16, 4, *weights, None, need)
        assert torch.allclose(got[0], want[0], atol=1e-5) and (not need or torch.allclose(got[1], want[1], atol=1e-5))
    norms = (torch.rand(16) + 0.5, torch.randn(16) * 0.1, torch.rand(16) + 0.5, torch.randn(16) * 0.1)
    ffn = (torch.randn(32, 16) * 0.3, torch.randn(32) * 0.1, torch.randn(16, 32) * 0.3, torch.randn(16) * 0.1)
    for gelu in (False, True):
        for norm_first in (False, True):
            want = torch._transformer_encoder_layer_fwd(x, 16, 4, *weights, gelu, norm_first, 1e-5, *norms, *ffn)
            got = transformer_encoder_layer_fwd(x, 16, 4, *weights, gelu, norm_first, 1e-5, *norms, *ffn)
            assert torch.allclose(got, want, atol=1e-5), (gelu, norm_first)


class FunctionalAttention(nn.Module):
    """Attention written against F.multi_head_attention_forward, sequence first."""

    def __init__(self, static_kv=False):
        super().__init__()
        self.inp, self.out = nn.Linear(12, 16), nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))
        self.in_proj_weight = nn.Parameter(torch.randn(48, 16) * 0.3)
        self.in_proj_bias = nn.Parameter(torch.randn(48) * 0.1)
        self.proj = nn.Linear(16, 16)
        self.static_kv = static_kv

    def forward(self, x):
        h = self.inp(x)
        static = x.new_zeros(x.shape[1] * 4, x.shape[0], 4) if self.static_kv else None
        y, _ = F.multi_head_attention_forward(h, h, h, 16, 4, self.in_proj_weight, self.in_proj_bias, None, None,
                                              False, 0.0, self.proj.weight, self.proj.bias, training=False,
                                              need_weights=False, static_k=static, static_v=static)
        return self.out(y + h)


@pytest.mark.parametrize("frontend", ["fx", "graph"])
def test_functional_attention_in_a_traced_or_given_graph_prunes_its_heads(frontend):
    torch.manual_seed(0)
    model, x = FunctionalAttention().eval(), torch.randn(5, 2, 12)
    if frontend == "graph":  # a GraphModule that holds the call whole, as Dynamo hands one over
        model = torch.fx.symbolic_trace(model)
        assert any(n.target is F.multi_head_attention_forward for n in model.graph.nodes)
    result, _ = prune_and_verify(model, x, ratio=0.5, healthy=False)
    assert not result.groups.barriers
    gm = result.module
    assert not any(n.target is F.multi_head_attention_forward for n in gm.graph.nodes)
    assert gm.get_parameter("in_proj_weight").shape[0] < 48
    # self-attention projects once, whatever the layout
    assert sum(n.op == "call_function" and n.target is F.linear and "in_proj_weight" in str(n.args[1])
               for n in gm.graph.nodes) == 1


def test_functional_attention_it_cannot_decompose_is_pinned_with_its_reason():
    torch.manual_seed(0)
    model, x = torch.fx.symbolic_trace(FunctionalAttention(static_kv=True).eval()), torch.randn(5, 2, 12)
    result, _ = prune_and_verify(model, x, ratio=0.5, healthy=False)
    assert any("multi_head_attention_forward" in b for b in result.groups.barriers), result.groups.barriers
    assert any(n.target is F.multi_head_attention_forward for n in result.module.graph.nodes)
    assert result.module.get_parameter("in_proj_weight").shape == (48, 16)
    assert result.module.get_parameter("out.0.weight").shape[0] < 24  # the rest still prunes
