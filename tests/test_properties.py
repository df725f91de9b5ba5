"""Property-based tests: hypothesis builds random CNN DAGs that are valid by
construction (conv/bn/act/add/cat/split/depthwise/grouped/flatten-linear); for
each, pruning must satisfy the oracle, lint, leave the input untouched, and
round-trip through save/load bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from oracle import prune_and_verify

SPATIAL = 6


class RandomNet(nn.Module):
    """Interprets a program of steps; every step appends one tensor."""

    def __init__(self, program, channels, out_features=3):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()
        for i, step in enumerate(program):
            kind = step[0]
            if kind == "conv":
                _, src, cout, k, groups = step
                self.layers[str(i)] = nn.Conv2d(channels[src], cout, k, padding=k // 2, groups=groups)
            elif kind == "dw":
                _, src, mult = step
                c = channels[src]
                self.layers[str(i)] = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
            elif kind == "bn":
                self.layers[str(i)] = nn.BatchNorm2d(channels[step[1]])
        self.head = nn.Linear(channels[-1], out_features)

    def forward(self, x):
        values = [x]
        for i, step in enumerate(self.program):
            kind, src = step[0], step[1]
            v = values[src]
            if kind in ("conv", "dw", "bn"):
                out = self.layers[str(i)](v)
            elif kind == "act":
                out = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh}[step[2]](v)
            elif kind == "add":
                out = v + values[step[2]]
            elif kind == "mul":
                out = v * torch.sigmoid(values[step[2]].mean((2, 3), keepdim=True))
            elif kind == "cat":
                out = torch.cat([v, values[step[2]]], 1)
            elif kind == "split":
                _, _, first, take = step
                parts = torch.split(v, [first, v.shape[1] - first], 1)
                out = parts[take]
            values.append(out)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(values[-1], 1), 1))


@st.composite
def programs(draw):
    channels = [3]
    program = []
    n_steps = draw(st.integers(2, 9))
    for _ in range(n_steps):
        src = draw(st.integers(0, len(channels) - 1))
        c = channels[src]
        same = [j for j, cj in enumerate(channels) if cj == c and j != src]
        kinds = ["conv", "conv", "bn", "act", "dw"]
        if same:
            kinds += ["add", "mul"]
        if len(channels) > 1:
            kinds += ["cat"]
        if c >= 2:
            kinds += ["split"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            cout = draw(st.sampled_from([4, 6, 8, 12]))
            divisors = [g for g in (1, 2, 3, 4) if c % g == 0 and cout % g == 0]
            step = ("conv", src, cout, draw(st.sampled_from([1, 3])), draw(st.sampled_from(divisors)))
            channels.append(cout)
        elif kind == "dw":
            mult = draw(st.sampled_from([1, 2]))
            step = ("dw", src, mult)
            channels.append(c * mult)
        elif kind in ("bn", "act"):
            step = ("bn", src) if kind == "bn" else ("act", src, draw(st.sampled_from(["relu", "silu", "tanh"])))
            channels.append(c)
        elif kind in ("add", "mul"):
            step = (kind, src, draw(st.sampled_from(same)))
            channels.append(c)
        elif kind == "cat":
            other = draw(st.integers(0, len(channels) - 1))
            step = ("cat", src, other)
            channels.append(c + channels[other])
        else:
            first = draw(st.integers(1, c - 1))
            take = draw(st.integers(0, 1))
            step = ("split", src, first, take)
            channels.append(first if take == 0 else c - first)
        program.append(step)
    # end with a conv so the head always sees learned channels
    program.append(("conv", len(channels) - 1, 8, 1, 1))
    channels.append(8)
    return program, channels


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(prog=programs(), ratio=st.sampled_from([0.25, 0.5, 0.7]), seed=st.integers(0, 2**16))
def test_random_cnn_dags_prune_exactly(prog, ratio, seed, tmp_path_factory):
    program, channels = prog
    torch.manual_seed(seed)
    model = RandomNet(program, channels)
    x = torch.randn(2, 3, SPATIAL, SPATIAL)
    result, v = prune_and_verify(model, x, ratio=ratio, min_effect=0.0, expect_removed=False)
    assert v.inexact_groups == 0
    assert result.report.after.macs <= result.report.before.macs
    if result.plan.n_removed:
        assert result.report.after.params < result.report.before.params
    folder = tmp_path_factory.mktemp("saved") / "net"
    fxprune.save(result, folder)
    loaded = fxprune.load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.module(x))


def test_a_known_dag_prunes_and_changes_output_measurably():
    """A fixed program (residual, cat, split, grouped, depthwise) where the removed
    channels matter: the oracle must see an effect."""
    program = [("conv", 0, 8, 3, 1), ("bn", 1), ("act", 2, "relu"), ("conv", 3, 8, 3, 2),
               ("add", 4, 3), ("dw", 5, 2), ("split", 6, 6, 1), ("cat", 7, 3), ("conv", 8, 8, 1, 1)]
    channels = [3, 8, 8, 8, 8, 8, 16, 10, 18, 8]
    torch.manual_seed(0)
    model = RandomNet(program, channels)
    result, v = prune_and_verify(model, torch.randn(2, 3, SPATIAL, SPATIAL), ratio=0.5)
    assert v.effect > 1e-3
