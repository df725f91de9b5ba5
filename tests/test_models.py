"""Tests of fxprune.models: the CIFAR ResNets and the model-spec resolver."""

import sys
import types

import pytest
import torch
from torch import nn

from fxprune.errors import ConfigError
from fxprune.models import (BUILTIN_MODELS, BasicBlock, CifarResNet, default_input_shape,
                            resnet56, resolve_model)


def expected_params(n, num_classes=10):
    """Independent count of a CIFAR ResNet with option-B shortcuts."""
    def block(cin, cout):
        p = cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
        return p + (cin * cout + 2 * cout if cin != cout else 0)

    total = 3 * 16 * 9 + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += block(cin, width)
            cin = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet44", 7),
                                    ("resnet56", 9), ("resnet110", 18)])
def test_param_counts(name, n):
    model = BUILTIN_MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == expected_params(n)
    # depth = 3x3 convs (stem included) + the final linear layer
    depth = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                for m in model.modules()) + 1
    assert depth == int(name[len("resnet"):])


def test_resnet56_is_085m():
    count = sum(p.numel() for p in resnet56().parameters())
    assert count == 855_770
    assert count == pytest.approx(0.85e6, rel=0.01)


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shape(batch):
    model = BUILTIN_MODELS["resnet20"]().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 32, 32))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all() and out.abs().max() > 1e-3


def test_num_classes_and_stages():
    model = resnet56(num_classes=100)
    assert model.fc.out_features == 100
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]
    stages = (model.layer1, model.layer2, model.layer3)
    assert [s[0].conv1.out_channels for s in stages] == [16, 32, 64]


def test_shortcuts_option_b():
    model = resnet56()
    assert len(model.layer1[0].shortcut) == 0
    first = model.layer2[0].shortcut
    assert isinstance(first[0], nn.Conv2d) and first[0].kernel_size == (1, 1)
    assert first[0].stride == (2, 2) and isinstance(first[1], nn.BatchNorm2d)
    assert len(model.layer2[1].shortcut) == 0


def test_traces_with_fx():
    model = BUILTIN_MODELS["resnet20"]().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), model(x))


def test_kaiming_init_is_seeded():
    torch.manual_seed(1)
    a = resnet56()
    torch.manual_seed(1)
    b = resnet56()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.conv1.weight.std() > 0.1  # kaiming fan_out: std = sqrt(2 / (16 * 9))


def test_bad_construction():
    with pytest.raises(ConfigError, match="blocks_per_stage >= 1"):
        CifarResNet(0)


@pytest.fixture
def factory_module(monkeypatch):
    mod = types.ModuleType("fxprune_test_factories")
    mod.tiny = lambda: nn.Linear(2, 2)
    mod.not_a_module = lambda: 42
    mod.CONSTANT = 3
    mod.Holder = type("Holder", (), {"create": staticmethod(lambda: BasicBlock(4, 4))})
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


@pytest.mark.parametrize("spec,cls", [
    ("resnet56", CifarResNet),
    ("ResNet20", CifarResNet),
    ("  resnet110 ", CifarResNet),
    ("torchvision:resnet18", None),
    ("torch.nn:Identity", nn.Identity),
    ("fxprune_test_factories:tiny", nn.Linear),
    ("fxprune_test_factories:Holder.create", BasicBlock),
])
def test_resolve_model(spec, cls, factory_module):
    model = resolve_model(spec)
    if cls is None:
        import torchvision
        cls = torchvision.models.ResNet
    assert type(model) is cls


@pytest.mark.parametrize("spec,match", [
    ("resnet57", r"unknown model 'resnet57'.*resnet20, resnet32, resnet44, resnet56, resnet110"),
    ("", r"empty model spec.*torchvision:NAME"),
    ("torchvision:", r"names no model"),
    ("torchvision:no_such_net", r"torchvision has no model 'no_such_net'.*list_models"),
    (":factory", r"malformed"),
    ("some.module:", r"malformed"),
    ("no_such_pkg_xyz.mod:make", r"cannot import 'no_such_pkg_xyz.mod'.*PYTHONPATH"),
    ("fxprune_test_factories:missing", r"has no attribute 'missing'"),
    ("fxprune_test_factories:CONSTANT", r"names a int, not a callable"),
    ("fxprune_test_factories:not_a_module", r"returned a int, not a torch.nn.Module"),
])
def test_resolve_model_errors(spec, match, factory_module):
    with pytest.raises(ConfigError, match=match):
        resolve_model(spec)


@pytest.mark.parametrize("spec,shape", [
    ("resnet20", (1, 3, 32, 32)),
    ("RESNET110", (1, 3, 32, 32)),
    ("torchvision:resnet50", (1, 3, 224, 224)),
    ("torchvision:inception_v3", (1, 3, 299, 299)),
    ("pkg.mod:factory", (1, 3, 224, 224)),
])
def test_default_input_shape(spec, shape):
    assert default_input_shape(spec) == shape


def test_doctests():
    import doctest

    import fxprune.models

    result = doctest.testmod(fxprune.models)
    assert result.attempted > 0 and result.failed == 0
