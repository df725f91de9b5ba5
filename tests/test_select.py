"""select: local, global (with a per-group cap), isomorphic and per-module ranking,
round_to and ignore, each compared with a brute-force reference; pruned models
go through the oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.models import resnet20
from fxprune.scoring import ChannelScores
from tests.helpers.oracle import prune_and_verify
from fxprune.plan import candidates, group_signature, isomorphic_sets, select_channels

X = torch.randn(2, 3, 8, 8)


def block(cin, mid, cout):
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def chain():
    """stem(8) -> A(8->6->8) -> B(8->6->8) -> C(8->10->8) -> head: A.mid and B.mid are alike."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), block(8, 6, 8), block(8, 6, 8),
                         block(8, 10, 8), nn.Conv2d(8, 2, 1))


@pytest.fixture(scope="module")
def groups():
    torch.manual_seed(0)
    return fxprune.analyze(chain().eval(), X)


def perm_scores(groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ChannelScores(torch.randperm(groups.n_classes, generator=gen).double(), "perm")


def removed_of(plan, cand):
    return set(cand[~plan.kept[cand]].tolist())


def gid_of(groups, path):
    return groups.group_of(path).id


# -- brute-force references --------------------------------------------------------
def local_reference(groups, values, ratio):
    out = {}
    for gid, cand in candidates(groups).items():
        n = min(math.floor(ratio * cand.numel() + 1e-9), cand.numel() - (cand.numel() == groups[gid].size))
        out[gid] = set(sorted(cand.tolist(), key=lambda c: float(values[c]))[:n])
    return out


def pooled_reference(groups, values, ratio, pool, max_ratio=1.0):
    """Greedy over the pool's channels sorted by score, skipping groups at their cap."""
    cand = candidates(groups)
    caps = {gid: min(math.floor(max_ratio * cand[gid].numel() + 1e-9),
                     cand[gid].numel() - (cand[gid].numel() == groups[gid].size)) for gid in pool}
    chans = sorted(((float(values[c]), gid, c) for gid in pool for c in cand[gid].tolist()))
    total = math.floor(ratio * len(chans) + 1e-9)
    out = {gid: set() for gid in pool}
    for _, gid, c in chans:
        if total == 0:
            break
        if len(out[gid]) < caps[gid]:
            out[gid].add(c)
            total -= 1
    return out


# -- local ---------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_local_removes_ratio_of_each_group_lowest_first(groups, ratio):
    scores = perm_scores(groups)
    plan = select_channels(groups, scores, ratio=ratio)
    for gid, want in local_reference(groups, scores.values, ratio).items():
        assert removed_of(plan, candidates(groups)[gid]) == want
    assert plan.n_removed == sum(n for _, n in plan.removed_per_group)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0.0, 0.95), mode=st.sampled_from(["local", "global", "iso"]),
       max_ratio=st.floats(0.1, 1.0))
def test_matches_brute_force(seed, ratio, mode, max_ratio):
    torch.manual_seed(0)
    g = fxprune.analyze(chain().eval(), X)
    scores = perm_scores(g, seed)
    plan = select_channels(g, scores, ratio=ratio, global_ranking=mode == "global",
                           isomorphic=mode == "iso", max_ratio=max_ratio)
    if mode == "local":
        want = local_reference(g, scores.values, ratio)
    else:
        sets = isomorphic_sets(g, list(candidates(g))) if mode == "iso" else [list(candidates(g))]
        want = {}
        for pool in sets:
            want.update(pooled_reference(g, scores.values, ratio, pool, max_ratio))
    got = {gid: removed_of(plan, cand) for gid, cand in candidates(g).items()}
    assert got == want


# -- global --------------------------------------------------------------------
def test_global_takes_more_from_low_scoring_groups_up_to_the_cap(groups):
    values = torch.ones(groups.n_classes, dtype=torch.float64)
    low = gid_of(groups, "2.0.weight")  # A.mid: 6 channels, all scored lowest
    values[list(groups[low].classes)] = 1e-3
    scores = ChannelScores(values, "t")
    plan = select_channels(groups, scores, ratio=0.1, global_ranking=True)
    total = sum(c.numel() for c in candidates(groups).values())
    assert plan.n_removed == math.floor(0.1 * total)
    assert removed_of(plan, candidates(groups)[low]) == set(list(groups[low].classes)[:5])  # keeps one
    capped = select_channels(groups, scores, ratio=0.1, global_ranking=True, max_ratio=0.5)
    assert len(removed_of(capped, candidates(groups)[low])) == 3
    assert capped.n_removed == plan.n_removed  # the rest of the budget goes elsewhere


def test_per_module_ratio_overrides_and_leaves_the_pool(groups):
    net = chain()
    scores = perm_scores(groups)
    plan = select_channels(groups, scores, ratio=0.5, ratios=(("4.0", 0.8),), global_ranking=True)
    c = gid_of(groups, "4.0.weight")
    assert len(removed_of(plan, candidates(groups)[c])) == math.floor(0.8 * 10)
    plan = select_channels(groups, scores, ratio=0.5, ratios=(("4.0", 0.0),))
    assert len(removed_of(plan, candidates(groups)[c])) == 0
    r, _ = prune_and_verify(net, X, ratio=0.5, ratios={net[4][0]: 0.8})
    assert r.module.get_submodule("4.0").out_channels == 2


def test_ignore_keeps_the_group(groups):
    plan = select_channels(groups, perm_scores(groups), ratio=0.9, ignore=("3.0",), global_ranking=True)
    assert removed_of(plan, candidates(groups)[gid_of(groups, "3.0.weight")]) == set()
    assert set(candidates(groups, ("3.0",))) == set(candidates(groups)) - {gid_of(groups, "3.0.weight")}


# -- round_to ------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("round_to", [2, 3, 4])
@pytest.mark.parametrize("mode", ["local", "global", "iso"])
def test_round_to_keeps_multiples(groups, ratio, round_to, mode):
    plan = select_channels(groups, perm_scores(groups), ratio=ratio, round_to=round_to,
                           global_ranking=mode == "global", isomorphic=mode == "iso")
    unrounded = select_channels(groups, perm_scores(groups), ratio=ratio,
                                global_ranking=mode == "global", isomorphic=mode == "iso")
    for gid in candidates(groups):
        kept = int(plan.kept[list(groups[gid].classes)].sum())
        assert kept % round_to == 0 or kept == groups[gid].size
        assert kept >= int(unrounded.kept[list(groups[gid].classes)].sum())  # rounds up, never down


# -- isomorphic ----------------------------------------------------------------
def test_signature_equal_for_identical_blocks_only(groups):
    a, b, c = (gid_of(groups, f"{i}.0.weight") for i in (2, 3, 4))
    assert group_signature(groups, groups[a]) == group_signature(groups, groups[b])
    assert group_signature(groups, groups[a]) != group_signature(groups, groups[c])
    a2, b2 = gid_of(groups, "2.3.weight"), gid_of(groups, "3.3.weight")
    assert group_signature(groups, groups[a2]) != group_signature(groups, groups[b2])  # B2 feeds C
    assert sorted(map(sorted, isomorphic_sets(groups, list(candidates(groups))))) == \
        sorted(map(sorted, [[a, b]] + [[g] for g in candidates(groups) if g not in (a, b)]))


def test_signature_on_resnet20():
    g = fxprune.analyze(resnet20().eval(), torch.randn(1, 3, 32, 32))
    sets = isomorphic_sets(g, list(candidates(g)))
    names = [[g[i].members[0].path for i in s] for s in sets]
    assert ["layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer1.2.conv1.weight"] in names
    assert ["layer3.1.conv1.weight", "layer3.2.conv1.weight"] in names
    assert ["layer2.0.conv1.weight"] in names  # downsampling: its own set


def test_isomorphic_ranks_only_within_sets(groups):
    values = torch.ones(groups.n_classes, dtype=torch.float64)
    c = gid_of(groups, "4.0.weight")
    values[list(groups[c].classes)] = 1e-3  # globally C.mid would absorb the budget
    a, b = gid_of(groups, "2.0.weight"), gid_of(groups, "3.0.weight")
    values[list(groups[a].classes)] = 0.5  # A.mid below B.mid: A loses first inside {A, B}
    scores = ChannelScores(values, "t")
    glob = select_channels(groups, scores, ratio=0.25, global_ranking=True)
    iso = select_channels(groups, scores, ratio=0.25, isomorphic=True)
    cand = candidates(groups)
    assert len(removed_of(glob, cand[c])) == 9 and len(removed_of(glob, cand[a])) == 13 - 9
    assert len(removed_of(iso, cand[c])) == math.floor(0.25 * 10)
    assert len(removed_of(iso, cand[a])) + len(removed_of(iso, cand[b])) == 3
    assert len(removed_of(iso, cand[a])) == 3


def test_isomorphic_prunes_resnet20_through_the_oracle():
    torch.manual_seed(0)
    r, v = prune_and_verify(resnet20(), torch.randn(2, 3, 32, 32), ratio=0.4, isomorphic=True)
    assert v.exact_groups > 0
    p = fxprune.prune(resnet20().eval(), torch.randn(1, 3, 32, 32),
                      pipeline="channel-deps,score-magnitude,select{ratio=0.4,isomorphic=True},rewrite")
    assert "isomorphic=True" in p.pipeline


# -- never empty, degenerate inputs ------------------------------------------------
def test_never_empties_a_tensor():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    g = fxprune.analyze(net, X)
    plan = select_channels(g, perm_scores(g), ratio=0.99, global_ranking=True)
    for seg in g.segments:
        assert bool(plan.kept[seg].any())


def test_nan_scores_are_removed_last(groups):
    values = perm_scores(groups).values.clone()
    a = gid_of(groups, "2.0.weight")
    nan_class = groups[a].classes[0]
    values[nan_class] = float("nan")
    plan = select_channels(groups, ChannelScores(values, "t"), ratio=0.8)
    assert bool(plan.kept[nan_class])


def test_nothing_prunable():
    net = nn.Sequential(nn.Conv2d(3, 2, 1))
    g = fxprune.analyze(net, X)
    plan = select_channels(g, perm_scores(g), ratio=0.5, isomorphic=True)
    assert plan.n_removed == 0 and plan.removed_per_group == ()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ratio=0.0), r"max_ratio must be a number in \(0, 1\]"),
    (dict(max_ratio=1.5), r"max_ratio must be a number in \(0, 1\]"),
    (dict(round_to=0), "round_to must be a positive integer"),
    (dict(round_to=2.0), "round_to must be a positive integer"),
    (dict(ratio=1.0), r"ratio must be a number in \[0, 1\)"),
    (dict(ratios=(("2.0", 1.2),)), r"ratio for '2.0' must be"),
    (dict(ratios=(("nope", 0.2),)), "ratios names 'nope'"),
    (dict(ignore=("nope",)), "ignore names 'nope'.*e.g. 0, 2.0"),
])
def test_errors(groups, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select_channels(groups, perm_scores(groups), **kwargs)


@pytest.mark.parametrize("name", ["fxprune.plan", "fxprune.iterative"])
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


class CSPStage(nn.Module):
    """A cross-stage-partial stage: one conv's output is split in two halves; one half is
    the residual stream of two blocks whose last norm starts at zero (timm's init), the
    other bypasses them; both are concatenated. Both halves are one group (one conv made
    them), and the stream's channels all score low together."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.exp = nn.Conv2d(c, 2 * c, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) for _ in range(2))
        for b in self.blocks:
            nn.init.zeros_(b[3].weight)
        self.trans = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        bypass, stream = self.exp(torch.relu(self.stem(x))).chunk(2, dim=1)
        for b in self.blocks:
            stream = stream + b(stream)
        return self.head(torch.relu(self.trans(torch.cat([bypass, stream], 1))))


def test_local_ranking_takes_evenly_from_the_tensors_of_a_group():
    """Half of the split conv's 16 channels go, and no half loses more than half of its
    own plus one: ranked as one pool, the stream's low-scoring channels would all go (the
    stream then kept at most one channel)."""
    torch.manual_seed(0)
    model, x = CSPStage().eval(), torch.randn(1, 3, 8, 8)
    groups = fxprune.analyze(model, x)
    assert groups.group_of("exp.weight").size == 16
    result, _ = prune_and_verify(model, x, ratio=0.5, healthy=False)
    params = dict(result.module.named_parameters())
    assert params["exp.weight"].shape[0] == 8
    assert params["blocks.0.2.weight"].shape[0] >= 3  # the stream loses at most half of 8, plus one
    # the same scores ranked as one pool would strip the stream
    from fxprune.plan import _remove_lowest, candidates

    g = groups.group_of("exp.weight")
    assert groups.group_of("blocks.0.2.weight") is g
    pooled = torch.ones(groups.n_classes, dtype=torch.bool)
    _remove_lowest(pooled, result.scores.values, candidates(groups)[g.id], 8)
    stream = torch.unique(torch.cat([groups.class_of[a.labels.reshape(-1)] for a in groups.alignments
                                     if a.path == "blocks.0.2.weight" and a.role == "out"]))
    assert int(pooled[stream].sum()) <= 1


def test_budget_ratio_steps_reach_every_capped_plan():
    """The budget search evaluates plans only at ratio_steps: with the per-tensor caps of
    local ranking, every plan some ratio gives is still one of those."""
    from fxprune.passes.score_magnitude import magnitude_scores
    from fxprune.plan import select_channels
    from fxprune.budget import ratio_steps

    torch.manual_seed(0)
    groups = fxprune.analyze(CSPStage(c=6).eval(), torch.randn(1, 3, 8, 8))
    scores = magnitude_scores(groups)

    def plan(r):
        return tuple(select_channels(groups, scores, ratio=r).kept.tolist())

    at_steps = {plan(s) for s in ratio_steps(groups)}
    seen = {plan(k / 997) for k in range(997)}
    assert len(seen) > 5 and seen <= at_steps
