"""Runs of identical blocks under the export front end: one block exported, its graph
spliced in for every block (fxprune.capture.repeated). The spliced graph computes what
the model does, stays dynamic in the dims the model leaves free, reads each block's own
weights, prunes and passes the oracle; blocks that differ are never merged, and a block
whose behaviour its attributes do not show is caught by the check against the model and
exported whole."""

import pytest
import torch
from torch import nn

import fxprune
from fxprune.capture import repeated, trace
from tests.helpers.oracle import assert_untouched, prune_and_verify, snapshot

KEY = repeated.REPEATED_KEY


class Block(nn.Module):
    """A pre-norm transformer block with two heads and a gated MLP; ``window`` (None: all
    positions) limits what each position attends to."""

    def __init__(self, d=16, heads=2, hidden=24, layer_idx=0, window=None):
        super().__init__()
        self.layer_idx, self.heads, self.window = layer_idx, heads, window
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x, bias=None, scale: float = 1.0):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        if self.window is not None:
            pos = torch.arange(n, device=x.device)
            att = att.masked_fill((pos[None, :] - pos[:, None]).abs() > self.window, float("-inf"))
        if bias is not None:
            att = att + bias
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + scale * self.proj(y)
        return x + self.down(nn.functional.silu(self.gate(self.norm2(x))) * self.up(self.norm2(x)))


class Stack(nn.Module):
    def __init__(self, n=5, vocab=32, d=16, windows=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        windows = windows or [None] * n
        self.layers = nn.ModuleList(Block(d, layer_idx=i, window=w) for i, w in enumerate(windows))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        n = ids.shape[1]
        bias = torch.zeros(n, n, device=ids.device)  # an input every block gets
        for layer in self.layers:
            x = layer(x, bias, scale=0.5)
        return self.head(x)


def _ids(n=12, seed=0):
    return torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    torch.manual_seed(0)
    return Stack(**kw).eval()


def test_identical_blocks_are_exported_once_and_spliced_for_each():
    model, ids = _model(), _ids()
    before = snapshot(model)
    gm = trace(model, ids, frontend="export")
    assert gm.meta[KEY].startswith("5 blocks in 1 run(s) spliced from 1 exported block graph(s)"), gm.meta[KEY]
    assert_untouched(model, before)
    assert "forward" not in model.layers[0].__dict__  # the stubs are gone
    assert not any(n.target is torch.ops.fxprune.block.default for n in gm.graph.nodes)
    # every block reads its own weights, and the graph computes what the model does
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {f"layers.{i}.qkv.weight" for i in range(5)} <= reads
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids))
        other = _ids(n=7, seed=1)  # the sequence length stays dynamic
        torch.testing.assert_close(gm(other), model(other))


def test_spliced_capture_prunes_and_passes_the_oracle():
    model, ids = _model(), _ids()
    result, v = prune_and_verify(model, ids, ratio=0.3, frontend="export", healthy=False)
    assert v.groups_checked > 0
    # each block's MLP lost channels of its own (its own weights were scored and sliced)
    widths = [result.module.get_parameter(f"layers.{i}.up.weight").shape[0] for i in range(5)]
    assert all(w < 24 for w in widths), widths
    with torch.no_grad():
        assert result.module(_ids(n=9, seed=2)).shape == (2, 9, 32)


def test_blocks_that_differ_in_a_setting_are_not_merged():
    windows = [None, None, 2, None, None, None, None]
    model = _model(n=7, windows=windows)
    runs = repeated.find_runs(model)
    # [0,1] is too short, [2] differs, [3..6] is a run of four
    assert [[p for p, _ in run] for run in runs] == [[f"layers.{i}" for i in range(3, 7)]]
    ids = _ids()
    gm = trace(model, ids, frontend="export")
    assert gm.meta[KEY].startswith("4 blocks"), gm.meta[KEY]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids))
    prune_and_verify(model, ids, ratio=0.3, frontend="export", healthy=False)


class Hidden(Block):
    """A block whose behaviour depends on a per-layer value no attribute shows."""

    SCALES = [1.0, 1.0, 1.0, -3.0, 1.0]

    def forward(self, x, bias=None, scale: float = 1.0):
        return super().forward(x, bias, scale) * self.SCALES[self.layer_idx]


def test_a_block_that_behaves_differently_is_caught_and_the_model_exported_whole():
    model = _model()
    model.layers = nn.ModuleList(Hidden(layer_idx=i) for i in range(5))
    model.layers.load_state_dict(_model().layers.state_dict())
    ids = _ids()
    gm = trace(model, ids, frontend="export")
    assert gm.meta[KEY].startswith("not used: the spliced graph does not compute what the model does"), gm.meta[KEY]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids))
    assert "forward" not in model.layers[3].__dict__


class Act(Block):
    def forward(self, x, act=None):
        return act(super().forward(x))


class Odd(nn.Module):
    """Blocks called with an argument that is neither a tensor nor a plain value (a
    function): such a call runs the block's own forward, traced as it is."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Act(layer_idx=i) for i in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, act=torch.tanh)
        return x


def test_a_block_called_with_an_object_argument_is_traced_as_it_is():
    torch.manual_seed(0)
    model = Odd().eval()
    x = torch.randn(2, 6, 16)
    assert len(repeated.find_runs(model)) == 1
    gm = trace(model, x, frontend="export")
    assert gm.meta[KEY].startswith("not used: no block of a run was called with tensors and plain values"), \
        gm.meta[KEY]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert "forward" not in model.layers[0].__dict__


def test_llama_shaped_hugging_face_model_uses_the_spliced_capture():
    T = pytest.importorskip("transformers")
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                        initializer_range=0.2, use_cache=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    result, _ = prune_and_verify(model, ids, ratio=0.25, healthy=False, frontend="export")
    assert result.frontend == "export"
    gm = trace(model, ids, frontend="export")
    assert gm.meta[KEY].startswith("4 blocks in 1 run(s)"), gm.meta[KEY]


def test_a_model_on_the_meta_device_is_analysed_without_weights():
    T = pytest.importorskip("transformers")
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64, use_cache=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    gm = trace(model, ids, frontend="export")
    assert gm.meta[KEY].startswith("6 blocks"), gm.meta[KEY]
    assert all(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()])
    groups = fxprune.analyze(model, ids)  # the followed symbolic trace: values on the meta device
    assert groups.frontend == "fx"
    assert all(p.device.type == "meta" for p in model.parameters())
    # every layer's MLP is a prunable group of its own, its 96 channels free
    mlp = [g for g in groups.prunable if any(m.path.endswith("mlp.up_proj.weight") and m.dim == 0 for m in g.members)]
    assert len(mlp) == 6 and all(len(g.prunable) == 96 for g in mlp)
