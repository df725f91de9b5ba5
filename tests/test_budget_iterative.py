"""Budgets (target_macs/target_params) and iterative pruning, checked by the oracle.

"Lands within one channel-step" means: the plan found meets the budget, and the
plan at the previous ratio step (the least change of the ratio that changes the
plan; with global ranking exactly one channel fewer removed) misses it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.iterative import schedule_fractions
from fxprune.models import resnet20
from fxprune.report import measure
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import prune_and_verify
from fxprune.plan import candidates
from fxprune.budget import meta_stats, ratio_steps

X = torch.randn(2, 3, 16, 16)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, 5))


# -- budgets -------------------------------------------------------------------
@pytest.mark.parametrize("target, options", [
    (dict(target_macs=0.5), {}),
    (dict(target_macs=0.5), dict(global_ranking=True)),
    (dict(target_params=0.3), dict(global_ranking=True, max_ratio=0.8)),
    (dict(target_macs=0.6, target_params=0.5), dict(round_to=4)),
    (dict(target_macs=0.4), dict(isomorphic=True)),
])
def test_budget_lands_within_one_step(target, options):
    model = make_healthy(net(), X.shape)
    result, _ = prune_and_verify(model, X, healthy=False, **target, **options)
    b = result.budget
    real = measure(result.module, X)
    assert b.achieved == real  # the meta-device estimate is the real count
    base = measure(model, X)
    for metric, t in b.targets:
        assert t == pytest.approx(target[f"target_{metric}"] * getattr(base, metric))
        assert getattr(real, metric) <= t
    prev = fxprune.prune(model, X, ratio=b.previous_ratio, **options)
    prev_stats = measure(prev.module, X)
    assert prev_stats == b.previous
    assert any(getattr(prev_stats, m) > t for m, t in b.targets)  # one step less misses the budget
    steps = ratio_steps(result.groups, global_ranking=options.get("global_ranking", False),
                        isomorphic=options.get("isomorphic", False))
    assert steps.index(b.previous_ratio) + 1 == steps.index(b.ratio)
    if options == dict(global_ranking=True):
        assert prev.plan.n_removed == result.plan.n_removed - 1  # one channel


def test_budget_on_resnet20_absolute_target():
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    base = measure(make_healthy(model, x.shape), x)
    result, v = prune_and_verify(model, x, healthy=False, target_macs=base.macs // 3, global_ranking=True)
    assert result.report.after.macs <= base.macs // 3 < result.budget.previous.macs
    assert "budget: macs" in str(result.budget)


def test_budget_already_met_prunes_nothing():
    model = net().eval()
    r = fxprune.prune(model, X, target_params=10**9)
    assert r.plan.n_removed == 0 and r.budget.ratio == 0.0 and r.budget.previous is None


def test_unreachable_budget_names_smallest_reachable_value():
    model = net().eval()
    most = fxprune.prune(model, X, ratio=0.999)  # every group down to one channel: the last step
    smallest = measure(most.module, X).macs
    with pytest.raises(ConfigError, match=rf"unreachable.*smallest reachable is macs {smallest} "):
        fxprune.prune(model, X, target_macs=0.01)
    with pytest.raises(ConfigError, match="smallest reachable is params"):
        fxprune.prune(model, X, target_params=0.2, max_ratio=0.3, global_ranking=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_macs=0.5, ratio=0.3), "either ratio or target_macs"),
    (dict(target_macs=-3), "target_macs must be a positive count"),
    (dict(target_params=0), "target_params must be a positive count"),
    (dict(target_params=True), "target_params must be a positive count"),
    (dict(target_macs="half"), "target_macs must be a positive count"),
    (dict(target_macs=float("inf")), "target_macs must be a positive count"),
    (dict(target_macs=float("nan")), "target_macs must be a positive count"),
    (dict(target_macs=0.5, pipeline="channel-deps,select,rewrite"), r"select-budget\{target_macs"),
])
def test_budget_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fxprune.prune(net().eval(), X, **kwargs)


def test_budget_in_pipeline_text():
    model = net().eval()
    a = fxprune.prune(model, X, pipeline="channel-deps,score-magnitude,select-budget{target_macs=0.5},rewrite")
    b = fxprune.prune(model, X, target_macs=0.5)
    assert torch.equal(a.plan.kept, b.plan.kept) and a.budget.achieved == b.budget.achieved


def test_meta_stats_match_measure():
    for model, x in ((net().eval(), X), (resnet20().eval(), torch.randn(1, 3, 32, 32))):
        gm = fxprune.trace(model, x)
        assert meta_stats(gm, (x,)) == measure(model, x)


# -- iterative -----------------------------------------------------------------
def out_channels(module):
    return [module.get_submodule(n).out_channels for n in ("0", "3", "6")]


@pytest.mark.parametrize("schedule", ["linear", "exponential", (0.1, 0.1, 0.6)])
def test_schedules_give_expected_per_step_counts(schedule):
    model = make_healthy(net(), X.shape)
    ratio, steps = 0.6, 3
    res = fxprune.iterative(model, X, steps=steps, ratio=ratio, schedule=schedule)
    fr = schedule_fractions(ratio, steps, schedule)
    for step, f in zip(res.steps, fr):
        assert out_channels(step.module) == [n - math.floor(f * n + 1e-9) for n in (16, 24, 12)]
        assert step.ratio == f
    assert out_channels(res.module) == out_channels(fxprune.prune(model, X, ratio=ratio).module)
    assert res.report.before == measure(model, X) and res.report.after == measure(res.module, X)


def test_every_step_passes_the_oracle_and_input_is_untouched():
    model = make_healthy(resnet20(), (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    res = fxprune.iterative(model, x, steps=3, ratio=0.5, schedule="exponential", check=True)
    inputs = [model] + [s.module for s in res.steps[:-1]]
    for step_input, step in zip(inputs, res.steps):
        v = fxprune.verify(step_input, step.result, x)
        assert v.max_rel_err < 1e-4 and v.effect > 1e-4
        assert step.verified is not None and step.result.plan.n_removed > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.module.get_submodule("layer1.0.conv1").out_channels == 8


def test_finetune_called_with_step_numbers_and_its_module_used():
    model = make_healthy(net(), X.shape)
    calls, snapshots = [], []

    def finetune(module, step):
        calls.append(step)
        snapshots.append(copy.deepcopy(module))
        with torch.no_grad():  # "training": perturb the weights the next step prunes
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
        module.train()
        return None if step != 2 else copy.deepcopy(module)

    res = fxprune.iterative(model, X, steps=3, ratio=0.5, finetune=finetune)
    assert calls == [1, 2, 3]
    assert res.steps[1].module is not res.steps[1].result.module  # finetune returned a new module
    assert all(not m.training for m in res.module.modules())
    inputs = [model] + [s.module for s in res.steps[:-1]]
    for step_input, step, snap in zip(inputs, res.steps, snapshots):
        v = fxprune.verify(step_input, dataclasses.replace(step.result, module=snap), X)
        assert v.max_rel_err < 1e-4 and v.effect > 1e-4


def test_iterative_global_ranking_hits_pooled_counts_and_final_ratios():
    model = make_healthy(net(), X.shape)
    res = fxprune.iterative(model, X, steps=2, ratio=0.5, global_ranking=True,
                            ratios={model[3]: 0.75}, ignore=[model[6]])
    g0 = fxprune.analyze(model, X)
    pool = sum(c.numel() for gid, c in candidates(g0).items() if gid != g0.group_of("3.weight").id) - 12
    for step, f in zip(res.steps, (0.25, 0.5)):
        pooled = sum(out_channels(step.module)[:1])
        assert pooled == 16 - math.floor(f * pool + 1e-9)  # the pool is conv 0 alone (6 is ignored)
    assert out_channels(res.module)[1:] == [24 - 18, 12]


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2, schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(steps=2, schedule=(0.4, 0.2)), "non-decreasing cumulative fractions"),
    (dict(steps=2, ratio=1.0), r"ratio must be a number in \[0, 1\)"),
    (dict(steps=2, target_macs=0.5), "iterative does not take target_macs"),
    (dict(steps=2, finetune=3), "finetune must be a callable"),
    (dict(steps=2, ratios={"nope": 0.5}), "ratios: 'nope' is not a module"),
])
def test_iterative_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fxprune.iterative(net().eval(), X, **kwargs)
