"""Attention found from the IR alone: self-written BERT-, GPT-2- and LLaMA-style
models (separate and fused qkv, causal mask, RMSNorm, rotary embeddings,
grouped-query attention with repeat_kv, SwiGLU, tied embeddings) pruned by
head_dim (policy "inner") and by whole heads (policy "outer"), every result
checked by the oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify
from fxprune.blocks import Bert, Gpt2, Llama

MODELS = {"bert": Bert, "gpt2": Gpt2, "llama": Llama}


@pytest.mark.parametrize("policy", ["inner", "outer", "both"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_transformers_prune_exactly(name, policy):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 8))
    result, v = prune_and_verify(MODELS[name](), ids, ratio=0.5, policy=policy, healthy=False)
    assert v.exact_groups >= 2
    # the residual stream (hidden size) is pruned too, through the norms: inexact
    hidden = result.stages[0] if result.stages else result
    assert any(not g.exact and g.prunable for g in hidden.groups.groups)
    assert v.inexact_groups >= 1


class TorchRMSNormBlock(nn.Module):
    """nn.RMSNorm (not a hand-written one) around a SwiGLU MLP."""

    def __init__(self, dim=16):
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.norm = nn.RMSNorm(dim)
        self.gate, self.up, self.down = nn.Linear(dim, 24), nn.Linear(dim, 24), nn.Linear(24, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        n = self.norm(h)
        return self.out(h + self.down(F.silu(self.gate(n)) * self.up(n)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_torch_rmsnorm_is_analysed(frontend):
    torch.manual_seed(0)
    model = TorchRMSNormBlock()
    x = torch.randn(2, 5, 6)
    groups = fxprune.analyze(model, x, frontend=frontend)
    assert not groups.barriers
    hidden = groups.group_of("norm.weight", "norm")
    assert not hidden.exact and len(hidden.prunable) == 16  # RMS over the hidden dim: inexact
    result, v = prune_and_verify(model, x, ratio=0.5, frontend=frontend, healthy=False)
    p = dict(result.module.named_parameters())
    assert p["norm.weight"].shape == (8,) and p["gate.weight"].shape == (12, 8)


def _attention_widths(module, prefix):
    return {n: m.out_features for n, m in module.named_modules() if n.endswith(prefix)}


def test_bert_head_dim_vs_heads():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 8))
    model = Bert()
    inner = fxprune.prune(model, ids, ratio=0.5, policy="inner")
    outer = fxprune.prune(model, ids, ratio=0.5, policy="outer")
    for r in (inner, outer):  # q and k keep equal widths; 4 heads x head_dim
        q, k = _attention_widths(r.module, ".q"), _attention_widths(r.module, ".k")
        assert list(q.values()) == list(k.values()) and all(w % 4 == 0 and w < 32 for w in q.values())
    # head_dim pruning keeps 4 heads in the view; head pruning keeps head_dim 8
    assert ", 4, 4)" in inner.module.code
    assert ", 2, 8)" in outer.module.code
    for r in (inner, outer):
        assert fxprune.verify(model, r, ids).max_rel_err < 1e-4


def test_rotary_pairs_and_gqa_groups_are_found():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (1, 8))
    groups = fxprune.analyze(Llama(), ids, policy="inner")
    g = groups.group_of("layers.0.q_proj.weight")
    # head_dim 8 with rotate_half: channel i pairs with i + 4, and q/k meet in the product
    assert g.size == 4 and groups.group_of("layers.0.k_proj.weight") is g
    heads = fxprune.analyze(Llama(), ids, policy="outer")
    gq = heads.group_of("layers.0.q_proj.weight")
    assert gq.size == 2  # 4 query heads in 2 kv groups: whole kv groups go
    assert heads.group_of("layers.0.v_proj.weight") is gq


def test_sdpa_default_scale_is_preserved():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 4)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v)
            return self.o(y.transpose(1, 2).reshape(b, n, 16))

    torch.manual_seed(0)
    result, _ = prune_and_verify(Block(), torch.randn(2, 5, 16), ratio=0.5, healthy=False)
    assert "scale = 0.35355" in result.module.code


def test_tied_embedding_prunes_with_its_output_projection():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 8))
    model = Gpt2()
    result = fxprune.prune(model, ids, ratio=0.5)
    assert result.module.wte.weight is result.module.lm_head.weight
    assert result.module.wte.weight.shape[1] == 16
    assert model.wte.weight.shape == (40, 32)
    assert fxprune.verify(model, result, ids).max_rel_err < 1e-4


def test_policy_both_removes_heads_then_head_dim():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 8))
    model = Bert()
    result, v = prune_and_verify(model, ids, ratio=0.5, policy="both", healthy=False)
    heads, dims = result.stages
    assert heads.groups.policy == "outer" and dims.groups.policy == "inner"
    q = dict(result.module.named_parameters())["blocks.0.q.weight"].shape[0]
    # 1 - sqrt(0.5) = 0.29 of 4 heads (1 head) and then of head_dim 8 (2 channels)
    assert q == 3 * 6
    assert result.report.after.params < result.report.before.params


def test_heads_policy_needs_heads():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    for policy in ("heads", "both"):
        with pytest.raises(fxprune.ConfigError, match="no view or reshape"):
            fxprune.prune(net, x, ratio=0.5, policy=policy)


def test_heads_ratio_must_remove_whole_heads():
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(fxprune.ConfigError, match=r"blocks\.0\..*4 prunable heads.*0\.25 and 0\.5"):
        fxprune.prune(Bert(), ids, ratio=0.3, policy="heads")
    model = Bert()
    result = fxprune.prune(model, ids, ratio=0.25, policy="heads")
    assert dict(result.module.named_parameters())["blocks.0.q.weight"].shape[0] == 3 * 8
    assert fxprune.verify(model, result, ids).max_rel_err < 1e-4


def test_unknown_policy_is_a_config_error():
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(fxprune.ConfigError, match="policy='rows'"):
        fxprune.prune(Bert(), ids, policy="rows")
    with pytest.raises(fxprune.ConfigError, match="two stages"):
        fxprune.analyze(Bert(), ids, policy="both")


@pytest.mark.parametrize("gqa", ["kv_groups", "q_heads"])
def test_gqa_modes_remove_kv_groups_or_query_heads_in_every_group(gqa):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 8))
    result, v = prune_and_verify(Llama(), ids, ratio=0.5, policy="heads", gqa=gqa, healthy=False)
    p = dict(result.module.named_parameters())
    q, k, val = (p[f"layers.0.{n}_proj.weight"].shape[0] for n in ("q", "k", "v"))
    assert q == 16  # 4 query heads of 8 -> 2
    if gqa == "kv_groups":  # one of the 2 kv heads went, with its 2 query heads
        assert (k, val) == (8, 8)
    else:  # both kv heads stay; each keeps 1 of its 2 query heads
        assert (k, val) == (16, 16)
    with pytest.raises(fxprune.ConfigError, match="gqa='rows'"):
        fxprune.analyze(Llama(), ids, gqa="rows")


class BiasedSdpa(nn.Module):
    """SDPA whose float mask is a per-head bias (ALiBi: a slope per head times the token
    distance), built through ops with rules, or through one without (heads must stay)."""

    def __init__(self, opaque):
        super().__init__()
        self.opaque = opaque
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)
        self.slopes = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
        pos = torch.arange(n, dtype=x.dtype)
        distance = -(pos[None, :] - pos[:, None]).abs()
        mask = (self.slopes[:, None, None] * distance).unsqueeze(0)
        if self.opaque:
            mask = torch.diff(mask, dim=-1, prepend=mask[..., :1])  # no rule: heads pinned
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, 16))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_per_head_attention_mask_goes_with_the_heads(frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    result, v = prune_and_verify(BiasedSdpa(False), x, ratio=0.5, policy="heads", frontend=frontend,
                                 healthy=False)
    assert dict(result.module.named_parameters())["slopes"].shape == (2,)  # 2 of 4 heads
    opaque = fxprune.analyze(BiasedSdpa(True), x, policy="heads", frontend=frontend)
    heads = [g for g in opaque.groups if any(m.path == "qkv.weight" for m in g.members)]
    assert not any(g.prunable for g in heads)  # heads kept with the opaque mask, not broken
    result, v = prune_and_verify(BiasedSdpa(True), x, ratio=0.5, frontend=frontend, healthy=False)


class ShapeReadingAttention(nn.Module):
    """timm-style attention that reads its sizes off the input: ``x.shape[:2]`` (a slice
    of the size tuple) and ``x.shape[-1]`` (a negative index), then ``C // heads``."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.out = nn.Linear(8, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 5)

    def forward(self, x):
        x = self.inp(x)
        B, N = x.shape[:2]
        C = x.shape[-1]
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.out(self.proj(y))


@pytest.mark.parametrize("policy", ["heads", "head_dim", "outer"])
def test_sizes_read_by_slice_and_negative_index_are_rewritten(policy):
    torch.manual_seed(0)
    m = ShapeReadingAttention().eval()
    result, _ = prune_and_verify(m, torch.randn(2, 6, 8), ratio=0.5, policy=policy)
    # the kept head_dim (heads policy) or hidden size is a constant in the pruned code,
    # not recomputed from the pruned x.shape[-1] with the old head count
    assert result.module(torch.randn(3, 7, 8)).shape == (3, 7, 5)
    assert result.groups.channel_sized, "x.shape[-1] // heads was not tracked as a channel count"
    assert "//" not in result.module.code  # the size arithmetic it replaced is not left behind


class AlibiScores(nn.Module):
    """BLOOM-style scores: ``bias.baddbmm(q, k, alpha=...)`` with a per-(batch x head)
    constant bias, batch1/batch2 passed by keyword or by position."""

    def __init__(self, d=16, heads=4, by_keyword=True):
        super().__init__()
        self.heads, self.by_keyword = heads, by_keyword
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        hd = D // self.heads
        q = self.q(x).view(B, L, self.heads, hd).transpose(1, 2).reshape(B * self.heads, L, hd)
        k = self.k(x).view(B, L, self.heads, hd).permute(0, 2, 3, 1).reshape(B * self.heads, hd, L)
        v = self.v(x).view(B, L, self.heads, hd).transpose(1, 2).reshape(B * self.heads, L, hd)
        bias = torch.arange(L, dtype=x.dtype).expand(B * self.heads, 1, L)
        if self.by_keyword:
            scores = bias.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=0.5)
        else:
            scores = torch.baddbmm(bias, q, k, alpha=0.5)
        y = torch.bmm(scores.softmax(-1), v).view(B, self.heads, L, hd).transpose(1, 2).reshape(B, L, D)
        return self.o(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("by_keyword", [True, False])
def test_baddbmm_scores_prune_head_dim_exactly(by_keyword, frontend):
    torch.manual_seed(0)
    m = AlibiScores(by_keyword=by_keyword).eval()
    result, _ = prune_and_verify(m, torch.randn(2, 5, 16), ratio=0.5, policy="head_dim", frontend=frontend)
    assert not result.groups.barriers
    # q and k channels meet in the contraction: the oracle zeroes them there, by keyword too
    assert any(n.startswith("baddbmm") for n, _ in result.groups.consumers)
    # the bias spans batch x heads as a constant made in forward, so whole heads cannot
    # go, and the group says so (it used to vanish into the constants without a word)
    groups = fxprune.analyze(m, torch.randn(2, 5, 16), policy="heads", frontend=frontend)
    heads = groups.group_of("q.weight" if frontend == "fx" else next(
        a.path for a in groups.alignments if a.role == "out" and a.path.startswith("q")))
    assert heads is not None and not heads.prunable
    assert any("carries no prunable channel" in r for r in heads.pinned_reasons)


class _RotaryAttention(nn.Module):
    """q, k, v, o projections around SDPA, with an interleaved rotary embedding
    (``stack([-x[..., 1::2], x[..., ::2]], -1)`` pairs channel 2i with 2i + 1) whose sin
    and cos come from ``sin_cos``."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(8, d) for _ in range(3))
        self.o = nn.Linear(d, 4)

    @staticmethod
    def rotate(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        sin, cos = self.sin_cos(L, x.dtype)
        q = q * cos + self.rotate(q) * sin
        k = k * cos + self.rotate(k) * sin
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class InterleavedRotary(_RotaryAttention):
    """EVA02 / GPT-J style rotary; the frequencies are a buffer, as in the real models."""

    def __init__(self, d=16, heads=2):
        super().__init__(d, heads)
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, d // heads // 2).repeat_interleave(2))

    def sin_cos(self, length, dtype):
        angle = torch.arange(length, dtype=dtype)[:, None] * self.freqs
        return angle.sin(), angle.cos()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_interleaved_rotary_prunes_channel_pairs(frontend):
    torch.manual_seed(0)
    m = InterleavedRotary().eval()
    result, _ = prune_and_verify(m, torch.randn(2, 5, 8), ratio=0.5, frontend=frontend, policy="head_dim")
    assert not result.groups.barriers
    p = dict(result.module.named_parameters())
    assert p["q.weight"].shape[0] == 8 and p["k.weight"].shape[0] == 8  # q, k pruned, in pairs
    # every kept pair is whole: the frequency buffer keeps both entries of each pair
    freqs = dict(result.module.named_buffers())["freqs"]
    assert torch.equal(freqs[0::2], freqs[1::2])


def test_strided_slice_that_stops_early_pins_its_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x)[..., 1:7:2])

    groups = fxprune.analyze(Net(), torch.randn(2, 4))
    assert any("strided slice of a channel dim" in r for g in groups for r in g.pinned_reasons)
    prune_and_verify(Net().eval(), torch.randn(2, 4), ratio=0.5, expect_removed=False)


class RotaryTable(_RotaryAttention):
    """EVA02-style rotary: one (tokens, 2 x head_dim) sin|cos buffer, chunked in forward.
    The chunks have more positions than channels; they must not decide that their
    positions are the channel dim before they meet q."""

    def __init__(self, d=16, heads=2, tokens=12):  # more tokens than head_dim channels
        super().__init__(d, heads)
        angle = torch.arange(tokens)[:, None] * torch.linspace(0.1, 1.0, d // heads // 2).repeat_interleave(2)
        self.register_buffer("table", torch.cat([angle.sin(), angle.cos()], -1))

    def sin_cos(self, length, dtype):
        return self.table.chunk(2, -1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_chunked_rotary_table_keeps_channels_prunable(frontend):
    torch.manual_seed(0)
    m = RotaryTable().eval()
    result, _ = prune_and_verify(m, torch.randn(2, 12, 8), ratio=0.5, frontend=frontend, policy="head_dim")
    p = dict(result.module.named_parameters())
    assert p["q.weight"].shape[0] == 8  # q and k lose half their channels, in pairs
    table = dict(result.module.named_buffers())["table"]
    assert table.shape == (12, 8)  # the sin and cos halves both follow the kept channels


class PositionTable(nn.Module):
    """Tokens plus a learned position table, stored (1, positions, dim) or transposed."""

    def __init__(self, transposed=False):
        super().__init__()
        self.proj, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(8, 50) if transposed else torch.randn(1, 50, 8))
        self.transposed = transposed

    def forward(self, x):
        return self.head(F.relu(self.proj(x) + (self.pos.t() if self.transposed else self.pos)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_large_position_table_prunes_along_its_last_dim(frontend, monkeypatch):
    """A table over the per-element label limit is labelled along its last dim only (a
    Gemma/Qwen vision tower's position table has millions of entries): stored
    (1, positions, dim), it prunes with the stream; transposed, its shared labels keep the
    channels it meets whole, and nothing is sliced wrong."""
    import fxprune.rules.context as context

    monkeypatch.setattr(context, "MAX_FREE_LABELS", 64)  # the tables hold 400 entries
    torch.manual_seed(0)
    x = torch.randn(2, 50, 6)
    result, _ = prune_and_verify(PositionTable().eval(), x, ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    assert dict(result.module.named_parameters())["pos"].shape == (1, 50, 4)
    result, _ = prune_and_verify(PositionTable(transposed=True).eval(), x, ratio=0.5, frontend=frontend,
                                 expect_removed=False)
    assert not result.groups.barriers
    assert dict(result.module.named_parameters())["pos"].shape == (8, 50)
