"""Property tests: hypothesis builds attention blocks (random heads, head_dim,
kv groups, fused or separate projections, explicit, SDPA or linear (kernelized:
k^T v crosses two operands' channels) attention, rotary or not); for each, pruning by head_dim and by whole heads satisfies the oracle on
exact groups, the graph lints and the generated code runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from oracle import prune_and_verify


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim, kind, fused, rotary, residual_norm):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.fused, self.kind, self.rotary, self.residual_norm = fused, kind, rotary, residual_norm
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        if fused:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out)
        else:
            self.q, self.k, self.v = nn.Linear(dim, q_out), nn.Linear(dim, kv_out), nn.Linear(dim, kv_out)
        self.o = nn.Linear(q_out, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = head_dim ** -0.5
        self.register_buffer("freq", torch.rand(head_dim // 2) + 0.1)

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, n, self.h, self.d).transpose(1, 2)
        k = k.view(b, n, self.kv, self.d).transpose(1, 2)
        v = v.view(b, n, self.kv, self.d).transpose(1, 2)
        if self.rotary:
            ang = torch.outer(torch.arange(n, dtype=torch.float32), self.freq)
            ang = torch.cat((ang, ang), dim=-1)
            q = q * ang.cos() + rotate_half(q) * ang.sin()
            k = k * ang.cos() + rotate_half(k) * ang.sin()
        r = self.h // self.kv
        if r > 1:
            k = k[:, :, None].expand(b, self.kv, r, n, self.d).reshape(b, self.h, n, self.d)
            v = v[:, :, None].expand(b, self.kv, r, n, self.d).reshape(b, self.h, n, self.d)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.kind == "linear":  # elu + 1 feature maps (Katharopoulos et al.)
            fq, fk = F.elu(q) + 1, F.elu(k) + 1
            kv = torch.einsum("bhnd,bhne->bhde", fk, v)
            z = 1 / (torch.einsum("bhnd,bhd->bhn", fq, fk.sum(2)) + 1e-6)
            y = torch.einsum("bhnd,bhde,bhn->bhne", fq, kv, z)
        else:
            y = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1) @ v
        y = self.o(y.transpose(1, 2).reshape(b, n, self.h * self.d))
        return self.norm(x + y) if self.residual_norm else x + y


class Net(nn.Module):
    def __init__(self, dim, block):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(6, dim), block, nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))


@st.composite
def blocks(draw):
    kv = draw(st.sampled_from([1, 2, 3]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    dim = draw(st.sampled_from([8, 12]))
    kind = draw(st.sampled_from(["explicit", "sdpa", "linear"]))
    flags = [draw(st.booleans()) for _ in range(3)]
    return dim, Block(dim, heads, kv, head_dim, kind, *flags)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(spec=blocks(), policy=st.sampled_from(["inner", "outer", "both"]),
       gqa=st.sampled_from(["kv_groups", "q_heads"]), seed=st.integers(0, 2**16))
def test_random_attention_blocks_prune_exactly(spec, policy, gqa, seed):
    dim, block = spec
    assume(policy != "both" or block.h > 1)  # "both" needs heads to remove
    torch.manual_seed(seed)
    model = Net(dim, block).eval()
    x = torch.randn(2, 5, 6)
    result, v = prune_and_verify(model, x, ratio=0.5, policy=policy, gqa=gqa, healthy=False,
                                 min_effect=0.0, expect_removed=False)
    with torch.no_grad():
        assert result.module(x).shape == (2, 5, 3)
    assert v.max_rel_err < 1e-4
    removed = sum(s.plan.n_removed for s in result.stages) if result.stages else result.plan.n_removed
    assert removed > 0 and result.report.after.params < result.report.before.params
