"""torch.compile(model, backend="fxprune"): the entry point, lossless and pruning modes,
graph breaks, `then` backends, and the graphs it refuses (compiled unpruned, never wrong).

Every pruned graph goes through the oracle (fxprune.verify) and is compared with eager;
inductor compiles are the slow part, so only two small ones run."""

from __future__ import annotations

import doctest
import importlib.metadata
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.backend import CompiledGraph, FxpruneBackend, fxprune_backend
from fxprune.blocks import BertBlock
from fxprune.errors import ConfigError

from .helpers.healthy import make_healthy
from .helpers.oracle import assert_untouched, snapshot


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_torch_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- models -------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.down(x))


class SlimResNet(nn.Module):
    """A small ResNet; ``graph_break`` splits it in two graphs after the first stage."""

    def __init__(self, width=16, graph_break=False):
        super().__init__()
        self.graph_break = graph_break
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = Block(width, width)
        self.stage2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        x = self.stage2(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def slimmed(model: nn.Module, x: torch.Tensor, every: int = 3) -> nn.Module:
    """Healthy statistics, then every ``every``-th scale of the inner norms zeroed, as
    network slimming leaves them: those channels carry a constant (their shift)."""
    make_healthy(model, x.shape)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.1  # make_healthy's cumulative average done: the default again
                if name.endswith("bn1"):
                    mod.weight[::every] = 0.0
    return model.eval()


def resnet(graph_break=False, width=16, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 16, 16)
    return slimmed(SlimResNet(width, graph_break), x), x


class TwoBlocks(nn.Module):
    """Two transformer blocks, optionally with a graph break between them."""

    def __init__(self, graph_break=False):
        super().__init__()
        self.graph_break = graph_break
        self.a, self.b = BertBlock(32, 4, 64), BertBlock(32, 4, 64)

    def forward(self, x):
        x = self.a(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.b(x)


def transformer(graph_break=False, seed=0, dead_ffn=True):
    """Two BERT blocks; with ``dead_ffn`` a quarter of each FFN's hidden units have zero
    rows and bias in fc1 (gelu(0) = 0: dead, as group lasso leaves them)."""
    torch.manual_seed(seed)
    model = TwoBlocks(graph_break).eval()
    if dead_ffn:
        with torch.no_grad():
            for blk in (model.a, model.b):
                blk.fc1.weight[::4] = 0.0
                blk.fc1.bias[::4] = 0.0
    return model, torch.randn(3, 8, 32)


def lossless_available() -> bool:
    try:
        import fxprune.dead_channels  # noqa: F401
    except ImportError:
        return False
    return True


needs_lossless = pytest.mark.skipif(not lossless_available(),
                                    reason="fxprune.dead_channels (lossless dead-channel elimination) is absent")


# -- checks -------------------------------------------------------------------------
def run(compiled, x):
    with torch.no_grad():
        return compiled(x)


def assert_varies(y: torch.Tensor) -> None:
    """Not a degenerate output a wrong model could match by chance."""
    assert y.abs().max() > 1e-2 and y.std() > 1e-3
    assert (y[0] - y[1]).abs().max() > 1e-4, "the outputs do not depend on the inputs"


def assert_pruned_and_verified(record: CompiledGraph) -> None:
    """The graph handed on is smaller, and the oracle accepts it."""
    assert record.reason is None, record.reason
    assert record.pruned and record.params_after < record.params_before, record
    assert record.result.plan.n_removed > 0
    assert record.module is record.result.module
    record.module.graph.lint()
    v = fxprune.verify(record.graph, record.result, record.example_inputs)
    assert v.max_rel_err < 1e-4 and v.groups_checked > 0, v.summary()
    # what the backend built has fewer and smaller constants than Dynamo's graph
    before = {tuple(t.shape) for t in record.graph.parameters()}
    after = {tuple(t.shape) for t in record.module.parameters()}
    assert after - before, "no constant got smaller"


def assert_boundaries_kept(record: CompiledGraph) -> None:
    """The pruned graph takes and returns tensors of the original graph's shapes (what
    crosses a graph break keeps its channels)."""
    with torch.no_grad():
        ref, got = record.graph(*record.example_inputs), record.module(*record.example_inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert [tuple(t.shape) for t in ref] == [tuple(t.shape) for t in got]


def close(a, b, rtol=1e-5):
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= rtol * scale + 1e-6


# -- registration -------------------------------------------------------------------
def test_entry_point_names_the_backend():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "fxprune" in eps.names
    assert eps["fxprune"].load() is fxprune_backend
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert lookup_backend("fxprune") is fxprune_backend
    assert "fxprune" in list_backends(exclude_tags=())
    assert callable(fxprune.backend) and isinstance(fxprune.backend(then="eager"), FxpruneBackend)


def test_doctest():
    result = doctest.testmod(sys.modules["fxprune.backend"])
    assert result.attempted > 0 and result.failed == 0


# -- pruning mode -------------------------------------------------------------------
def test_by_name_with_options_equals_fxprune_prune():
    """torch.compile(..., backend="fxprune", options=...): the compiled model computes what
    fxprune.prune's module computes (same graph, same scores, same plan)."""
    model, x = resnet()
    before = snapshot(model)
    with torch.no_grad():
        expected = fxprune.prune(model, x, ratio=0.5).module(x)
    compiled = torch.compile(model, backend="fxprune", fullgraph=True,
                             options={"ratio": 0.5, "then": "eager"})
    y = run(compiled, x)
    assert_varies(y)
    assert close(y, expected)
    with torch.no_grad():
        assert not close(y, model(x), rtol=1e-3)  # half the channels went
    assert_untouched(model, before)


def test_pruning_mode_fullgraph_eager_resnet():
    model, x = resnet()
    before = snapshot(model)
    be = fxprune.backend(ratio=0.5, importance="l1", then="eager", strict=True)
    y = run(torch.compile(model, backend=be, fullgraph=True), x)
    (record,) = be.records
    assert_pruned_and_verified(record)
    assert record.verify is not None and record.verify.complete
    with torch.no_grad():
        assert torch.equal(y, record.module(x)[0])
        assert close(y, fxprune.prune(model, x, ratio=0.5, importance="l1").module(x))
    assert_varies(y)
    assert_untouched(model, before)


def test_pruning_mode_graph_break_prunes_each_graph_and_keeps_the_boundary():
    model, x = resnet(graph_break=True)
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    y = run(torch.compile(model, backend=be), x)
    assert len(be.records) == 2
    for record in be.records:
        assert_pruned_and_verified(record)
        assert_boundaries_kept(record)
    # each half pruned on its own, the tensor between them whole
    first = nn.Sequential(model.stem, model.stage1).eval()
    second = nn.Sequential(model.stage2, nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc).eval()
    with torch.no_grad():
        pa = fxprune.prune(first, x, ratio=0.5).module
        pb = fxprune.prune(second, first(x), ratio=0.5).module
        assert close(y, pb(pa(x)))
    assert_varies(y)


def test_pruning_mode_transformer_graph_break_eager():
    model, x = transformer(graph_break=True, dead_ffn=False)
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    y = run(torch.compile(model, backend=be), x)
    assert len(be.records) == 2
    for record in be.records:
        assert_pruned_and_verified(record)
        assert_boundaries_kept(record)
    with torch.no_grad():
        pa = fxprune.prune(model.a, x, ratio=0.5).module
        pb = fxprune.prune(model.b, model.a(x), ratio=0.5).module
        assert close(y, pb(pa(x)))
    assert_varies(y[:, 0])


def test_pruning_mode_transformer_inductor():
    model, x = transformer(dead_ffn=False)
    model = model.a
    be = fxprune.backend(ratio=0.5, then="inductor", strict=True)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    y = run(compiled, x)
    (record,) = be.records
    assert_pruned_and_verified(record)
    with torch.no_grad():
        assert close(y, record.module(x)[0], rtol=1e-4)
        assert close(y, fxprune.prune(model, x, ratio=0.5).module(x), rtol=1e-4)
    assert_varies(y[:, 0])
    y2 = run(compiled, x + 1)  # the compiled code runs again without recompiling
    assert len(be.records) == 1 and not close(y2, y)


class AttentionModules(nn.Module):
    """nn.MultiheadAttention and nn.TransformerEncoderLayer: Dynamo hands their functional
    form (F.multi_head_attention_forward) or fused fast path (batch first, in inference:
    torch._transformer_encoder_layer_fwd) to the backend."""

    def __init__(self, batch_first):
        super().__init__()
        self.embed, self.norm = nn.Linear(8, 32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.embed(x)
        h = self.norm(x)
        return self.head(self.layer(x + self.attn(h, h, h, need_weights=False)[0]))


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruning_mode_attention_modules_prune_their_heads_as_fxprune_prune_does(batch_first):
    torch.manual_seed(0)
    model = AttentionModules(batch_first).eval()
    x = torch.randn((3, 5, 8) if batch_first else (5, 3, 8))
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    y = run(torch.compile(model, backend=be, fullgraph=True), x)
    (record,) = be.records
    assert_pruned_and_verified(record)
    assert not record.result.groups.barriers, record.result.groups.barriers
    opaque = ("multi_head_attention", "_transformer_encoder_layer_fwd")
    assert not any(any(name in str(n.target) for name in opaque) for n in record.module.graph.nodes)
    with torch.no_grad():
        assert close(y, fxprune.prune(model, x, ratio=0.5).module(x), rtol=1e-4)
    assert_varies(y[:, 0] if batch_first else y[0])


def test_pruning_mode_hf_decoder_returning_its_cache():
    # the cache starts as torch.tensor([]) and keys are concatenated to it: the cat rule
    # failed on that; the cache's keys and values are outputs, so they keep their channels
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids)
    assert out.past_key_values is not None
    (record,) = be.records
    assert_pruned_and_verified(record)
    assert not record.result.groups.barriers, record.result.groups.barriers
    assert_varies(out.logits[:, -1])


def test_recompiles_give_the_same_plan():
    model, x = resnet()
    plans, outputs = [], []
    for _ in range(2):
        torch._dynamo.reset()
        be = fxprune.backend(ratio=0.5, then="eager", strict=True)
        outputs.append(run(torch.compile(model, backend=be, fullgraph=True, dynamic=False), x))
        # a new batch size recompiles the graph: same weights, same plan
        run(torch.compile(model, backend=be, fullgraph=True, dynamic=False), x[:2])
        plans.extend(r.result.plan.kept for r in be.records)
    assert len(plans) == 4 and all(torch.equal(p, plans[0]) for p in plans)
    assert torch.equal(outputs[0], outputs[1])


# -- lossless mode ------------------------------------------------------------------
@needs_lossless
def test_lossless_default_fullgraph_eager_resnet():
    model, x = resnet()
    before = snapshot(model)
    be = fxprune.backend(then="eager", strict=True)
    assert be.mode == "lossless"
    y = run(torch.compile(model, backend=be, fullgraph=True), x)
    (record,) = be.records
    assert_pruned_and_verified(record)
    with torch.no_grad():
        assert close(y, model(x))
    assert_varies(y)
    assert_untouched(model, before)


@needs_lossless
def test_lossless_by_name_graph_break():
    model, x = resnet(graph_break=True)
    compiled = torch.compile(model, backend="fxprune", options={"then": "eager"})
    with torch.no_grad():
        assert close(run(compiled, x), model(x))
    be = fxprune.backend(then="eager", strict=True)
    torch._dynamo.reset()
    y = run(torch.compile(model, backend=be), x)
    assert len(be.records) == 2
    for record in be.records:
        assert_pruned_and_verified(record)
        assert_boundaries_kept(record)
    with torch.no_grad():
        assert close(y, model(x))
    assert_varies(y)


@needs_lossless
def test_lossless_transformer_fullgraph_and_graph_break_eager():
    for graph_break in (False, True):
        torch._dynamo.reset()
        model, x = transformer(graph_break=graph_break)
        be = fxprune.backend(then="eager", strict=True)
        y = run(torch.compile(model, backend=be, fullgraph=not graph_break), x)
        assert len(be.records) == 1 + graph_break
        for record in be.records:
            assert_pruned_and_verified(record)
            assert_boundaries_kept(record)
        with torch.no_grad():
            assert close(y, model(x))
        assert_varies(y[:, 0])


@needs_lossless
def test_lossless_graph_break_inductor():
    model, x = resnet(graph_break=True, width=8)
    be = fxprune.backend(then="inductor", strict=True)
    y = run(torch.compile(model, backend=be), x)
    assert len(be.records) == 2
    for record in be.records:
        assert_pruned_and_verified(record)
    with torch.no_grad():
        assert close(y, model(x), rtol=1e-4)
    assert_varies(y)


# -- what the backend refuses: compiled unpruned, the right result ---------------------
def test_gradients_required_falls_through_and_backward_works(caplog):
    model, x = resnet()
    be = fxprune.backend(ratio=0.5, then="eager")
    with caplog.at_level(logging.WARNING, logger="fxprune.backend"):
        y = torch.compile(model, backend=be, fullgraph=True)(x)
    (record,) = be.records
    assert "gradients are required" in record.reason and not record.pruned
    assert "gradients are required" in caplog.text
    y.sum().backward()
    assert model.fc.weight.grad is not None
    with torch.no_grad():
        assert close(y.detach(), model(x))


def test_training_mode_falls_through_or_raises_with_strict():
    model, x = resnet()
    model.train()
    be = fxprune.backend(ratio=0.5, then="eager")
    with torch.no_grad():
        y = torch.compile(model, backend=be, fullgraph=True)(x)
    assert "training mode" in be.records[0].reason and "model.eval()" in be.records[0].reason
    assert y.shape == (4, 10)
    torch._dynamo.reset()
    strict = fxprune.backend(ratio=0.5, then="eager", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="training mode"):
        torch.compile(model, backend=strict, fullgraph=True)(x)


class StdConv2d(nn.Conv2d):
    """Weight standardization as normalizer-free networks write it: F.batch_norm in
    training mode on the weight, with no running statistics (timm's ScaledStdConv2d)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_batch_norm_without_running_statistics_is_no_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU(), StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    y = run(torch.compile(model, backend=be, fullgraph=True), x)
    (record,) = be.records
    assert_pruned_and_verified(record)  # was refused: "the graph runs in training mode"
    with torch.no_grad():
        assert close(y, fxprune.prune(model, x, ratio=0.5).module(x), rtol=1e-4)
    assert_varies(y)


def test_graph_with_nothing_to_prune_is_compiled_unpruned():
    def f(x):
        return torch.sin(x) * 2 + 1

    be = fxprune.backend(ratio=0.5, then="eager")
    x = torch.randn(5)
    assert torch.allclose(run(torch.compile(f, backend=be), x), f(x))
    assert be.records[0].reason and not be.records[0].pruned


def test_dynamic_shapes_fall_through_with_a_hint():
    model, x = resnet()
    be = fxprune.backend(ratio=0.5, then="eager")
    y = run(torch.compile(model, backend=be, dynamic=True), x)
    assert "dynamic" in be.records[0].reason and "dynamic=False" in be.records[0].reason
    with torch.no_grad():
        assert close(y, model(x))


def test_changed_weights_run_the_original_graph(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(6, 8)
    be = fxprune.backend(ratio=0.5, then="eager", strict=True)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    pruned = run(compiled, x)
    assert be.records[0].pruned
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an in-place update after the compile (an optimizer step)
        expected = model(x)
    with caplog.at_level(logging.WARNING, logger="fxprune.backend"):
        y = run(compiled, x)
    assert "parameters changed" in caplog.text
    assert close(y, expected) and not close(y, pruned)


def test_bad_options_are_typed_errors_naming_the_fix():
    with pytest.raises(ConfigError, match="unknown option.*'raito'.*ratio"):
        fxprune.backend(raito=0.5)
    with pytest.raises(ConfigError, match="importance.*needs ratio="):
        fxprune.backend(importance="l1")
    with pytest.raises(ConfigError, match="ratio must be a number"):
        fxprune.backend(ratio=1.5)
    with pytest.raises(ConfigError, match="then='nope' is not a torch.compile backend"):
        fxprune.backend(then="nope")
    with pytest.raises(ConfigError, match="prune forever"):
        fxprune.backend(then="fxprune")
    model, x = resnet()
    compiled = torch.compile(model, backend="fxprune", options={"ratoi": 0.5})
    with torch.no_grad(), pytest.raises(Exception, match="unknown option.*'ratoi'"):
        compiled(x)
