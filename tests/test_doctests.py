"""The numpydoc Examples of the core modules run as doctests."""

import doctest
import importlib

import pytest

MODULES = ["fxprune.labels", "fxprune.capture", "fxprune.api", "fxprune.passes_base",
           "passes.score_magnitude", "fxprune.calibration", "passes.score_bn_scale", "passes.score_fpgm",
           "passes.score_hessian", "passes.score_lamp", "passes.score_random", "passes.score_taylor",
           "fxprune.group_graph"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
