"""Norm layers and pointwise ops (broadcasting, residual add, SE-style mul,
free parameters), each checked by the oracle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn(self.a(x))) + x
        z = self.b(y) + y
        return self.head(z)


class SqueezeExcite(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SpatialAttention(nn.Module):
    """A (B, 1, H, W) map broadcast over channels: its own channel is pinned, x's are not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.att = nn.Conv2d(8, 1, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.head(x * torch.sigmoid(self.att(x)))


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.gelu(self.conv(x)) * self.gamma + self.shift)


class FunctionalNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8))
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.mean, self.var, self.w, self.b, False)
        return self.head(F.hardswish(x))


ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.ELU(), nn.GELU(), nn.SiLU(), nn.Mish(),
               nn.Hardswish(), nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.Softplus(), nn.PReLU()]


EXACT = {
    "residual": (Residual, (2, 3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 8, 8)),
    "spatial_attention": (SpatialAttention, (2, 3, 8, 8)),
    "layer_scale": (LayerScale, (2, 3, 8, 8)),
    "functional_norms": (FunctionalNorms, (2, 3, 8, 8)),
    "bn1d": (lambda: nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2)), (4, 5)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 8, 1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 2, 1)), (2, 2, 3, 3, 3)),
    "instance_norm": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                                            nn.Conv2d(8, 2, 1)), (2, 3, 8, 8)),
    "group_norm_per_channel": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8), nn.ReLU(),
                                                     nn.Conv2d(8, 2, 1)), (2, 3, 8, 8)),
    "dropout_identity": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.3), nn.Identity(),
                                               nn.Dropout2d(), nn.Conv2d(8, 2, 1)), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_groups_match_oracle(name):
    torch.manual_seed(0)
    make, shape = EXACT[name]
    result, v = prune_and_verify(make(), torch.randn(shape), ratio=0.5)
    assert v.inexact_groups == 0


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_activations_pass_channels_through(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), act, nn.Conv2d(8, 2, 1))
    groups = fxprune.analyze(net, torch.randn(1, 3, 6, 6))
    assert [g.size for g in groups.prunable] == [8]
    prune_and_verify(net, torch.randn(2, 3, 6, 6), ratio=0.5)


def test_residual_couples_all_members():
    groups = fxprune.analyze(Residual(), torch.randn(1, 3, 8, 8))
    g = groups.group_of("stem.weight")
    assert g is groups.group_of("a.weight") is groups.group_of("b.weight")
    assert g.size == 8


def test_spatial_attention_map_is_pinned_not_coupled():
    groups = fxprune.analyze(SpatialAttention(), torch.randn(1, 3, 8, 8))
    main = groups.group_of("conv.weight")
    assert main.size == 8 and len(main.prunable) == 8
    att = groups.group_of("att.weight")
    assert att is not main and not att.is_prunable


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.GroupNorm(2, 8)], ids=["layer_norm", "group_norm"])
def test_mixing_norms_are_inexact_and_still_run(norm):
    torch.manual_seed(0)
    if isinstance(norm, nn.LayerNorm):
        net = nn.Sequential(nn.Linear(4, 8), norm, nn.ReLU(), nn.Linear(8, 2))
        x = torch.randn(3, 4)
    else:
        net = nn.Sequential(nn.Conv2d(3, 8, 1), norm, nn.ReLU(), nn.Conv2d(8, 2, 1))
        x = torch.randn(3, 3, 4, 4)
    groups = fxprune.analyze(net, x)
    g = groups.group_of("0.weight")
    assert not g.exact and g.inexact_reasons
    result, v = prune_and_verify(net, x, ratio=0.5)
    assert v.inexact_groups == 1 and v.exact_groups == 0
    if isinstance(norm, nn.GroupNorm):
        gn = result.module.get_submodule("1")
        assert gn.num_groups == 2 and gn.num_channels == 4
    else:
        assert result.module.get_submodule("1").normalized_shape == (4,)


def test_softmax_over_channels_is_inexact_over_space_exact():
    class Soft(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.conv, self.head, self.dim = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), dim

        def forward(self, x):
            return self.head(torch.softmax(self.conv(x), self.dim))

    x = torch.randn(1, 3, 4, 4)
    assert not fxprune.analyze(Soft(1), x).group_of("conv.weight").exact
    assert fxprune.analyze(Soft(-1), x).group_of("conv.weight").exact


def test_softmax2d_module_mixes_the_channels_and_prunes():
    # nn.Softmax2d has no dim attribute (it is softmax over dim -3): it was a barrier
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softmax2d(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    groups = fxprune.analyze(m, x)
    g = groups.group_of("0.weight")
    assert not groups.barriers and g.is_prunable and not g.exact
    assert any("normalizes across channels" in r for r in g.inexact_reasons)
    result, _ = prune_and_verify(m, x, ratio=0.5)
    assert result.module.get_submodule("2").in_channels == 4


class Norms(torch.nn.Module):
    """A channel statistic used as a value: F.normalize over the channels or over the
    tokens, an L2 / L1 / max / negative-order norm, or a softmax maximum."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3)

    def forward(self, x):
        h = self.a(x)
        if self.how.startswith("normalize"):
            return self.b(F.normalize(h, dim=-1 if self.how == "normalize" else 1))
        scale = {"l2": lambda: h.norm(dim=-1, keepdim=True), "l1": lambda: torch.linalg.vector_norm(h, 1, -1, True),
                 "inf": lambda: torch.linalg.vector_norm(h, float("inf"), -1, True),
                 "neg": lambda: torch.linalg.vector_norm(h, -1, -1, True),
                 "softmax": lambda: h.softmax(-1).amax(-1, keepdim=True)}[self.how]()
        return self.b(h) * scale


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_normalize_and_p_norms_over_channels_are_exact_under_the_masks(frontend):
    # a zeroed channel adds nothing to a p-norm with p > 0: the pruned model equals the
    # original with the removed channels zeroed (the oracle checks it exactly). Export
    # writes F.normalize as norm, clamp, expand_as and div: the same, not pinned
    x = torch.randn(2, 5, 6)
    torch.manual_seed(0)
    for model in (Norms("normalize"), Norms("normalize-tokens")):
        result, v = prune_and_verify(model, x, ratio=0.5, healthy=False, frontend=frontend)
        assert result.groups.group_of("a.weight").exact and v.exact_groups == 1
    for how, exact in (("l2", True), ("l1", True), ("inf", True), ("neg", False), ("softmax", False)):
        torch.manual_seed(0)
        result, v = prune_and_verify(Norms(how), x, ratio=0.5, healthy=False, frontend=frontend)
        assert result.groups.group_of("a.weight").exact is exact, how


class ResampledPositions(nn.Module):
    """A learned position table at a fixed grid, resampled to the feature map and added
    (Hiera, SAM): the table's channels go with the features'."""

    def __init__(self, mode):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 3, 3))
        self.head = nn.Conv2d(8, 4, 1)
        self.mode = mode

    def forward(self, x):
        h = self.conv(x)
        pos = F.interpolate(self.pos, size=h.shape[-2:], mode=self.mode, antialias=self.mode == "bilinear")
        return self.head(F.relu(h + pos))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest-exact"])
def test_resampled_position_table_prunes_with_the_features(mode, frontend):
    torch.manual_seed(0)
    model, x = ResampledPositions(mode).eval(), torch.randn(1, 3, 16, 16)
    groups = fxprune.analyze(model, x, frontend=frontend)
    assert not groups.barriers
    g = groups.group_of("conv.weight")
    assert "pos" in {m.path for m in g.members} and g.exact
    result, _ = prune_and_verify(model, x, ratio=0.5, frontend=frontend)
    assert dict(result.module.named_parameters())["pos"].shape == (1, 4, 3, 3)


class TwoTowers(nn.Module):
    """A shared encoder applied to two inputs, compared by cosine similarity or distance
    over the embedding (channel) dim, or by cosine similarity over space."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 16, 3)
        self.proj = nn.Linear(16, 8)

    def forward(self, a, b):
        fa, fb = F.relu(self.c(a)), F.relu(self.c(b))
        if self.how == "space":  # per channel, over positions: channels pass through to the sum
            return F.cosine_similarity(fa.flatten(2), fb.flatten(2), dim=2).sum(1, keepdim=True)
        za, zb = self.proj(fa.mean((2, 3))), self.proj(fb.mean((2, 3)))
        if self.how == "cosine":
            return F.cosine_similarity(za, zb)
        return F.pairwise_distance(za, zb)


@pytest.mark.parametrize("how, exact", [("cosine", True), ("distance", False), ("space", True)])
def test_comparisons_of_two_embeddings_pair_their_channels(how, exact):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    result, v = prune_and_verify(TwoTowers(how), x, ratio=0.5, healthy=False)
    assert not result.groups.barriers
    assert result.module.get_parameter("c.weight").shape[0] == 8
    groups = {g.members[0].path: g.exact for g in result.groups.prunable}
    assert groups["c.weight"] is True
    if how != "space":
        assert result.module.get_parameter("proj.weight").shape == (4, 8)
        assert groups["proj.weight"] is exact


def test_pointwise_functions_without_a_rule_use_their_aten_twins_tag():
    """torch functions and methods whose ATen op is tagged pointwise are elementwise with
    broadcasting, whether or not a rule names them (these were barriers under fx)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.a(x)
            h = torch.frac(h) + h.sinc() + torch.special.erfcx(h.abs()) * torch.special.i0e(h)
            return self.b(h)

    torch.manual_seed(0)
    result, v = prune_and_verify(Net(), torch.randn(2, 3, 8, 8), ratio=0.5)
    assert result.frontend == "fx" and not result.groups.barriers and v.exact_groups == 1


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_aliases_of_elementwise_ops_are_elementwise(frontend):
    """torch.multiply, divide, subtract, clip and the arc* names are aliases (in ATen too,
    where they carry no tags: ConvBERT's export had two barriers)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.multiply(self.a(x), torch.sigmoid(self.g(x))).divide(2.0)
            h = torch.subtract(torch.clip(h, -1.0, 1.0), 0.1).arctan()
            return self.b(h)

    torch.manual_seed(0)
    result, v = prune_and_verify(Net(), torch.randn(4, 6), ratio=0.5, frontend=frontend)
    assert not result.groups.barriers and v.exact_groups == 1


class ShapeFromForward(nn.Module):
    """F.layer_norm with its normalized_shape read in forward (``h.shape[-1:]``, or a list
    holding ``h.size(-1)``): the rewrite failed on the graph node."""

    def __init__(self, as_list):
        super().__init__()
        self.as_list = as_list
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.w = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        shape = [h.size(-1)] if self.as_list else h.shape[-1:]
        return self.b(F.layer_norm(h, shape, self.w))


@pytest.mark.parametrize("as_list", [False, True])
def test_layer_norm_shape_computed_in_forward_follows_the_pruned_size(as_list):
    torch.manual_seed(0)
    result, _ = prune_and_verify(ShapeFromForward(as_list).eval(), torch.randn(4, 6), ratio=0.5)
    assert result.module.get_parameter("w").shape == (8,)
    assert result.module(torch.randn(5, 6)).shape == (5, 3)


def test_prelu_with_a_slope_computed_in_the_graph():
    """F.prelu whose per-channel slope is computed in forward (not a parameter): the
    slope's positions go with the channels they scale."""
    import fxprune
    from tests.helpers.oracle import prune_and_verify

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)
            self.slope = torch.nn.Parameter(torch.rand(8))

        def forward(self, x):
            return self.b(torch.nn.functional.prelu(self.a(x), self.slope * 0.5))

    groups = fxprune.analyze(Net(), torch.randn(2, 3, 6, 6))
    assert [g.size for g in groups.prunable] == [8]
    prune_and_verify(Net(), torch.randn(2, 3, 6, 6), ratio=0.5)


@pytest.mark.parametrize("method", ["long", "int", "short", "byte", "char", "bool", "float", "half", "double"])
def test_dtype_conversion_methods_keep_every_position(method):
    from tests.helpers.rule_harness import run_rule

    r = run_rule(method, torch.randn(2, 6, 3))
    assert not r.barriers and not r.pinned and r.output == r.inputs[0]


class CountsChannels(nn.Module):
    """A channel stream turned into integer counts and back (a quantized histogram)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = (F.relu(self.a(x)) * 4).long()
        return self.b(h.float() + h.bool().float())


def test_a_stream_through_integer_conversions_prunes():
    torch.manual_seed(0)
    result, v = prune_and_verify(CountsChannels().eval(), torch.randn(4, 5), ratio=0.5)
    assert not result.groups.barriers and v.exact_groups == 1
    assert result.module.get_parameter("a.weight").shape[0] == 4
