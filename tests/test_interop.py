"""fxprune in torch.fx's PassManager and on torch.export programs (re-export, save/load,
AOTInductor, ONNX): every pruned model goes through the oracle and is compared with
what it came from."""

from __future__ import annotations

import doctest
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.blocks import BertBlock
from fxprune.errors import ConfigError, InputError, PipelineError
from fxprune.interop import FxprunePass, as_fx_pass, fx_passes, prune_exported
from fxprune.passes_base import known_passes

from .helpers.healthy import make_healthy
from .helpers.oracle import assert_untouched, snapshot


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, stride=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = h + F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.conv3(h))
        return self.fc(h.mean((2, 3)))


def net(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 12, 12)
    return make_healthy(Net(), x.shape), x


def assert_varies(y):
    assert y.std() > 1e-3 and (y[0] - y[1]).abs().max() > 1e-4


def same(a, b, rtol=1e-5):
    return a.shape == b.shape and float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-6


class CountParams(PassBase):
    """A pass that is not fxprune's: counts the parameter elements, changes nothing."""

    def __init__(self):
        self.seen = []

    def call(self, gm):
        self.seen.append(sum(p.numel() for p in gm.parameters()))
        return PassResult(gm, False)


# -- PassManager ---------------------------------------------------------------------
def test_whole_prune_as_a_pass_in_a_pass_manager():
    model, x = net()
    gm = torch.fx.symbolic_trace(model)
    before, code = snapshot(gm), gm.code
    prune_pass, count = as_fx_pass(None, x, ratio=0.5, importance="l1"), CountParams()
    pm = PassManager([count, prune_pass, count], run_checks_after_each_pass=True)
    res = pm(gm)
    assert res.modified and isinstance(res, PassResult)
    assert res.graph_module is prune_pass.result.module
    v = fxprune.verify(gm, prune_pass.result, x)
    assert v.complete and v.groups_checked > 0, v.summary()
    with torch.no_grad():
        expected = fxprune.prune(model, x, ratio=0.5, importance="l1").module(x)
        y = res.graph_module(x)
    assert same(y, expected)
    assert_varies(y)
    assert sum(p.numel() for p in res.graph_module.parameters()) < sum(p.numel() for p in gm.parameters())
    assert gm.code == code
    assert_untouched(gm, before)


def test_one_pass_base_per_fxprune_pass_with_a_foreign_pass_between():
    """channel-deps, score, select and rewrite as four entries of a PassManager, a foreign
    pass between them: the state flows through, and the result is fxprune.prune's."""
    model, x = net()
    gm = torch.fx.symbolic_trace(model)
    pipeline = "channel-deps,score-magnitude{p=1.0},select{ratio=0.25},rewrite"
    passes = fx_passes(pipeline, x)
    assert [type(p) for p in passes] == [FxprunePass] * 4
    count = CountParams()
    pm = PassManager([passes[0], count, *passes[1:], count])
    res = pm(gm)
    assert res.modified
    assert count.seen[0] > count.seen[1]  # the second count saw the pruned graph
    result = passes[-1].result
    assert fxprune.verify(gm, result, x).complete
    with torch.no_grad():
        expected = fxprune.prune(model, x, pipeline=pipeline).module(x)
        assert same(res.graph_module(x), expected)
    # analysis passes leave the graph as it is
    assert passes[0](gm).modified is False and passes[0](gm).graph_module is gm


def test_state_is_dropped_when_a_foreign_pass_changes_the_graph():
    model, x = net()
    gm = torch.fx.symbolic_trace(model)
    deps, rest = fx_passes("channel-deps", x)[0], as_fx_pass("score-magnitude,select{ratio=0.5},rewrite", x)
    gm2 = deps(gm).graph_module
    assert rest(gm2).modified  # the state channel-deps left is used

    def add_identity(g):  # a foreign rewrite: the held analysis no longer describes the graph
        out = next(n for n in g.graph.nodes if n.op == "output")
        with g.graph.inserting_before(out):
            neg = g.graph.call_function(torch.neg, (out.args[0],))
            neg2 = g.graph.call_function(torch.neg, (neg,))
        out.args = (neg2,)
        g.recompile()
        return PassResult(g, True)

    gm3 = torch.fx.symbolic_trace(model)
    deps(gm3)
    add_identity(gm3)
    with pytest.raises(PipelineError, match="needs groups.*channel-deps"):
        rest(gm3)


def test_every_registered_pass_runs_as_a_pass_base():
    """Every scoring pass, both selections and dead-channel elimination, each in its own
    PassBase: the pruned GraphModule passes the oracle."""
    model, x = net()
    data = [(torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))) for _ in range(2)]
    gm = torch.fx.symbolic_trace(model)
    scorers = [p for p in known_passes() if p.startswith("score-")]
    assert len(scorers) >= 8
    ran = set()
    for scorer in scorers:
        needs_data = "data" in {f for f in fxprune.passes_base._PASSES[scorer].__dataclass_fields__}
        for select in ("select{ratio=0.5}", "select-budget{target_params=0.6}"):
            if select.startswith("select-budget") and scorer != "score-magnitude":
                continue
            pm = PassManager(fx_passes(f"channel-deps,{scorer},{select},rewrite", x,
                                       **({"data": data} if needs_data else {})))
            res = pm(gm)
            assert res.modified, scorer
            last = pm.passes[-1]
            v = fxprune.verify(gm, last.result, x)
            assert v.groups_checked > 0 and v.max_rel_err < 1e-4, (scorer, v.summary())
            ran.update({"channel-deps", scorer, select.split("{")[0], "rewrite"})
    # dead channels: zero the rows of four of conv3's channels
    with torch.no_grad():
        model.conv3.weight[::6] = 0.0
        model.conv3.bias[::6] = 0.0
    gm = torch.fx.symbolic_trace(model)
    if "eliminate-dead-channels" in known_passes():
        p = fx_passes("channel-deps,eliminate-dead-channels", x)
        res = PassManager(p)(gm)
        assert res.modified and p[-1].result.plan.n_removed == 4
        assert fxprune.verify(gm, p[-1].result, x).complete
        with torch.no_grad():
            assert same(res.graph_module(x), model(x))
        ran.add("eliminate-dead-channels")
    assert ran >= set(known_passes()) - {"capture"}, set(known_passes()) - ran


def test_nothing_removed_is_not_modified_and_bad_arguments_are_typed():
    model, x = net()
    gm = torch.fx.symbolic_trace(model)
    res = as_fx_pass(None, x, ratio=0.0)(gm)
    assert res.modified is False and res.graph_module is gm
    with pytest.raises(ConfigError, match="ratoi are not options of fxprune.prune"):
        as_fx_pass(None, x, ratoi=0.5)
    with pytest.raises(ConfigError, match="cannot be given with a pipeline"):
        as_fx_pass("channel-deps", x, ratio=0.5)
    with pytest.raises(ConfigError, match="a pass takes a torch.fx.GraphModule"):
        as_fx_pass(None, x)(model)
    with pytest.raises(ConfigError, match="passes must be"):
        as_fx_pass(42, x)


def test_pruned_graph_module_prunes_again_in_a_second_pass():
    model, x = net()
    gm = torch.fx.symbolic_trace(model)
    first, second = as_fx_pass(None, x, ratio=0.25), as_fx_pass(None, x, ratio=0.25)
    res = PassManager([first, second])(gm)
    assert res.modified
    assert fxprune.verify(first.result.module, second.result, x).complete
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(gm) > n(first.result.module) > n(second.result.module)


def test_doctests():
    result = doctest.testmod(sys.modules["fxprune.interop"])
    assert result.attempted > 0 and result.failed == 0


# -- torch.export ---------------------------------------------------------------------
def exported_net():
    model, x = net()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    return model, x, ep


def test_prune_exported_is_a_valid_program(tmp_path):
    model, x, ep = exported_net()
    before = snapshot(model)
    new, result = prune_exported(ep, ratio=0.5, return_result=True)
    assert isinstance(new, torch.export.ExportedProgram) and new is not ep
    v = fxprune.verify(ep.module(), result, x)
    assert v.complete and v.groups_checked > 0, v.summary()
    # state dict and signature: the same names, smaller tensors
    assert set(new.state_dict) == set(ep.state_dict)
    assert new.state_dict["conv1.weight"].shape[0] < ep.state_dict["conv1.weight"].shape[0]
    assert [s.target for s in new.graph_signature.input_specs if s.target] == \
        [s.target for s in ep.graph_signature.input_specs if s.target]
    for spec in new.graph_signature.input_specs:
        if spec.target in new.state_dict:
            node = next(n for n in new.graph.nodes if n.name == spec.arg.name)
            assert tuple(node.meta["val"].shape) == tuple(new.state_dict[spec.target].shape)
    # the dynamic batch dim and its range survive
    (rng,) = new.range_constraints.values()
    assert (int(rng.lower), int(rng.upper)) == (1, 64)
    with torch.no_grad():
        y = new.module()(x)
        assert same(y, result.module(x))
        assert_varies(y)
        x7 = torch.randn(7, 3, 12, 12)
        assert same(new.module()(x7), result.module(x7))
    path = tmp_path / "pruned.pt2"
    torch.export.save(new, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), y)
    assert_untouched(model, before)


def test_prune_exported_transformer_block():
    torch.manual_seed(0)
    block = BertBlock(32, 4, 64).eval()
    x = torch.randn(2, 8, 32)
    ep = torch.export.export(block, (x,))
    new, result = prune_exported(ep, ratio=0.5, return_result=True)
    assert fxprune.verify(ep.module(), result, x).complete
    assert new.state_dict["fc1.weight"].shape == (32, 32)
    with torch.no_grad():
        y = new.module()(x)
        assert same(y, result.module(x)) and not same(y, block(x), rtol=1e-3)
    assert_varies(y[:, 0])


def test_prune_exported_bad_input():
    model, x, ep = exported_net()
    with pytest.raises(ConfigError, match="ExportedProgram"):
        prune_exported(model, ratio=0.5)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, *, scale):
            return self.fc(x) * scale

    ep_kw = torch.export.export(Kw(), (torch.randn(2, 4),), {"scale": torch.tensor(2.0)})
    with pytest.raises(InputError, match="keyword inputs.*scale"):
        prune_exported(ep_kw, ratio=0.5)


def test_aot_inductor_package_of_a_pruned_program(tmp_path):
    model, x, ep = exported_net()
    new, result = prune_exported(ep, ratio=0.5, return_result=True)
    assert fxprune.verify(ep.module(), result, x).complete
    try:
        path = torch._inductor.aoti_compile_and_package(new, package_path=str(tmp_path / "pruned.pt2"))
    except Exception as exc:  # noqa: BLE001 (a missing or broken C++ toolchain, in any of its forms)
        if any(s in str(exc).lower() for s in ("compiler", "c++", "g++", "gcc", "cpp", "toolchain", "not found")):
            pytest.skip(f"AOTInductor could not compile C++ here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        y, expected = runner(x), result.module(x)
        assert same(y, expected, rtol=1e-4)
        x5 = torch.randn(5, 3, 12, 12)
        assert same(runner(x5), result.module(x5), rtol=1e-4)
    assert_varies(y)


def test_onnx_export_of_a_pruned_program_runs_in_onnxruntime(tmp_path):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is absent: pip install fxprune[onnx]")
    import onnxruntime

    model, x, ep = exported_net()
    new, result = prune_exported(ep, ratio=0.5, return_result=True)
    assert fxprune.verify(ep.module(), result, x).complete
    program = torch.onnx.export(new, (x,), dynamo=True)
    path = tmp_path / "pruned.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    for batch in (x, torch.randn(3, 3, 12, 12)):
        (y,) = session.run(None, {inp.name: batch.numpy()})
        with torch.no_grad():
            assert same(torch.from_numpy(y), result.module(batch), rtol=1e-4)
    assert_varies(torch.from_numpy(y))
