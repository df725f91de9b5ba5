"""Property tests: fxprune.testing.attention_blocks draws attention blocks (random heads,
head_dim, kv groups, fused or separate projections, explicit, SDPA or linear (kernelized:
k^T v crosses two operands' channels) attention, rotary or not, causal or not, a residual
LayerNorm or not); for each, pruning by head_dim and by whole heads satisfies the oracle on
exact groups, the graph lints and the generated code runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.helpers.properties import property_settings
from fxprune.testing import attention_blocks
from tests.helpers.oracle import prune_and_verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _policy_and_block(policy):
    # "both" needs heads to remove
    return st.tuples(st.just(policy), attention_blocks(min_heads=2 if policy == "both" else 1))


@property_settings("attention_blocks", suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(["inner", "outer", "both"]).flatmap(_policy_and_block),
       gqa=st.sampled_from(["kv_groups", "q_heads"]))
def test_random_attention_blocks_prune_exactly(case, gqa):
    policy, (model, (x,)) = case
    result, v = prune_and_verify(model, x, ratio=0.5, policy=policy, gqa=gqa, healthy=False,
                                 min_effect=0.0, expect_removed=False)
    with torch.no_grad():
        assert result.module(x).shape == (*x.shape[:2], 3)
    assert v.max_rel_err < 1e-4
    removed = sum(s.plan.n_removed for s in result.stages) if result.stages else result.plan.n_removed
    assert removed > 0 and result.report.after.params < result.report.before.params
