"""Property-based tests: fxprune.testing.cnn_dags draws random CNN DAGs, valid by
construction (dense/grouped/depthwise conv, bn, act, add, gating, cat, split, a pooled or
flattened linear head); for each, pruning must satisfy the oracle, lint, leave the input
untouched, and round-trip through save/load bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import fxprune
from tests.helpers.properties import property_settings
from fxprune.testing import CnnDag, cnn_dags
from tests.helpers.oracle import prune_and_verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPATIAL = 6


@property_settings("cnn_dags", suppress_health_check=[HealthCheck.too_slow])
@given(drawn=cnn_dags(), ratio=st.sampled_from([0.25, 0.5, 0.7]))
def test_random_cnn_dags_prune_exactly(drawn, ratio, tmp_path_factory):
    model, (x,) = drawn
    result, v = prune_and_verify(model, x, ratio=ratio, healthy=False, min_effect=0.0, expect_removed=False)
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
    model = CnnDag(program, channels)
    result, v = prune_and_verify(model, torch.randn(2, 3, SPATIAL, SPATIAL), ratio=0.5)
    assert v.effect > 1e-3
