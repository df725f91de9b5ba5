"""LSTM, GRU and RNN language models: hidden units prune with every gate block,
across layers and directions, under the oracle (which zeroes removed hidden
units' recurrent weight columns inside the module)."""

import pytest
import torch
from torch import nn

import fxprune
from tests.helpers.oracle import prune_and_verify


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


class StatefulLM(nn.Module):
    """A layer given its initial state, made in forward with torch.zeros of literal sizes
    (hidden units along the last dim), or passed in from an encoder's final state."""

    def __init__(self, cell, layers=2, bidirectional=True, from_encoder=False):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.enc = nn.GRU(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.rnn = cell(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 30)
        self.states = layers * (2 if bidirectional else 1)
        self.from_encoder = from_encoder

    def forward(self, ids):
        x = self.embed(ids)
        h0 = torch.zeros(self.states, ids.shape[0], 16)
        if self.from_encoder:
            h0 = self.enc(x)[1] + h0
        hx = (h0, torch.zeros(self.states, ids.shape[0], 16)) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(x, hx)
        return self.head(out)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cell, from_encoder", [(nn.LSTM, False), (nn.GRU, False), (nn.RNN, True), (nn.LSTM, True)],
                         ids=["lstm", "gru", "rnn-encoder-state", "lstm-encoder-state"])
def test_initial_states_follow_the_hidden_units(cell, from_encoder, frontend):
    torch.manual_seed(0)
    model = StatefulLM(cell, from_encoder=from_encoder).eval()
    result, v = prune_and_verify(model, torch.randint(0, 30, (2, 7)), ratio=0.5, healthy=False, frontend=frontend)
    assert not result.groups.barriers
    assert result.module.get_parameter("rnn.weight_hh_l0").shape[1] == 8
    if from_encoder:  # the encoder's final state is the decoder's initial one: they prune together
        assert result.module.get_parameter("enc.weight_hh_l0").shape[1] == 8


class CellLoop(nn.Module):
    """A cell stepped over time in forward, with a zero initial state of a literal hidden size
    (``x.new_zeros(x.shape[0], 16)`` or ``torch.zeros(x.shape[0], 16)``: both trace, the size is rewritten)."""

    def __init__(self, cell, zeros):
        super().__init__()
        self.cell, self.head = cell(6, 16), nn.Linear(16, 3)
        self.lstm = cell is nn.LSTMCell
        self.zeros = zeros

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 16) if self.zeros == "new_zeros" else torch.zeros(x.shape[0], 16)
        state = (h, torch.zeros_like(h)) if self.lstm else h
        for t in range(5):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.lstm else state)


@pytest.mark.parametrize("zeros, frontend", [("new_zeros", "fx"), ("new_zeros", "export"), ("zeros", "auto")])
@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_stepped_in_forward_prune_their_hidden_units(cell, zeros, frontend):
    torch.manual_seed(0)
    result, v = prune_and_verify(CellLoop(cell, zeros).eval(), torch.randn(2, 5, 6), ratio=0.5, healthy=False,
                                 frontend=frontend)
    assert result.frontend == ("export" if frontend == "export" else "fx")  # auto: fx traces both factories
    assert not result.groups.barriers and v.exact_groups == 1
    w_hh = result.module.get_parameter("cell.weight_hh")
    assert w_hh.shape[1] == 8 and w_hh.shape[0] == 8 * {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}[cell]
    if result.frontend == "fx":
        assert result.module.cell.hidden_size == 8


@pytest.mark.parametrize("make", [lambda: LM(nn.LSTM, layers=2, bidirectional=True), lambda: LM(nn.GRU),
                                  lambda: ProjLM(2, True)], ids=["lstm-2-bidirectional", "gru", "lstm-proj"])
def test_exported_recurrent_ops_prune_like_the_modules(make):
    torch.manual_seed(0)
    result, v = prune_and_verify(make().eval(), torch.randint(0, 30, (2, 7)), ratio=0.5, healthy=False,
                                 frontend="export")
    assert result.frontend == "export" and not result.groups.barriers
    w_ih = result.module.get_parameter("rnn.weight_ih_l0")
    assert w_ih.shape[1] == 6  # the embedding's 12 features, halved
    assert w_ih.shape[0] in (4 * 8, 3 * 8)  # every gate block lost the same 8 of 16 hidden units


@pytest.mark.parametrize("make", [lambda: LM(nn.LSTM, layers=2, bidirectional=True), lambda: ProjLM(2, True),
                                  lambda: StatefulLM(nn.GRU)], ids=["lstm", "lstm-proj", "gru-with-state"])
def test_pruned_recurrent_models_save_and_load_bit_exact(make, tmp_path):
    # a recurrent layer's flat weight list (weak references) is rebuilt by the layer on load
    torch.manual_seed(0)
    model, ids = make().eval(), torch.randint(0, 30, (2, 7))
    result, _ = prune_and_verify(model, ids, ratio=0.5, healthy=False)
    fxprune.save(result, tmp_path / "rnn")
    loaded = fxprune.load(tmp_path / "rnn")
    assert loaded.rnn.hidden_size == 8
    assert torch.equal(loaded(ids), result.module(ids))


def test_a_projected_lstm_keeps_its_cell_wider_than_its_projection():
    """torch needs proj_size < hidden_size and reads such a layer out of bounds (wrong
    outputs): selection keeps the cell wider than the projection, and the rewrite refuses
    a plan that does not (a hand-made one here)."""
    from fxprune.errors import RewriteError
    from fxprune.rewrite import rewrite_graph

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(5, 4, num_layers=2, proj_size=3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    for ratio in (0.5, 0.7, 0.9):
        result, _ = prune_and_verify(Net().eval(), x, ratio=ratio, healthy=False)
        m = result.module.rnn
        assert m.proj_size < m.hidden_size, (ratio, m.proj_size, m.hidden_size)
    groups = result.groups
    hidden = groups.group_of("rnn.weight_ih_l0", "out")
    kept = torch.ones(groups.n_classes, dtype=torch.bool)
    kept[torch.tensor(hidden.classes[:3])] = False  # 1 hidden unit left, 3 projected
    with pytest.raises(RewriteError, match=r"rnn: the plan keeps 1 hidden units and 3 projected units.*ignore="):
        rewrite_graph(groups, kept)
