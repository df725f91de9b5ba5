"""The numpydoc Examples of the core modules run as doctests."""

import doctest
import importlib

import pytest

MODULES = ["fxprune.labels", "fxprune.capture", "fxprune.api", "fxprune.passes_base",
           "passes.score_magnitude"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
