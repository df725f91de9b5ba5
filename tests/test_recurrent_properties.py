"""Property tests: fxprune.testing.recurrent_nets draws nn.LSTM / nn.GRU / nn.RNN networks
(1 or 2 layers, bidirectional or not, batch-first or sequence-first, LSTM projections, an
input linear layer or none, the final hidden state used or not); for each, pruning the
hidden units (every gate block, every layer and direction) and the linear layers around
them satisfies the oracle exactly, and the pruned module's sizes match its weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.helpers.properties import property_settings
from fxprune.testing import recurrent_nets
from tests.helpers.oracle import prune_and_verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@property_settings("recurrent_nets", suppress_health_check=[HealthCheck.too_slow])
@given(drawn=recurrent_nets(), ratio=st.sampled_from([0.25, 0.5, 0.7]))
def test_random_recurrent_nets_prune_exactly(drawn, ratio):
    model, (x,) = drawn
    cfg = model.drawn_config
    # a projected LSTM's cell stays wider than its projection: at a low ratio the cell
    # may keep every unit (nothing else to prune when no layer comes before it)
    proj = cfg["proj_size"]
    result, v = prune_and_verify(model, x, ratio=ratio, healthy=False, min_effect=0.0, expect_removed=not proj)
    assert v.inexact_groups == 0
    rnn = result.module.get_submodule("rnn")
    assert rnn.hidden_size < cfg["hidden_size"] or proj
    assert not proj or rnn.proj_size < rnn.hidden_size
    assert rnn.weight_hh_l0.shape[1] == (rnn.proj_size or rnn.hidden_size)
    assert rnn.weight_ih_l0.shape == (rnn.weight_hh_l0.shape[0], rnn.input_size)
    assert (rnn.num_layers, rnn.bidirectional, rnn.batch_first) == \
        (cfg["num_layers"], cfg["bidirectional"], cfg["batch_first"])
    with torch.no_grad():
        assert result.module(x).shape == model(x).shape
