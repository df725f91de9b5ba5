"""Property tests: fxprune.testing.mixed_nets draws hybrids of the families (a conv stem
with BatchNorm, its feature map flattened or permuted into tokens, a position embedding,
pre-norm attention and GELU MLP blocks with LayerNorm and residuals); for each, pruning
satisfies the oracle on exact groups, the graph lints and the pruned model runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.helpers.properties import property_settings
from fxprune.testing import mixed_nets
from tests.helpers.oracle import prune_and_verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@property_settings("mixed_nets", suppress_health_check=[HealthCheck.too_slow])
@given(drawn=mixed_nets(), ratio=st.sampled_from([0.25, 0.5, 0.7]),
       policy=st.sampled_from(["inner", "outer"]))
def test_random_mixed_nets_prune_exactly(drawn, ratio, policy):
    model, (x,) = drawn
    result, v = prune_and_verify(model, x, ratio=ratio, policy=policy, healthy=False,
                                 min_effect=0.0, expect_removed=False)
    assert v.max_rel_err < 1e-4
    assert result.plan.n_removed > 0 and result.report.after.params < result.report.before.params
    with torch.no_grad():
        assert result.module(x).shape == (x.shape[0], 3)
