"""LSTM, GRU and RNN language models: hidden units prune with every gate block,
across layers and directions, under the oracle (which zeroes removed hidden
units' recurrent weight columns inside the module)."""

import pytest
import torch
from torch import nn

import fxprune
from oracle import prune_and_verify


class LM(nn.Module):
    def __init__(self, cell, layers=1, bidirectional=False, batch_first=True):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.rnn = cell(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 30)
        self.batch_first = batch_first

    def forward(self, ids):
        x = self.embed(ids if self.batch_first else ids.t())
        out, _ = self.rnn(x)
        return self.head(out)


CASES = {
    "lstm": lambda: LM(nn.LSTM),
    "gru": lambda: LM(nn.GRU),
    "rnn": lambda: LM(nn.RNN),
    "lstm_2layer_bidirectional": lambda: LM(nn.LSTM, layers=2, bidirectional=True),
    "gru_2layer_seq_first": lambda: LM(nn.GRU, layers=2, batch_first=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recurrent_lms_prune_exactly(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    ids = torch.randint(0, 30, (2, 7))
    result, v = prune_and_verify(model, ids, ratio=0.5, healthy=False)
    rnn = result.module.rnn
    assert rnn.hidden_size == 8
    assert rnn.input_size == 6
    assert rnn.weight_hh_l0.shape[1] == 8


def test_gate_blocks_move_together():
    groups = fxprune.analyze(LM(nn.LSTM), torch.randint(0, 30, (1, 5)))
    g = groups.group_of("rnn.weight_hh_l0")
    assert g.size == 16  # 16 hidden units, each owning one row in each of the 4 gate blocks
    rows = {m.path for m in g.members}
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "head.weight"} <= rows


class ProjLM(nn.Module):
    """An LSTM with projections (h = W_hr (o * tanh(c))), using both returned states."""

    def __init__(self, layers, bidirectional):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.rnn = nn.LSTM(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True,
                           proj_size=6)
        d = 2 if bidirectional else 1
        self.head = nn.Linear(6 * d, 30)
        self.h_head = nn.Linear(6, 30)
        self.c_head = nn.Linear(16, 30)

    def forward(self, ids):
        out, (h, c) = self.rnn(self.embed(ids))
        return self.head(out) + self.h_head(h[-1]).unsqueeze(1) + self.c_head(c[-1]).unsqueeze(1)


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_lstm_projection_prunes_cells_and_projections(layers, bidirectional):
    """The cell's hidden units (gate rows, projection columns, c) and the projected units
    (projection rows, recurrent columns, output, h, the next layer's input) are two
    groups, both pruned; the module's sizes follow the weights."""
    torch.manual_seed(0)
    model = ProjLM(layers, bidirectional).eval()
    ids = torch.randint(0, 30, (2, 7))
    groups = fxprune.analyze(model, ids)
    cells, projected = groups.group_of("rnn.weight_ih_l0"), groups.group_of("rnn.weight_hr_l0")
    assert (cells.size, projected.size) == (16, 6) and cells is not projected
    assert {"rnn.weight_hh_l0", "c_head.weight"} <= {m.path for m in cells.members}
    assert {"rnn.weight_hh_l0", "h_head.weight", "head.weight"} <= {m.path for m in projected.members}
    result, _ = prune_and_verify(model, ids, ratio=0.5, healthy=False)
    rnn = result.module.rnn
    assert (rnn.hidden_size, rnn.proj_size, rnn.input_size) == (8, 3, 6)
    assert rnn.weight_hh_l0.shape == (32, 3) and rnn.weight_hr_l0.shape == (3, 8)
    with torch.device("meta"):  # the sizes the module states are the ones its weights have
        import copy

        copy.deepcopy(rnn).to("meta")(torch.empty(2, 7, 6))
