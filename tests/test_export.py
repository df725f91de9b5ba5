"""The torch.export front end: ATen-level graphs analysed by the same rules as
symbolic traces (same channel groups), the fallback when tracing fails, in-place
and slice/select/addmm ops, and saving an exported result."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from fxprune.errors import InputError, TraceError
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import prune_and_verify


def _structure(groups):
    return sorted((g.size, len(g.prunable), g.exact) for g in groups.groups)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "convnext_tiny"])
def test_export_graph_has_the_same_groups_as_the_trace(name):
    """Both dialects of one model give the same channel groups, and the ATen result is exact."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(1, 3, 64, 64)
    make_healthy(model, x.shape)
    fx_groups = fxprune.analyze(model, x, frontend="fx")
    ex_groups = fxprune.analyze(model, x, frontend="export")
    assert ex_groups.frontend == "export" and fx_groups.frontend == "fx"
    assert _structure(ex_groups) == _structure(fx_groups)
    assert not ex_groups.barriers  # every ATen op of these models has a rule
    result, v = prune_and_verify(model, x, ratio=0.5, frontend="export", healthy=False)
    assert result.frontend == "export"
    assert result.report.after.macs < 0.6 * result.report.before.macs


class ShapeBranch(nn.Module):
    """Python that branches on a size: symbolic tracing cannot follow it, export can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if y.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        return self.b(y)


def test_auto_front_end_falls_back_to_export():
    torch.manual_seed(0)
    model = ShapeBranch()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TraceError):
        fxprune.trace(model, x, frontend="fx")
    result, v = prune_and_verify(model, x, ratio=0.5)
    assert result.frontend == "export"
    assert result.module.get_parameter("a.weight").shape[0] == 8
    assert "front end: export" in str(result.groups)


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_when_both_front_ends_fail_the_error_names_both():
    with pytest.raises(TraceError, match="torch.export fallback failed too") as err:
        fxprune.analyze(DataDependent(), torch.randn(2, 3))
    assert "prune a traceable submodule (model.backbone" in str(err.value)  # the way out


def test_unknown_front_end_is_an_input_error():
    with pytest.raises(InputError, match="frontend='jit'"):
        fxprune.analyze(ShapeBranch(), torch.randn(1, 3, 8, 8), frontend="jit")


class ChannelSlices(nn.Module):
    """A channel slice (aten.slice), an integer index on a spatial dim (aten.select) and
    an addmm with a parameter weight stored (in, out)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(12, 6, 1)
        self.w = nn.Parameter(torch.randn(6, 10) * 0.3)
        self.bias = nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x):
        y = torch.relu(self.a(x))[:, 2:14]
        z = self.b(y)[:, :, 0]  # (N, 6, W)
        z = z.mean(-1)
        return torch.addmm(self.bias, z, self.w)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_slice_select_and_addmm_rules(frontend):
    torch.manual_seed(0)
    model = ChannelSlices()
    x = torch.randn(2, 3, 5, 5)
    result, v = prune_and_verify(model, x, ratio=0.5, frontend=frontend, healthy=False)
    p = dict(result.module.named_parameters())
    kept_in = p["b.weight"].shape[1]
    assert p["b.weight"].shape[0] == 3 and kept_in < 12  # the slice's channels were pruned
    assert p["a.weight"].shape[0] >= kept_in  # the slice bounds moved with the kept channels
    assert p["w"].shape == (3, 10)  # addmm's weight rows follow b's channels


def test_exported_result_saves_and_loads_with_its_output_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    result = fxprune.prune(model, ids, ratio=0.5)
    assert fxprune.verify(model, result, ids).max_rel_err < 1e-4
    fxprune.save(result, tmp_path / "gpt2")
    loaded = fxprune.load(tmp_path / "gpt2")
    with torch.no_grad():
        want, got = result.module(ids), loaded(ids)
    assert type(got) is type(want)
    assert torch.equal(got.logits, want.logits)


class RelBiasAttention(nn.Module):
    """Swin-style window attention: fused qkv reshaped to (3, heads, head_dim) and
    unpacked by index, a relative-position bias table gathered by a buffer of indices,
    a computed qkv bias (Swin v2) and a roll along the token dim."""

    def __init__(self, dim=32, heads=4, window=3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.3)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.3)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        rel = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = (attn + rel.unsqueeze(0)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out) + torch.roll(x, shifts=1, dims=1)


@pytest.mark.parametrize("policy", ["inner", "outer"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_window_attention_with_gathered_bias_prunes_heads(frontend, policy):
    torch.manual_seed(0)
    model = RelBiasAttention()
    x = torch.randn(2, 9, 32)
    groups = fxprune.analyze(model, x, frontend=frontend, policy=policy)
    assert not groups.barriers, groups.barriers
    result, v = prune_and_verify(model, x, ratio=0.5, frontend=frontend, policy=policy, healthy=False)
    p = dict(result.module.named_parameters())
    q_bias, table = p["q_bias"].shape[0], p["table"].shape[1]
    if policy == "outer":  # whole heads: the bias table loses the removed heads' columns
        assert table == 2 and q_bias == 2 * 8
    else:  # head_dim: every head stays, the table too
        assert table == 4 and q_bias % 4 == 0 and q_bias < 32
    assert p["v_bias"].shape[0] < 32


class MaskFromPositions(nn.Module):
    """An op with no rule (torch.diff) on position ids only, and on features."""

    def __init__(self, on_features):
        super().__init__()
        self.on_features = on_features
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        step = torch.diff(pos, prepend=pos[:1])  # no rule, but only constants go in
        h = torch.relu(self.a(x)) * step[None, :, None]
        if self.on_features:
            h = torch.diff(h, dim=1, prepend=h[:, :1])  # no rule, channels go in: pinned
        return self.b(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_op_without_rule_on_constants_is_not_a_barrier(frontend):
    x = torch.randn(2, 5, 6)
    quiet = fxprune.analyze(MaskFromPositions(False), x, frontend=frontend)
    assert not quiet.barriers and quiet.group_of("a.weight").prunable
    loud = fxprune.analyze(MaskFromPositions(True), x, frontend=frontend)
    assert any("diff" in b for b in loud.barriers)
    assert not loud.group_of("a.weight").prunable  # its channels met an op with no rule


class ModeBlocks(nn.Module):
    """``with`` blocks inside forward: autocast off around an fp32 computation (EfficientViT's
    attention), grad mode set around a gate (capture runs under no_grad, so enable_grad is
    the block it records), one nested in the other. Export hands each block over as a
    higher-order op running a subgraph."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        with torch.autocast(device_type="cpu", enabled=False):
            h = F.relu(h.float()) * 2
        with torch.enable_grad():
            gate = torch.sigmoid(self.b(x))
            with torch.autocast(device_type="cpu", enabled=False):
                gate = gate.float() * 0.5
        return self.out(h * gate)


def test_mode_blocks_are_analysed_op_by_op():
    """The blocks' ops are inlined between calls that enter and leave the mode: no barrier,
    a and b prune together (multiplied), and the pruned model still runs the blocks."""
    torch.manual_seed(0)
    model, x = ModeBlocks().eval(), torch.randn(2, 8)
    groups = fxprune.analyze(model, x, frontend="export")
    assert not groups.barriers
    assert groups.group_of("a.weight") is groups.group_of("b.weight")
    result, _ = prune_and_verify(model, x, ratio=0.5, frontend="export")
    code = result.module.code
    assert "_enter_autocast" in code and "_exit_autocast" in code and "_set_grad_enabled" in code
    assert "higher_order" not in code
    assert dict(result.module.named_parameters())["b.weight"].shape == (8, 8)
    assert torch.is_grad_enabled()  # the graph restored the mode it found
