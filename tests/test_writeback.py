"""Write-back (``fxprune.apply``, ``result.apply``): the pruned weights go back into a copy
of the user's own module tree. Every pruned model is checked by the oracle first; the
copy keeps the model's classes, holds the pruned module's tensors, has its size
attributes updated, computes what ``result.module`` computes, shares no tensor with
either, and the user's model is left untouched. A size the model's code fixes, a model
other than the one pruned and a model changed since are typed errors."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.writeback import WritebackError
from tests.helpers.oracle import assert_untouched, prune_and_verify, snapshot


def _tensors(m: nn.Module) -> dict:
    return dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))


def _written_back(model, x, **kwargs):
    """Prune through the oracle, write back, and check the copy against the invariants."""
    result, _ = prune_and_verify(model, x, **kwargs)
    before = snapshot(model)
    out = fxprune.apply(model, result, x)
    assert_untouched(model, before)
    assert type(out) is type(model)
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]
    pruned = _tensors(result.module)
    mine, theirs = _tensors(out), _tensors(model)
    assert mine.keys() == theirs.keys()
    shared = {t.data_ptr() for t in theirs.values()} | {t.data_ptr() for t in pruned.values()}
    for name, t in mine.items():
        assert t.data_ptr() not in shared or t.numel() == 0, f"{name} is shared"
        if name in pruned and "in_proj" not in name and "qkv" not in name:  # (the scale fold)
            assert torch.equal(t, pruned[name]), name
    assert sum(t.numel() for t in out.parameters()) < sum(t.numel() for t in model.parameters())
    with torch.no_grad():
        got, ref = out.eval()(*(x if isinstance(x, tuple) else (x,))), result.module(x)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())  # (eager kernels round otherwise)
    assert float(got.std()) > 1e-3  # not a constant output
    _check_size_attributes(out)
    return result, out


def _check_size_attributes(model: nn.Module) -> None:
    """Every standard layer's attributes describe its tensors."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            assert m.out_channels == m.weight.shape[0] and m.in_channels == m.weight.shape[1] * m.groups, name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features == m.running_mean.shape[0] == m.weight.shape[0], name
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name
        elif isinstance(m, nn.MultiheadAttention):
            assert m.embed_dim == m.num_heads * m.head_dim == m.in_proj_weight.shape[0] // 3, name


class Mixed(nn.Module):
    """Plain, depthwise and grouped convs, batch and group norm, an LSTM and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.gn = nn.GroupNorm(4, 16)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.gn(self.grouped(torch.relu(self.dw(x))))
        seq = x.flatten(2).transpose(1, 2)
        y, _ = self.lstm(seq)
        return self.head(self.norm(y).mean(1))


def test_mixed_layers_write_back_with_their_size_attributes():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    result, out = _written_back(model, x, ratio=0.5)
    assert out.stem[0].out_channels == out.stem[1].num_features == out.dw.groups == out.dw.out_channels < 16
    assert out.grouped.groups == 4 and out.gn.num_groups == 4 and out.gn.num_channels == out.grouped.out_channels
    assert out.lstm.hidden_size == out.lstm.weight_hh_l0.shape[1] < 12
    assert out.lstm.input_size == out.grouped.out_channels
    assert out.norm.normalized_shape == (out.lstm.hidden_size,) and out.head.in_features == out.lstm.hidden_size
    assert result.apply(model) is not out  # the method, with inputs made from the captured shapes


class Attention(nn.Module):
    def __init__(self, literal_view=False):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.literal_view = literal_view
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.literal_view:  # a size written into the code: 4 heads of 8
            b, n, _ = h.shape
            q, k, v = self.qkv(h).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            h = h + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1).matmul(v).transpose(1, 2).reshape(b, n, 32))
        return self.out(h)


def test_multihead_attention_writes_back_heads():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 6)
    _, out = _written_back(model, x, ratio=0.5, policy="heads")
    assert (out.attn.num_heads, out.attn.head_dim, out.attn.embed_dim) == (2, 8, 16)


def test_multihead_attention_cannot_hold_unequal_head_sizes():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 6)
    result = fxprune.prune(model, x, ratio=0.25, policy="heads", ignore=["embed"])  # heads go, the input stays
    with pytest.raises(WritebackError, match=r"MultiheadAttention at 'attn'.*ignore=\['attn'\]"):
        fxprune.apply(model, result, x)


def test_a_literal_size_in_forward_is_an_error_naming_the_line():
    torch.manual_seed(0)
    model = Attention(literal_view=True).eval()
    x = torch.randn(2, 5, 6)
    result, _ = prune_and_verify(model, x, ratio=0.5, policy="heads", ignore=["attn"])
    with pytest.raises(WritebackError, match=r"test_writeback.py:\d+: q, k, v = self.qkv\(h\).view.*result.module"):
        fxprune.apply(model, result, x)
    with pytest.raises(fxprune.RewriteError):  # the typed family
        result.apply(model, x)


def test_other_or_changed_models_are_refused():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxprune.prune(model, x, ratio=0.5)
    with pytest.raises(WritebackError, match="differs from the model this result was pruned from"):
        fxprune.apply(Mixed().eval(), result, x)  # same class, other weights
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.weight.add_(1.0)
    with pytest.raises(WritebackError, match="changed since it was pruned"):
        fxprune.apply(changed, result, x)
    other = Mixed()
    other.head = nn.Linear(12, 7)
    with pytest.raises(WritebackError, match="'head.weight' has shape"):
        fxprune.apply(other, result, x)
    with pytest.raises(fxprune.ConfigError, match="GraphModule"):
        fxprune.apply(result.module, result, x)


def _small(name):
    """The classes of vit_b_16, swin_t and convnext_tiny at a small width and depth."""
    tv = torchvision.models
    if name == "vit":
        return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48)
    if name == "swin":
        return tv.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[3, 6],
                                  window_size=[4, 4], stochastic_depth_prob=0.0)
    cnblock = tv.convnext.CNBlockConfig
    return tv.ConvNeXt([cnblock(24, 48, 2), cnblock(48, None, 2)], stochastic_depth_prob=0.0)


# (model, input size, prune options); whole heads for ViT (nn.MultiheadAttention holds one
# head size, and head_dim pruning takes queries/keys and values apart)
TORCHVISION = {"resnet18": (32, {}), "mobilenet_v3_small": (32, {}), "efficientnet_b0": (32, {}),
               "vit": (32, {"policy": "heads"}), "swin": (32, {}), "convnext": (32, {})}
FULL_SIZE = {"vit_b_16": (32, {"policy": "heads"}), "swin_t": (64, {}), "convnext_tiny": (32, {})}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_write_back(name):
    torch.manual_seed(0)
    size, options = TORCHVISION[name]
    model = _small(name) if name in ("vit", "swin", "convnext") else torchvision.models.get_model(name, weights=None)
    _written_back(model.eval(), torch.randn(1, 3, size, size), ratio=0.5, min_effect=1e-3, **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_torchvision_transformers_write_back(name):
    torch.manual_seed(0)
    size, options = FULL_SIZE[name]
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    _written_back(model, torch.randn(1, 3, size, size), ratio=0.5, min_effect=1e-3, **options)


def test_vit_with_head_size_pruned_apart_is_an_error_with_the_fix():
    torch.manual_seed(0)
    model = _small("vit").eval()
    x = torch.randn(1, 3, 32, 32)
    result = fxprune.prune(model, x, ratio=0.5)  # head_dim: queries/keys and values apart
    with pytest.raises(WritebackError, match="policy='heads'"):
        fxprune.apply(model, result, x)


def test_timm_vit_writes_back_with_the_scale_folded():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    result, out = _written_back(model, torch.randn(1, 3, 32, 32), ratio=0.5, min_effect=1e-3)
    attn = out.blocks[0].attn
    assert attn.head_dim * attn.num_heads == attn.qkv.out_features // 3 and attn.head_dim < 64
    assert attn.scale == attn.head_dim ** -0.5  # as the class computes it; the query rows carry the rest


def test_docstring_example():
    import doctest

    import fxprune.writeback

    result = doctest.testmod(fxprune.writeback)
    assert result.attempted > 0 and result.failed == 0
