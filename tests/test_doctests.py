"""The numpydoc Examples of the core modules run as doctests."""

import doctest
import importlib

import pytest

MODULES = ["fxprune.labels", "fxprune.capture", "fxprune.api", "fxprune.passes_base",
           "fxprune.scoring", "fxprune.calibration", "fxprune.passes.score_bn_scale", "fxprune.passes.score_fpgm",
           "fxprune.passes.score_hessian", "fxprune.passes.score_lamp", "fxprune.passes.score_random", "fxprune.passes.score_taylor",
           "fxprune.group_graph", "fxprune.statistics", "fxprune.activation_scores", "fxprune.dead_channels",
           "fxprune.plan"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
