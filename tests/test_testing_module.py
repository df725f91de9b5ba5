"""fxprune.testing used the way another project would: a conv-bn fusion pass that is not
fxprune's, checked on random CNN DAGs with assert_rewrite_preserves; broken variants of
it are caught; arguments are validated eagerly; assert_equivalent says what differs."""

from __future__ import annotations

import copy
import doctest
import subprocess
import sys

import hypothesis
import pytest
import torch
import torch.fx as fx
from hypothesis import Phase, given
from hypothesis.errors import InvalidArgument
from torch import nn

import fxprune.testing
from fxprune.testing import (Drawn, assert_equivalent, assert_rewrite_preserves, attention_blocks, cnn_dags,
                             mixed_nets, networks, recurrent_nets, rewrite_property)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# CNN DAGs where a BatchNorm often follows a convolution that nothing else reads
CONV_BN_DAGS = cnn_dags(ops=["conv", "grouped", "depthwise", "bn", "act", "add"], min_steps=3)


def fuse_conv_bn(gm: fx.GraphModule, *, mistake: str | None = None, counter: list | None = None) -> fx.GraphModule:
    """Fold each eval-mode BatchNorm2d into the Conv2d before it, when the BatchNorm is
    the conv output's only user: w' = w * g / sqrt(var + eps), b' = (b - mean) * g /
    sqrt(var + eps) + beta. ``mistake`` breaks it on purpose."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and isinstance(gm.get_submodule(conv_node.target), nn.Conv2d) and len(conv_node.users) == 1):
            continue
        # the conv as it is now: conv -> bn -> bn folds twice (a dict of the modules taken
        # before the loop would fold the second into the original conv; hypothesis found that)
        conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(node.target)
        eps = 0.0 if mistake == "ignore_eps" else bn.eps
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        scale = gamma / torch.sqrt(bn.running_var + eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = copy.deepcopy(conv)
        with torch.no_grad():
            fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
            shift = (bias - bn.running_mean) * scale
            fused.bias = nn.Parameter(shift if mistake == "forget_bn_bias" else shift + beta)
        parent, _, name = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, fused)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        if counter is not None:
            counter.append(node.target)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def test_conv_bn_fusion_preserves_outputs():
    fused = []
    assert_rewrite_preserves(lambda gm: fuse_conv_bn(gm, counter=fused), strategy=CONV_BN_DAGS,
                             max_examples=60)
    assert len(fused) >= 5  # the property exercised the fusion, not just traced the nets


@pytest.mark.parametrize("mistake, shrink", [("forget_bn_bias", True), ("ignore_eps", False)])
def test_a_broken_fusion_is_caught(mistake, shrink):
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    with pytest.raises(AssertionError) as info:
        assert_rewrite_preserves(lambda gm: fuse_conv_bn(gm, mistake=mistake), strategy=CONV_BN_DAGS,
                                 max_examples=60, settings=hypothesis.settings(
                                     report_multiple_bugs=False, database=None, phases=phases))
    assert "max |error|" in str(info.value)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "preserves_outputs(" in notes and "CnnDag" in notes and "BatchNorm2d" in notes  # the failing net
    if shrink:  # the shrunk program still has what the bug needs: a conv -> bn that was fused
        program = eval(notes.split("program=")[1].split("], head=")[0] + "]")
        assert any(step[0] == "bn" and program[step[1] - 1][0] in ("conv", "dw") for step in program if step[1] > 0)


def test_every_family_traces_and_a_no_op_rewrite_passes():
    assert_rewrite_preserves(lambda gm: gm, max_examples=20)


def test_a_rewrite_that_returns_no_graph_module_or_a_broken_graph_is_caught():
    with pytest.raises(AssertionError, match="not a torch.fx.GraphModule"):
        assert_rewrite_preserves(lambda gm: nn.Identity(), strategy=cnn_dags(max_steps=2), max_examples=5)

    def use_before_definition(gm):
        last = next(n for n in reversed(gm.graph.nodes) if n.op == "call_module")
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.relu, (last,))  # reads a value not computed yet
        return gm  # (not even recompiled: the outputs are still right; lint is not)

    with pytest.raises(RuntimeError, match="used before"):
        assert_rewrite_preserves(use_before_definition, strategy=cnn_dags(max_steps=2), max_examples=5)


def test_rewrite_property_is_a_test_function():
    prop = rewrite_property(lambda gm: gm, strategy=recurrent_nets(max_layers=1), max_examples=3)
    assert callable(prop) and hasattr(prop, "hypothesis")
    prop()


@pytest.mark.parametrize("family", ["cnn", "attention", "recurrent", "mixed"])
def test_drawn_networks_are_healthy_and_reproducible(family):
    states = []

    @hypothesis.settings(max_examples=15, derandomize=True, database=None, deadline=None)
    @given(networks([family]))
    def check(drawn):
        assert isinstance(drawn, Drawn)
        model, inputs = drawn
        assert not model.training and isinstance(inputs, tuple)
        for name, p in model.named_parameters():
            assert not bool((p == 0).all()), f"{name} is all zero"
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
                assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                assert m.bias.abs().max() > 0 and (m.weight.numel() == 1 or m.weight.std() > 0)
        with torch.no_grad():
            y = model(*inputs)
        assert torch.isfinite(y).all() and float(y.std()) > 1e-3 and float(y.abs().max()) > 1e-2
        assert f"seed={model.drawn_config['seed']}" in repr(drawn)
        states.append({k: v.clone() for k, v in model.state_dict().items()})

    check()
    first = states[:]
    states.clear()
    check()  # the same examples again: the same weights
    assert len(first) == len(states)
    for a, b in zip(first, states):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make", [
    lambda: cnn_dags(min_steps=5, max_steps=2),
    lambda: cnn_dags(min_steps=-1),
    lambda: cnn_dags(max_steps=2.5),
    lambda: cnn_dags(ops=["conv", "transformer"]),
    lambda: cnn_dags(ops=[]),
    lambda: cnn_dags(ops="conv"),
    lambda: cnn_dags(widths=[0, 4]),
    lambda: cnn_dags(kernel_sizes=[2]),
    lambda: cnn_dags(min_spatial=0),
    lambda: cnn_dags(batch_size=True),
    lambda: attention_blocks(min_heads=0),
    lambda: attention_blocks(min_heads=4, max_heads=2),
    lambda: attention_blocks(rotary=True, head_dims=[3, 4]),
    lambda: attention_blocks(fused="yes"),
    lambda: attention_blocks(kinds=["flash"]),
    lambda: attention_blocks(min_tokens=6, max_tokens=5),
    lambda: recurrent_nets(min_layers=3, max_layers=1),
    lambda: recurrent_nets(cells=["lstm", "transformer"]),
    lambda: recurrent_nets(proj_size=True),  # projections are LSTM-only
    lambda: recurrent_nets(cells=["lstm"], proj_size=True, hidden_sizes=[1]),
    lambda: recurrent_nets(min_seq_len=0),
    lambda: mixed_nets(min_blocks=-1),
    lambda: mixed_nets(min_blocks=3, max_blocks=2),
    lambda: mixed_nets(blocks=["conv"]),
    lambda: networks(["cnn", "gnn"]),
    lambda: rewrite_property(42),
    lambda: rewrite_property(lambda gm: gm, strategy=42),
    lambda: rewrite_property(lambda gm: gm, max_examples=0),
], ids=lambda f: "")
def test_bad_arguments_raise_invalid_argument_at_once(make):
    with pytest.raises(InvalidArgument):
        make()  # eagerly: nothing is drawn


def test_assert_equivalent_passes_and_names_what_differs():
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self, bump=0.0):
            super().__init__()
            self.a, self.b, self.bump = nn.Linear(4, 3), nn.Linear(4, 2), bump

        def forward(self, x):
            return {"logits": self.a(x), "extra": (self.b(x) + self.bump, x.argmax(-1))}

    ref, x = Two(), torch.randn(5, 4)
    assert_equivalent(ref, fx.symbolic_trace(ref), x)
    other = copy.deepcopy(ref)
    other.bump = 0.5
    with pytest.raises(AssertionError) as info:
        assert_equivalent(ref, other, (x,))
    msg = str(info.value)
    assert "output['extra'][0] differs" in msg and "max |error| = 0.5" in msg and "allowed" in msg
    assert_equivalent(ref, other, x, atol=0.51)  # within an absolute tolerance

    with pytest.raises(AssertionError, match="shape"):
        assert_equivalent(nn.Linear(4, 3), nn.Linear(4, 2), x)
    with pytest.raises(AssertionError, match="structure"):
        assert_equivalent(lambda t: (t, t), lambda t: [t, t], x)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_equivalent(lambda t: t.argmax(-1), lambda t: t.argmin(-1), x)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_equivalent(lambda t: t, lambda t: t / 0, x)
    with pytest.raises(ValueError):
        assert_equivalent(ref, ref, x, rtol=-1)


def test_the_module_docstrings_run():
    result = doctest.testmod(fxprune.testing)
    assert result.attempted > 0 and result.failed == 0


def test_import_fxprune_does_not_import_hypothesis():
    code = "import sys, fxprune; assert 'hypothesis' not in sys.modules and 'fxprune.testing' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
