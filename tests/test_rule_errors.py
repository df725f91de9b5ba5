"""A rule that declines a node (``Unsupported``) pins its channels with the reason; a
rule that fails otherwise is a bug and is raised (``RuleError``), unless the analysis
is asked to keep going (``strict=False``: pinned, the reason says it is a bug)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import RuleError, Unsupported
from fxprune.passes_base import parse_pipeline
from fxprune.rules.registry import register
from fxprune.analysis import analyze_channels


class Declines(nn.Module):
    def forward(self, x):
        return x * 2


class Breaks(nn.Module):
    def forward(self, x):
        return x * 3


@register(Declines)
def _declines(ctx, node):
    raise Unsupported("this form of the op is not analysed")


@register(Breaks)
def _breaks(ctx, node):
    return {}["missing"]  # a bug: a KeyError


class Net(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(4, 8), inner, nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.inner(torch.relu(self.a(x))))


def _gm(inner):
    return fxprune.trace(Net(inner).eval(), torch.randn(2, 4), leaf_modules=[type(inner)])


def test_a_declined_node_is_a_barrier_with_the_rules_reason():
    groups = analyze_channels(_gm(Declines()))
    assert any("does not analyse" in b and "this form of the op is not analysed" in b for b in groups.barriers)
    assert not groups.group_of("a.weight").is_prunable


def test_a_rule_that_fails_is_a_bug_and_is_raised():
    with pytest.raises(RuleError, match=r"rule _breaks failed on .*KeyError.*bug in fxprune's rule"):
        analyze_channels(_gm(Breaks()))
    with pytest.raises(RuleError):
        fxprune.prune(Net(Breaks()).eval(), torch.randn(2, 4), ratio=0.5, leaf_modules=[Breaks])


def test_strict_false_keeps_going_and_names_the_bug():
    groups = analyze_channels(_gm(Breaks()), strict=False)
    assert any("a bug in the rule" in b for b in groups.barriers)
    assert not groups.group_of("a.weight").is_prunable
    assert parse_pipeline("channel-deps{strict=False}").passes[0].strict is False
