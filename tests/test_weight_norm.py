"""Weight-normalized layers (vocoders, wav2vec2's positional conv): the weight is
g * v / ||v||, computed. fxprune slices g and v and folds the change of the kept norms
into g, so the pruned layer's weight is exactly the kept part of the original; the
layer stays weight-normalized, in the pruned model and in the saved folder."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fxprune
from tests.helpers.oracle import prune_and_verify

STYLES = ["parametrization", "hook"]


def _wn(style, module, dim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook form is deprecated, and still common
        if style == "parametrization":
            return parametrizations.weight_norm(module, dim=dim)
        return torch.nn.utils.weight_norm(module, dim=dim)


class Vocoder(nn.Module):
    """A HiFi-GAN-like stack: weight-normed conv, transposed conv, residual conv, and a
    weight-normed linear branch."""

    def __init__(self, style, dim):
        super().__init__()
        self.pre = _wn(style, nn.Conv1d(4, 32, 7, padding=3), dim)
        self.up = _wn(style, nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1), dim)
        self.res = _wn(style, nn.Conv1d(16, 16, 3, padding=1), dim)
        self.post = _wn(style, nn.Conv1d(16, 1, 7, padding=3), dim)
        self.fc = _wn(style, nn.Linear(20, 12), None if dim is None else min(dim, 1))
        self.out = nn.Linear(12, 3)

    def forward(self, x, y):
        h = F.leaky_relu(self.pre(x), 0.1)
        h = F.leaky_relu(self.up(h), 0.1)
        h = h + self.res(F.leaky_relu(h, 0.1))
        return torch.tanh(self.post(h)), self.out(F.relu(self.fc(y)))


INPUTS = (torch.randn(2, 4, 20), torch.randn(3, 20))


@pytest.mark.parametrize("dim", [0, 1, 2, None])
@pytest.mark.parametrize("style", STYLES)
def test_weight_normed_layers_prune_exactly(style, dim):
    torch.manual_seed(0)
    model = Vocoder(style, dim)
    # dims other than ``dim`` change the kept norms: without the fold into g this fails
    result, v = prune_and_verify(model, INPUTS, ratio=0.5, healthy=False)
    assert not result.groups.barriers and v.exact_groups == 3
    pre = result.module.pre
    if style == "parametrization":
        assert parametrizations.parametrize.is_parametrized(pre, "weight")
        assert pre.parametrizations.weight.original1.shape == (16, 4, 7)
    else:
        assert pre.weight_v.shape == (16, 4, 7) and pre.weight.shape == (16, 4, 7)
    assert pre.out_channels == 16 and result.module.res.in_channels == 8


@pytest.mark.parametrize("style", STYLES)
def test_weight_normed_result_saves_and_loads_bit_exact(style, tmp_path):
    torch.manual_seed(0)
    model = Vocoder(style, 0).eval()
    result = fxprune.prune(model, INPUTS, ratio=0.5)
    assert fxprune.verify(model, result, INPUTS).max_rel_err < 1e-4
    fxprune.save(result, tmp_path / "pruned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fxprune.load(tmp_path / "pruned")
        a, b = result.module(*INPUTS), loaded(*INPUTS)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    source = (tmp_path / "pruned" / "module.py").read_text()
    assert "weight_norm(torch.nn.Conv1d(4, 16" in source


def test_other_parametrizations_stay_pinned_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = parametrizations.spectral_norm(nn.Conv2d(3, 8, 3))
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    groups = fxprune.analyze(Net(), torch.randn(1, 3, 8, 8))
    assert not groups.prunable
    assert any("parametrized tensors" in b and "_SpectralNorm" in b for b in groups.barriers)


@pytest.mark.parametrize("dim", [0, 2])
def test_exported_weight_norm_prunes_exactly(dim):
    # torch.export writes the layer as _weight_norm(v, g, dim) feeding a functional conv
    torch.manual_seed(0)
    model = Vocoder("parametrization", dim)
    result, v = prune_and_verify(model, INPUTS, ratio=0.5, healthy=False, frontend="export")
    assert result.frontend == "export" and not result.groups.barriers and v.exact_groups == 3
    assert result.module.get_parameter("pre.parametrizations.weight.original1").shape == (16, 4, 7)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_weight_normed_layer_used_twice_is_folded_once(frontend):
    # export writes one _weight_norm per use: folding g at each of them shrank it twice
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(4, 16, 3, padding=1)
            self.b = parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1), dim=0)
            self.out = nn.Conv1d(16, 2, 1)

        def forward(self, x):
            h = F.relu(self.b(F.relu(self.a(x))))
            return self.out(F.relu(self.b(h)))

    torch.manual_seed(0)
    result, v = prune_and_verify(Twice(), torch.randn(2, 4, 10), ratio=0.5, healthy=False, frontend=frontend)
    assert v.exact_groups == 1
    assert result.module.get_parameter("b.parametrizations.weight.original1").shape == (8, 8, 3)
