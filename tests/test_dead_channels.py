"""Lossless dead-channel elimination: zero weight rows and zero norm scales go, their
constants are folded into biases, outputs stay those of the model (checked here on
fresh inputs, and by the oracle inside), and channels that only look dead stay."""

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cli import main
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import assert_untouched, snapshot


def assert_same_outputs(model, module, shape, n=3):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        x = torch.randn(shape, generator=g) * 2
        with torch.no_grad():
            want, got = model(x), module(x)
        assert float(want.std()) > 1e-3  # not a degenerate output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def zero_row_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[0].weight[[1, 4]] = 0.0          # value = relu(bias): a constant folded into layer 2
        net[0].bias[1] = 0.8
        net[2].weight[2] = 0.0               # value = tanh(bias): folded into layer 4
    return net


def test_zero_rows_go_and_their_constants_fold_into_biases():
    net = zero_row_mlp()
    before = snapshot(net)
    x = torch.randn(16, 5)
    r = fxprune.eliminate_dead_channels(net, x)
    assert_untouched(net, before)
    assert r.module.get_submodule("0").out_features == 6
    assert r.module.get_submodule("2").out_features == 5
    assert r.plan.n_removed == 3
    assert r.plan.compensation.fills  # relu(0.8) and tanh(bias) are not zero: folded
    assert_same_outputs(net, r.module, (16, 5))
    v = fxprune.verify(net, r, x)
    assert v.complete and v.max_rel_err < 1e-6
    assert v.effect < 1e-5  # removing them changes nothing at all


def slim_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    make_healthy(net, (2, 3, 8, 8))
    net.eval()
    with torch.no_grad():
        # block 1 feeds a 1x1 conv: zero scales go, whatever their shift (it folds)
        net[1].weight[[0, 3]] = 0.0
        net[1].bias[0], net[1].bias[3] = 0.5, -0.2
        # block 2 feeds a padded 3x3 conv: a zero scale goes only where relu(shift) is 0
        net[4].weight[[1, 2]] = 0.0
        net[4].bias[1], net[4].bias[2] = -0.7, 0.9
    return net


def test_slimmed_cnn_loses_exactly_the_channels_it_can():
    net = slim_cnn()
    x = torch.randn(2, 3, 8, 8)
    r = fxprune.eliminate_dead_channels(net, x)
    assert r.module.get_submodule("0").out_channels == 6   # both zero-scale channels of block 1
    assert r.module.get_submodule("3").out_channels == 7   # channel 1 (relu(-0.7) = 0), not channel 2
    assert_same_outputs(net, r.module, (2, 3, 8, 8))
    fxprune.verify(net, r, x)


def test_a_residual_path_keeps_a_channel_alive():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6)
            self.c, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            h = h + torch.relu(self.b(h))  # channel 0 of b is dead, the residual carries it
            return self.head(torch.relu(self.c(h)))

    torch.manual_seed(0)
    net = Res().eval()
    with torch.no_grad():
        net.b.weight[0] = 0.0
    r = fxprune.eliminate_dead_channels(net, torch.randn(8, 4))
    assert r.plan.n_removed == 0


def test_nothing_dead_is_a_no_op_and_the_pipeline_form_works():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(8, 4)
    assert fxprune.eliminate_dead_channels(net, x).plan.n_removed == 0
    net = zero_row_mlp()
    r = fxprune.prune(net, torch.randn(16, 5), pipeline="channel-deps,eliminate-dead-channels")
    assert r.plan.n_removed == 3
    fxprune.verify(net, r, torch.randn(16, 5))
    assert_same_outputs(net, r.module, (16, 5))


@pytest.mark.parametrize("regularizer", ["group-lasso", "growing-reg"])
def test_after_sparse_training_the_zeroed_channels_disappear_without_accuracy_change(regularizer):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x_train = torch.randn(512, 6)
    y_train = teacher(x_train).argmax(1).detach()
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    if regularizer == "group-lasso":
        reg = fxprune.regularize.GroupLasso(net, x_train[:8], reg=3e-2)
    else:
        reg = fxprune.regularize.GrowingReg(net, x_train[:8], ratio=0.5, delta=0.05, interval=1, ceiling=10.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(300):
        loss = nn.functional.cross_entropy(net(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        reg.step()
        opt.step()
    net.eval()
    norms = net[0].weight.detach().norm(dim=1)
    assert int((norms < 1e-3 * norms.max()).sum()) >= 4  # group lasso zeroed some channels
    r = fxprune.eliminate_dead_channels(net, x_train[:64], threshold=1e-3)
    assert r.module.get_submodule("0").out_features <= 12
    x_test = torch.randn(1024, 6)
    with torch.no_grad():
        before = net(x_test).argmax(1)
        after = r.module(x_test).argmax(1)
    assert float((before == after).double().mean()) >= 0.995


def test_simplify_on_the_command_line(tmp_path, capsys, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("dead_models_for_cli")
    mod.net = zero_row_mlp
    monkeypatch.setitem(sys.modules, "dead_models_for_cli", mod)
    out = tmp_path / "small"
    assert main(["simplify", "dead_models_for_cli:net", "--input-shape", "16,5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "removed 3 dead channels" in text and (out / "module.py").exists()
    loaded = fxprune.load(str(out))
    assert_same_outputs(zero_row_mlp(), loaded, (16, 5))
    assert main(["simplify", "dead_models_for_cli:net", "--input-shape", "16,5", "--threshold", "2"]) == 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, "x"])
def test_bad_threshold_is_a_config_error(bad):
    with pytest.raises(fxprune.ConfigError, match="threshold"):
        fxprune.eliminate_dead_channels(zero_row_mlp(), torch.randn(4, 5), threshold=bad)
