"""Conv and linear rules, both dialects, each checked by the oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify


def seq(*layers):
    return nn.Sequential(*layers)


class FunctionalConv(nn.Module):
    """F.conv2d / F.linear with weights reached through get_attr."""

    def __init__(self, groups=1):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8 // groups, 3, 3) * 0.3)
        self.groups = groups
        self.w3 = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, None, 1, 1, 1, self.groups))
        return F.linear(x.mean((2, 3)), self.w3)


CASES = {
    "conv1d": (lambda: seq(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 6, 3), nn.ReLU(), nn.Conv1d(6, 4, 1)),
               (2, 3, 16)),
    "conv2d": (lambda: seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)),
               (2, 3, 12, 12)),
    "conv3d": (lambda: seq(nn.Conv3d(2, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 1)), (1, 2, 6, 6, 6)),
    "grouped": (lambda: seq(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4, padding=1),
                            nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)), (2, 3, 8, 8)),
    "depthwise": (lambda: seq(nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
                              nn.Conv2d(12, 12, 3, groups=12, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                              nn.Conv2d(12, 4, 1)), (2, 3, 8, 8)),
    "depthwise_mult2": (lambda: seq(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=8, padding=1),
                                    nn.ReLU(), nn.Conv2d(16, 4, 1)), (2, 3, 8, 8)),
    "conv_transpose": (lambda: seq(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
                                   nn.ConvTranspose2d(8, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 4, 1)),
                       (2, 3, 9, 9)),
    "conv_transpose_grouped": (lambda: seq(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
                                           nn.ReLU(), nn.Conv2d(8, 4, 1)), (2, 3, 5, 5)),
    "conv_transpose1d": (lambda: seq(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.ConvTranspose1d(8, 6, 3), nn.ReLU(),
                                     nn.Conv1d(6, 2, 1)), (2, 3, 10)),
    "linear": (lambda: seq(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)), (4, 6)),
    "linear_tokens": (lambda: seq(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)), (2, 5, 6)),
    "functional": (lambda: FunctionalConv(), (2, 3, 8, 8)),
    "functional_grouped": (lambda: FunctionalConv(groups=2), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_prune_matches_oracle(name):
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = make()
    prune_and_verify(model, torch.randn(shape), ratio=0.5)


def test_group_structure_of_a_chain():
    net = seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    groups = fxprune.analyze(net, torch.randn(1, 3, 12, 12))
    assert [g.size for g in groups.prunable] == [8, 6]
    first = groups.prunable[0]
    paths = {m.path for m in first.members}
    assert paths == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight"}
    assert all(g.exact for g in groups.prunable)
    out_group = groups.group_of("5.weight", "out")
    assert out_group is not None and not out_group.is_prunable  # the model output is pinned


def test_grouped_conv_keeps_equal_group_widths():
    torch.manual_seed(0)
    net = CASES["grouped"][0]()
    result, _ = prune_and_verify(net, torch.randn(2, 3, 8, 8), ratio=0.5)
    conv = result.module.get_submodule("2")
    assert conv.groups == 4
    assert conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels == 8 and conv.out_channels == 8


def test_depthwise_groups_follow_channels():
    torch.manual_seed(0)
    result, _ = prune_and_verify(CASES["depthwise"][0](), torch.randn(2, 3, 8, 8), ratio=0.5)
    dw = result.module.get_submodule("3")
    assert dw.groups == dw.in_channels == dw.out_channels == 6


class FunctionalDepthwise(nn.Module):
    """A functional depthwise conv, its group count a constant or read from the input's shape."""

    def __init__(self, c, by_shape=False):
        super().__init__()
        self.c, self.by_shape = c, by_shape
        self.pw = nn.Conv2d(3, c, 1)
        self.w = nn.Parameter(torch.randn(c, 1, 3, 3))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        y = F.relu(self.pw(x))
        return self.head(F.relu(F.conv2d(y, self.w, None, 1, 1, 1, y.shape[1] if self.by_shape else self.c)))


def test_functional_depthwise_groups_argument_is_rewritten():
    torch.manual_seed(0)
    result, _ = prune_and_verify(FunctionalDepthwise(8), torch.randn(2, 3, 6, 6), ratio=0.5)
    assert "groups = 4" in result.module.code or ", 4)" in result.module.code
    assert result.module.w.shape == (4, 1, 3, 3)


def test_linear_attributes_are_updated():
    torch.manual_seed(0)
    result, _ = prune_and_verify(CASES["linear"][0](), torch.randn(4, 6), ratio=0.5)
    l0, l2 = result.module.get_submodule("0"), result.module.get_submodule("2")
    assert (l0.in_features, l0.out_features) == (6, 8)
    assert (l2.in_features, l2.out_features) == (8, 6)
    assert l2.weight.shape == (6, 8)


def _hooked(kind):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                      nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    if kind == "spectral_norm":
        torch.nn.utils.parametrizations.spectral_norm(m[2])
    elif kind == "prune_mask":
        torch.nn.utils.prune.l1_unstructured(m[2], "weight", amount=0.3)
    else:
        m[2].register_forward_hook(lambda mod, args, out: out * 2)
    return m.eval()


@pytest.mark.parametrize("kind", ["spectral_norm", "forward_hook", "prune_mask"])  # weight norm: test_weight_norm.py
def test_modules_with_parametrizations_or_hooks_are_kept_and_say_why(kind):
    m = _hooked(kind)
    result, _ = prune_and_verify(m, torch.randn(1, 3, 12, 12), ratio=0.5)
    reason = " ".join(result.groups.barriers)
    assert ("parametrized" if kind == "spectral_norm" else "forward hooks") in reason
    # torch.nn.utils.prune's mask hook gets the call that folds it
    assert ("torch.nn.utils.prune.remove(module, 'weight')" in reason) == (kind == "prune_mask")
    assert "2" in reason
    # the module's own channels (inputs and outputs) stay; the free conv pair is pruned
    assert result.module.get_submodule("2").weight.shape[:2] == (8, 8)
    assert result.module.get_submodule("4").out_channels == 4


class HandLinear(nn.Module):
    """A linear layer written by hand (Falcon's FalconLinear: ``x @ self.weight.T + b``)."""

    def __init__(self, i, o, how):
        super().__init__()
        self.how = how
        shape = (i, o) if how == "plain" else (o, i)  # plain: x @ W with W stored (in, out)
        self.weight = nn.Parameter(torch.randn(shape) / i ** 0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        if self.how == "T":
            return x @ self.weight.T + self.bias
        if self.how == "t":
            return torch.matmul(x, self.weight.t()) + self.bias
        if self.how == "transpose":
            return x.matmul(self.weight.transpose(0, 1)) + self.bias
        return x @ self.weight + self.bias


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("how", ["T", "t", "transpose", "plain"])
def test_hand_written_linear_layers_prune_like_linear(how, frontend):
    torch.manual_seed(0)
    m = nn.Sequential(HandLinear(8, 16, how), nn.ReLU(), HandLinear(16, 12, how), nn.ReLU(), HandLinear(12, 3, how))
    result, _ = prune_and_verify(m.eval(), torch.randn(4, 5, 8), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    shapes = {k: tuple(p.shape) for k, p in result.module.named_parameters()}
    rows_cols = (lambda s: s[::-1]) if how == "plain" else (lambda s: s)
    # the weight matrix is sliced by rows and columns, like nn.Linear's
    assert rows_cols(shapes["2.weight"]) == (6, 8) and shapes["2.bias"] == (6,)
    assert rows_cols(shapes["4.weight"]) == (3, 6)


class TiedAutoencoder(nn.Module):
    """The decoder is the encoder's weight transposed, through F.linear (with its own
    bias, or none)."""

    def __init__(self, bias):
        super().__init__()
        self.enc, self.mid = nn.Linear(20, 12), nn.Linear(12, 12)
        self.dec_bias = nn.Parameter(torch.randn(20) * 0.1) if bias else None

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.enc(x))))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_a_transposed_tied_weight_consumes_its_rows(bias, frontend):
    """F.linear(h, enc.weight.t()) reads the encoder's rows as its input features: they
    couple with h's channels (the pruned model failed to run: the rows were sliced, h was
    not); its output features are the encoder's inputs, kept."""
    torch.manual_seed(0)
    result, _ = prune_and_verify(TiedAutoencoder(bias).eval(), torch.randn(4, 20), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    shapes = {k: tuple(p.shape) for k, p in result.module.named_parameters()}
    assert shapes["enc.weight"] == (6, 20) and shapes["mid.weight"] == (6, 6)


class StdConv(nn.Conv2d):
    """timm's StdConv2d / NFNet's ScaledStdConv2d: the weight standardized per output
    channel over its fan-in in forward, optionally times a per-channel gain."""

    def __init__(self, *args, gain=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5) if gain else None

    def forward(self, x):
        scale = (self.gain * 0.7).view(-1) if self.gain is not None else None
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=scale,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("gain", [False, True])
def test_standardized_weights_prune_rows_exactly_and_inputs_inexactly(gain, frontend):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), StdConv(8, 16, 3, padding=1, gain=gain), nn.ReLU(),
                      StdConv(16, 16, 3, padding=1, groups=4, gain=gain), nn.ReLU(),
                      StdConv(16, 16, 3, padding=1, groups=16, gain=gain), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    result, v = prune_and_verify(m, torch.randn(2, 3, 8, 8), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers
    p = dict(result.module.named_parameters())
    assert p["2.weight"].shape == (8, 4, 3, 3) and p["4.weight"].shape == (8, 2, 3, 3)
    if gain:
        assert p["2.gain"].shape == (8, 1, 1, 1)
    # the standardization mixes a conv's input channels: those groups are inexact, and
    # the one feeding the plain last conv is checked exactly
    assert v.inexact_groups >= 2 and v.exact_groups >= 1


class MovedRows(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, (self.weight * 2).transpose(0, 1), self.bias)


def test_computed_weight_whose_rows_move_is_refused_with_a_reason():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), MovedRows(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    groups = fxprune.analyze(m, torch.randn(2, 3, 8, 8))
    assert any("rows are not 2.weight's rows in order" in b for b in groups.barriers)
    prune_and_verify(m, torch.randn(2, 3, 8, 8), ratio=0.5, expect_removed=False)


class AlongChannels(nn.Module):
    """A Conv1d whose length dim carries channels: CoaT's aggregate (stack three (B, C)
    vectors into (B, 3, C), Conv1d(3, 1, 1)) or ECA's gate (Conv1d(1, 1, 3) along C)."""

    def __init__(self, eca=False):
        super().__init__()
        self.eca = eca
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(5, 8)
        self.mix = nn.Conv1d(1, 1, 3, padding=1) if eca else nn.Conv1d(3, 1, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        if self.eca:
            h = self.a(x)
            return self.head(h * torch.sigmoid(self.mix(h.unsqueeze(1)).squeeze(1)))
        y = torch.stack([self.a(x), self.b(x), self.c(x)], dim=1)
        return self.head(self.mix(y).squeeze(1))


def test_position_wise_conv_along_channels_keeps_them_prunable():
    torch.manual_seed(0)
    result, _ = prune_and_verify(AlongChannels().eval(), torch.randn(4, 5), ratio=0.5)
    p = dict(result.module.named_parameters())
    # the three stacked vectors are coupled channel by channel and pruned together
    assert p["a.weight"].shape[0] == p["b.weight"].shape[0] == p["c.weight"].shape[0] == 4
    assert p["mix.weight"].shape == (1, 3, 1)


def test_conv_sliding_along_channels_pins_them_with_a_reason():
    groups = fxprune.analyze(AlongChannels(eca=True).eval(), torch.randn(4, 5))
    # the gated features meet the gate's constant positions: they are listed with the
    # constants, with the reason; the columns reading the model input are not listed
    assert any("slides along a dim that carries channels" in r for r in groups.constant_reasons)
    kept = {(m.path, m.role) for m in groups.constant_members}
    assert ("a.weight", "out") in kept and ("head.weight", "in") in kept and ("a.weight", "in") not in kept
    assert not any("a.weight" in str(m) for g in groups.prunable for m in g.members)
    prune_and_verify(AlongChannels(eca=True).eval(), torch.randn(4, 5), ratio=0.5, expect_removed=False)


class ConvOverFeatures(nn.Module):
    """A Conv1d(1, 8, 3) that reads a linear layer's 16 features as a length-16 signal."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.out = nn.Linear(6, 16), nn.Conv1d(1, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(F.relu(self.c(self.a(x).unsqueeze(1))).mean(-1))


def test_conv_sliding_along_channels_keeps_its_own_outputs_prunable():
    # the features it slides over are pinned; its own 8 output channels were made constants
    torch.manual_seed(0)
    groups = fxprune.analyze(ConvOverFeatures().eval(), torch.randn(4, 6))
    [pinned] = [g for g in groups if any("a.weight" in str(m) for m in g.members)]
    assert not pinned.is_prunable and any("slides along" in r for r in pinned.pinned_reasons)
    result, _ = prune_and_verify(ConvOverFeatures().eval(), torch.randn(4, 6), ratio=0.5)
    p = dict(result.module.named_parameters())
    assert p["a.weight"].shape == (16, 6) and p["c.weight"].shape == (4, 1, 3) and p["out.weight"].shape == (2, 4)


def test_unbatched_conv_input_prunes_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 1)).eval()
    result, _ = prune_and_verify(m, torch.randn(3, 10), ratio=0.5)  # (C, L): no batch dim
    assert result.module.get_submodule("0").out_channels == 4


def test_group_count_computed_in_forward_follows_the_channels():
    # the rewrite compared the group count with ints; computed, it is a graph node
    import copy

    torch.manual_seed(0)
    model, x = FunctionalDepthwise(16, by_shape=True), torch.randn(2, 3, 8, 8)
    result, _ = prune_and_verify(model, x, ratio=0.5)
    assert tuple(result.module.w.shape) == (8, 1, 3, 3)
    # the group's channel count is used as a value, so it is reported inexact: check the
    # values here against the original with the removed channels zeroed
    kept = [i for i in range(16) if any(torch.equal(result.module.w[j], model.w[i]) for j in range(8))]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        drop = [i for i in range(16) if i not in kept]
        ref.pw.weight[drop] = 0
        ref.pw.bias[drop] = 0
        assert len(kept) == 8 and torch.allclose(result.module(x), ref(x), atol=1e-5)
        assert not torch.allclose(model(x), ref(x), atol=1e-3)


class Deformable(nn.Module):
    """DCN (v1) and DCNv2 (with a modulation mask): offsets (and the mask) predicted by
    convs from the features the deformable conv samples."""

    def __init__(self, modulated, bias, offset_groups):
        super().__init__()
        import torchvision

        self.modulated = modulated
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.off = nn.Conv2d(16, 2 * offset_groups * 9, 3, padding=1)
        self.msk = nn.Conv2d(16, offset_groups * 9, 3, padding=1)
        self.dcn = torchvision.ops.DeformConv2d(16, 24, 3, padding=1, bias=bias, groups=2)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        f = F.relu(self.stem(x))
        mask = torch.sigmoid(self.msk(f)) if self.modulated else None
        return self.head(F.relu(self.dcn(f, self.off(f), mask)).mean((2, 3)))


@pytest.mark.parametrize("modulated,bias,offset_groups", [(False, True, 1), (True, False, 2)])
def test_deformable_conv_prunes_its_input_and_output_channels(modulated, bias, offset_groups):
    torch.manual_seed(0)
    model = Deformable(modulated, bias, offset_groups).eval()
    result, _ = prune_and_verify(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert not result.groups.barriers
    shapes = {k: tuple(p.shape) for k, p in result.module.named_parameters()}
    assert shapes["dcn.weight"] == (12, 4, 3, 3) and shapes["stem.weight"][0] == 8
    assert shapes["off.weight"][0] == 2 * offset_groups * 9  # offsets are kernel positions: kept
    assert any("kernel positions" in r for r in result.groups.group_of("off.weight").pinned_reasons)


class MaskedConv(nn.Conv2d):
    """PixelCNN's masked convolution: the weight times a fixed causal mask of its shape."""

    def __init__(self, kind, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        kh, kw = self.kernel_size
        mask[:, :, kh // 2, kw // 2 + (kind == "B"):] = 0
        mask[:, :, kh // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_mask_of_the_weights_shape_is_sliced_with_it(frontend):
    """weight * mask is elementwise: the mask buffer loses the weight's rows and columns
    and the groups stay exact (the mask made the weight 'computed from two tensors of its
    shape', which was refused: every channel kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv("A", 1, 16, 5, padding=2), nn.ReLU(), MaskedConv("B", 16, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    result, v = prune_and_verify(model, torch.randn(2, 1, 8, 8), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers and v.exact_groups == 2
    buffers = dict(result.module.named_buffers())
    assert tuple(buffers["2.mask"].shape) == (8, 8, 3, 3) and tuple(buffers["0.mask"].shape) == (8, 1, 5, 5)


class MaskedLinear(nn.Linear):
    """MADE's masked layer (autoregressive flows): F.linear with ``mask * weight``."""

    def __init__(self, mask):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.mask * self.weight, self.bias)


class StdLinear(nn.Linear):
    """A linear layer with its weight standardized over the inputs in forward."""

    def forward(self, x):
        w = self.weight
        return F.linear(x, (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5), self.bias)


def _made(d=6, h=16):
    g = torch.Generator().manual_seed(1)
    deg_in, deg_1, deg_2 = torch.arange(1, d + 1), torch.randint(1, d, (h,), generator=g), torch.randint(1, d, (h,), generator=g)
    return nn.Sequential(MaskedLinear((deg_1[:, None] >= deg_in).float()), nn.ReLU(),
                         MaskedLinear((deg_2[:, None] >= deg_1).float()), nn.ReLU(),
                         MaskedLinear((deg_in[:, None] > deg_2).float()))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_linear_weights_computed_in_forward_prune_like_conv_weights(frontend):
    """F.linear's weight computed from its parameter (a mask buffer times it, or a
    standardization) was refused ("the weight must be a parameter"): every channel kept.
    The mask is sliced with the weight and the groups stay exact; a standardized weight's
    inputs are inexact."""
    torch.manual_seed(0)
    result, v = prune_and_verify(_made().eval(), torch.randn(4, 6), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers and v.exact_groups == 2
    buffers = dict(result.module.named_buffers())
    assert tuple(buffers["0.mask"].shape) == (8, 6) and tuple(buffers["2.mask"].shape) == (8, 8)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), StdLinear(16, 12), nn.ReLU(), nn.Linear(12, 2)).eval()
    groups = fxprune.analyze(model, torch.randn(4, 6), frontend=frontend)
    assert not groups.group_of("0.weight").exact and groups.group_of("2.weight", "free").exact
    result, v = prune_and_verify(model, torch.randn(4, 6), ratio=0.5, frontend=frontend)
    assert result.module.get_parameter("2.weight").shape == (6, 8)
    assert v.inexact_groups == 1 and v.complete  # the standardized weight's inputs: checked too
