"""Regularizers: penalties against brute-force formulas, a few hundred SGD steps
on a tiny net drive the targeted channels toward zero, and the prune that
follows passes the oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.regularize import GroupLasso, GrowingReg, Slimming
from tests.helpers.oracle import assert_untouched, prune_and_verify, snapshot

GEN = torch.Generator().manual_seed(1)
X = torch.randn(64, 3, 8, 8, generator=GEN)
Y = torch.randint(0, 4, (64,), generator=GEN)
XS = X[:8]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets train ~40x faster on one thread when the cores are shared (and deterministically)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net(bias=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, stride=2, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def train(model, reg=None, steps=300, use_penalty=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
        if reg is not None and use_penalty:
            loss = loss + reg.penalty()
            reg.advance()
        opt.zero_grad()
        loss.backward()
        if reg is not None and not use_penalty:
            reg.step()
        opt.step()
    return model.eval()


def bn_scales(model):
    return torch.cat([model[1].weight.detach().abs(), model[4].weight.detach().abs()])


# -- penalties against hand-written formulas ------------------------------------------
def test_slimming_penalty_is_l1_of_bn_scales():
    m = net()
    reg = Slimming(m, XS, reg=0.3)
    assert torch.allclose(reg.penalty(), 0.3 * bn_scales(m).sum())
    assert set(map(id, reg.parameters)) == {id(m[1].weight), id(m[4].weight)}  # the user's own


@pytest.mark.parametrize("bias", [True, False])
def test_group_lasso_penalty_matches_brute_force(bias):
    m = net(bias=True)
    with torch.no_grad():
        m[1].bias.normal_()
        m[4].bias.normal_()
    reg = GroupLasso(m, XS, reg=0.1, alpha=3.0, bias=bias)
    total = 0.0
    for conv, bn, nxt in ((m[0], m[1], m[3]), (m[3], m[4], m[8])):
        cols = nxt.weight.detach().transpose(0, 1).reshape(16, -1)
        sq = conv.weight.detach().reshape(16, -1).pow(2).sum(1) + bn.weight.detach() ** 2 + cols.pow(2).sum(1)
        if bias:
            sq = sq + conv.bias.detach() ** 2 + bn.bias.detach() ** 2
        norm = sq.sqrt()
        gamma = 2.0 ** (3.0 * (norm.max() - norm) / (norm.max() - norm.min()))
        total = total + 0.1 / 2 * (gamma * sq).sum()
    assert torch.allclose(reg.penalty().detach(), total, rtol=1e-5)


def test_step_adds_the_penalty_gradient_into_grad():
    m = net()
    reg = GroupLasso(m, XS, reg=0.1)
    expected = torch.autograd.grad(reg.penalty(), [m[0].weight, m[1].weight])
    m[0].weight.grad = torch.ones_like(m[0].weight)
    reg.step()
    assert torch.allclose(m[0].weight.grad, 1 + expected[0])
    assert torch.allclose(m[1].weight.grad, expected[1])  # created where it was None
    assert m[8].weight.grad is not None and reg.iteration == 1  # the next layer's columns are members


def test_nothing_selected_is_a_no_op():
    m = net()
    reg = GrowingReg(m, XS, ratio=0.0)
    reg.step()
    assert float(reg.penalty().detach()) == 0.0 and reg.iteration == 1
    assert all(p.grad is None for p in m.parameters())


def test_growing_reg_schedule():
    reg = GrowingReg(net(), XS, ratio=0.5, delta=0.25, interval=3, ceiling=0.6)
    seen = []
    for _ in range(9):
        seen.append(reg.lam)
        reg.advance()
    assert seen == [0.25] * 3 + [0.5] * 3 + [0.6] * 3 and reg.done
    assert int(reg.selected.sum()) == 16  # half of each 16-channel group
    sel = reg.selected
    assert torch.allclose(reg.penalty(), 0.3 * (reg.sums() * sel).sum())


# -- training drives the targeted channels to zero --------------------------------------
def test_slimming_shrinks_bn_scales_and_prunes():
    control = bn_scales(train(net())).sum()
    m = net()
    reg = Slimming(m, XS, reg=0.05)
    before = snapshot(train(m, reg))
    assert bn_scales(m).sum() < control / 5
    assert int((bn_scales(m) < 1e-2).sum()) >= 12
    r, v = prune_and_verify(m, XS, healthy=False, importance=reg.importance(), ratio=0.5, min_effect=0.0)
    assert_untouched(m, before)
    kept = r.module.get_submodule("1").weight.detach().abs()
    assert kept.min() >= bn_scales(m)[:16].sort().values[8]  # the largest half of the scales stayed


def test_group_lasso_collapses_weak_channels_only_where_it_acts():
    m = net(bias=True)
    reg = GroupLasso(m, XS, reg=0.02, alpha=4.0, ignore=[m[3]])
    n0 = reg.channel_norms()
    train(m, reg, use_penalty=True)
    ctl = net(bias=True)
    ctl_reg = GroupLasso(ctl, XS)
    train(ctl)
    n1, c1 = reg.channel_norms(), ctl_reg.channel_norms()
    targeted, ignored = reg.active, ctl_reg.active & ~reg.active
    assert int(targeted.sum()) == 16 and int(ignored.sum()) == 16
    dead = n1 < 1e-2 * n0
    assert int(dead[targeted].sum()) >= 6  # weak channels of the regularized group collapse ...
    assert int(dead[ignored].sum()) == 0 and int((c1 < 1e-2 * n0).sum()) == 0  # ... nowhere else
    assert (n1[targeted].sort().values[:6] / n0[targeted].sort().values[:6]).max() < 1e-2
    r = reg.prune(ratio=0.375)  # the six weakest, all collapsed: they carried (almost) nothing
    assert r.module.get_submodule("0").out_channels == 10 and r.module.get_submodule("3").out_channels == 16
    assert fxprune.verify(m, r, XS).max_rel_err < 1e-4
    with torch.no_grad():
        err = (r.module(X) - m(X)).abs().max() / m(X).abs().max()
    assert err < 1e-2
    prune_and_verify(m, XS, healthy=False, ratio=0.75, importance=reg.importance(), ignore=[m[3]])


@pytest.mark.parametrize("use_penalty", [False, True])
def test_growing_reg_drives_selected_channels_to_zero(use_penalty):
    m = net(bias=True)
    reg = GrowingReg(m, XS, ratio=0.5, importance="l1", delta=0.02, interval=5, ceiling=1.0)
    n0 = reg.channel_norms()
    train(m, reg, use_penalty=use_penalty)
    assert reg.done and reg.iteration == 300
    n1 = reg.channel_norms()
    sel, kept = reg.selected, reg.active.new_zeros(reg.active.shape)
    for g in reg.groups.prunable:
        kept[list(g.classes)] = True
    kept &= ~sel
    assert (n1[sel] / n0[sel]).max() < 1e-2
    assert (n1[kept] / n0[kept]).min() > 0.3  # the others were left to learn
    r = reg.prune()  # exactly the selected channels go, and they carried nothing
    assert torch.equal(~r.plan.kept, sel)
    v = fxprune.verify(m, r, XS)
    assert v.max_rel_err < 1e-4 and v.effect < 1e-6
    with torch.no_grad():
        assert torch.allclose(r.module(X), m(X), rtol=1e-5, atol=1e-6)
    r, v = prune_and_verify(m, XS, healthy=False, importance=reg.importance(), ratio=0.75)
    assert bool((~r.plan.kept)[sel].all()) and v.effect > 1e-3  # dead ones first, then live ones


def test_regularizers_leave_the_model_alone_until_trained():
    m = net()
    before = snapshot(m)
    for reg in (Slimming(m, XS), GroupLasso(m, XS), GrowingReg(m, XS)):
        reg.penalty()
        _ = reg.channel_norms()
    assert_untouched(m, before)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("make, match", [
    (lambda: Slimming(net(), XS, reg=-1.0), "reg must be a positive finite number"),
    (lambda: GroupLasso(net(), XS, alpha=float("nan")), "alpha must be a non-negative"),
    (lambda: GrowingReg(net(), XS, interval=0), "interval must be a positive integer"),
    (lambda: GrowingReg(net(), XS, ratio=1.0), r"ratio must be a number in \[0, 1\)"),
    (lambda: GrowingReg(net(), XS, importance="magic"), "unknown importance 'magic'"),
    (lambda: GroupLasso(net(), XS, ignore=["nope"]), "ignore: 'nope' is not a module"),
    (lambda: Slimming(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)), XS),
     "Slimming found no norm layer scale"),
    (lambda: GroupLasso("net", XS), "model must be a torch.nn.Module"),
])
def test_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_exported():
    assert fxprune.regularize.GroupLasso is GroupLasso
    assert copy.copy(GroupLasso(net(), XS).importance()).name == "score-regularizer"


def test_doctests():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("fxprune.regularize"))
    assert result.attempted > 0 and result.failed == 0
