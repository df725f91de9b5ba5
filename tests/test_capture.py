"""Capture: shapes on every node, GraphModule input, parameters as placeholders,
leaf modules, concrete_args."""

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune import capture
from fxprune.meta import get_meta, tensor_meta
from tests.helpers.healthy import make_healthy
from tests.helpers.oracle import assert_still_usable, assert_untouched, prune_and_verify, snapshot


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_every_node_has_a_shape_without_running_real_flops():
    gm = fxprune.trace(net(), torch.randn(2, 3, 8, 8))
    shapes = {n.name: tensor_meta(n).shape for n in gm.graph.nodes if n.op != "output"}
    assert shapes == {"input_1": (2, 3, 8, 8), "_0": (2, 8, 6, 6), "_1": (2, 8, 6, 6), "_2": (2, 8, 6, 6),
                      "_3": (2, 288), "_4": (2, 4)}


def test_graphmodule_input_is_used_and_not_modified():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(net())
    make_healthy(gm, (2, 3, 8, 8))
    code = gm.code
    before = snapshot(gm)
    result, _ = prune_and_verify(gm, torch.randn(2, 3, 8, 8), ratio=0.5, healthy=False)
    assert gm.code == code
    assert_untouched(gm, before)
    assert result.module.get_submodule("4").in_features == 4 * 36


def test_parameters_arriving_as_placeholders_are_sliceable():
    """A torch.compile-style graph: weights are inputs whose example values are Parameters."""
    graph = torch.fx.Graph()
    x, w1, w2 = graph.placeholder("x"), graph.placeholder("w1"), graph.placeholder("w2")
    h = graph.call_function(F.relu, (graph.call_function(F.conv2d, (x, w1)),))
    graph.output(graph.call_function(F.conv2d, (h, w2)))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    torch.manual_seed(0)
    p1, p2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(2, 8, 1, 1))
    inputs = (torch.randn(2, 3, 6, 6), p1, p2)
    groups = fxprune.analyze(gm, inputs)
    assert [g.size for g in groups.prunable] == [8]
    result = fxprune.prune(gm, inputs, ratio=0.5)
    lifted = [n for n in result.module.graph.nodes if n.op == "get_attr"]
    assert len(lifted) == 2
    placeholders = [n for n in result.module.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    x0 = inputs[0]
    kept = result.plan.kept[groups.class_of[groups.node_labels["relu"].reshape(-1)]]
    with torch.no_grad():
        expect = F.conv2d(F.relu(F.conv2d(x0, p1[kept])), p2[:, kept])
        assert torch.allclose(result.module(x0), expect, atol=1e-5)
    assert p1.shape == (8, 3, 3, 3)
    assert fxprune.verify(gm, result, inputs).max_rel_err < 1e-4


class Opaque(nn.Module):
    def forward(self, x):
        return x.flip(1) * 2.0


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.op, self.b, self.c = nn.Conv2d(3, 8, 1), Opaque(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(self.op(F.relu(self.a(x))))))


def test_leaf_modules_are_pinned_with_a_reason():
    x = torch.randn(1, 3, 4, 4)
    traced_through = fxprune.analyze(WithOpaque(), x)
    assert traced_through.group_of("a.weight").is_prunable  # flip is understood
    as_leaf = fxprune.analyze(WithOpaque(), x, leaf_modules=[Opaque])
    assert not as_leaf.group_of("a.weight").is_prunable
    assert as_leaf.group_of("b.weight").is_prunable
    assert "no rule for module Opaque" in str(as_leaf)
    by_name = fxprune.analyze(WithOpaque(), x, leaf_modules=["op"])
    assert not by_name.group_of("a.weight").is_prunable


def test_concrete_args_specialize_a_branch():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x, double=False):
            h = F.relu(self.a(x))
            if double:
                h = h * 2
            return self.b(h)

    gm = fxprune.trace(Switch(), torch.randn(1, 3, 4, 4), concrete_args={"double": True})
    assert any(n.target is getattr(__import__("operator"), "mul") for n in gm.graph.nodes)
    assert get_meta(next(n for n in gm.graph.nodes if n.name == "b")).shape == (1, 2, 4, 4)


class StaticConditions(nn.Module):
    """Branches and asserts on values no input changes: a buffer's numel (timm's rotary
    embedding asserts it), a parameter's shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 2)
        self.register_buffer("periods", torch.rand(8))

    def forward(self, x):
        assert self.periods.numel() == 8, "periods"
        h = F.relu(self.a(x))
        if self.a.weight.shape[0] > 8:
            h = h * 2.0
        return self.b(h + self.periods.sum())


def test_static_branch_conditions_are_taken_under_fx():
    """They failed the symbolic trace ("traced variables cannot be used as inputs to
    control flow") and left the model to export; the condition's nodes are not kept."""
    torch.manual_seed(0)
    model, x = StaticConditions().eval(), torch.randn(3, 6)
    gm = fxprune.trace(model, x)
    assert gm.meta["fxprune_frontend"] == "fx"
    assert not any(n.target in ("numel", operator.eq, operator.gt) for n in gm.graph.nodes)
    assert any(n.target is operator.mul for n in gm.graph.nodes)  # both branches taken
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
    result, _ = prune_and_verify(model, x, ratio=0.5, healthy=False)
    assert result.frontend == "fx" and result.module.get_parameter("a.weight").shape == (8, 6)


class OnValues(nn.Module):
    def __init__(self, on_input):
        super().__init__()
        self.on_input = on_input
        self.register_buffer("initialized", torch.tensor(False))  # ActNorm's data-dependent init

    def forward(self, x):
        if self.on_input:
            return x * 2 if x.sum() > 0 else x
        return x if self.initialized else x - x.mean(0)


@pytest.mark.parametrize("on_input", [True, False])
def test_branch_conditions_on_inputs_or_values_still_fail_the_symbolic_trace(on_input):
    with pytest.raises(fxprune.errors.TraceError, match="control flow"):
        fxprune.trace(OnValues(on_input), torch.randn(2, 3), frontend="fx")


class Caching(nn.Module):
    """A forward that caches on the module (timm's LeViT keeps its attention biases in a
    dict keyed by device) and sets an attribute."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 2)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.cache, self.calls = {}, []

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.scale * 2.0
        self.calls.append(key)
        self.last_input = x
        return self.b(F.relu(self.a(x)) * self.cache[key])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_capture_leaves_nothing_behind_on_the_model(frontend):
    # a trace left a Proxy (export: a fake tensor) in the cache, and the user's model no
    # longer pickled
    import io
    import pickle

    torch.manual_seed(0)
    model, x = Caching().eval(), torch.randn(3, 6)
    result, _ = prune_and_verify(model, x, ratio=0.5, frontend=frontend, healthy=False)
    # the oracle runs the model before pruning: export then reads the cached tensor (a
    # constant, ``scale`` unused), fx (whose key is traced) recomputes it from ``scale``
    assert result.plan.n_removed == 8
    assert result.module.get_parameter("scale").shape == ((8,) if frontend == "fx" else (16,))
    model.cache.clear(), model.calls.clear()  # what the oracle's own eager runs cached
    del model.last_input
    fxprune.trace(model, x, frontend=frontend)
    assert model.cache == {} and model.calls == [] and not hasattr(model, "last_input")
    pickle.dump(model, io.BytesIO())


class OptionalMask(torch.nn.Module):
    """forward with optional arguments the example inputs do not give (timm's ViT)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = torch.relu(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_optional_forward_arguments_are_traced_at_their_defaults():
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = fxprune.trace(OptionalMask(), x)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert gm.meta["fxprune_frontend"] == "fx"
    result, v = prune_and_verify(OptionalMask(), x, ratio=0.5, healthy=False)
    assert result.module.get_parameter("a.weight").shape == (4, 6)


# -- shape shortcuts of the meta pass agree with the kernels --------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


_FUNCTION_CASES = [
    (F.linear, (_meta(2, 5, 8), _meta(3, 8)), {}),
    (F.linear, (_meta(8), _meta(3, 8), _meta(3)), {}),
    (torch._C._nn.linear, (_meta(2, 8), _meta(3, 8)), {"bias": _meta(3)}),
    (F.layer_norm, (_meta(2, 5, 8), (8,), _meta(8), _meta(8)), {}),
    (F.layer_norm, (_meta(2, 5, 8), [5, 8]), {}),
    (F.scaled_dot_product_attention, (_meta(2, 4, 6, 8), _meta(2, 4, 7, 8), _meta(2, 4, 7, 3)), {}),
    (F.scaled_dot_product_attention, (_meta(2, 4, 6, 8), _meta(2, 4, 7, 8), _meta(2, 4, 7, 8)),
     {"attn_mask": _meta(1, 1, 6, 7, dtype=torch.bool), "is_causal": False}),
    (operator.add, (_meta(2, 1, 8), _meta(5, 1)), {}),
    (operator.mul, (_meta(2, 3, dtype=torch.int64), 0.5), {}),
    (operator.sub, (3, _meta(4, dtype=torch.float16)), {}),
    (torch.add, (_meta(2, 3, dtype=torch.int32), _meta(3, dtype=torch.int64)), {}),
    (F.relu, (_meta(2, 3),), {"inplace": False}),
    (F.leaky_relu, (_meta(2, 3, dtype=torch.float16), 0.2), {}),
    (F.gelu, (_meta(4),), {"approximate": "tanh"}),
    (torch.sigmoid, (_meta(1, 2, 3),), {}),
    (F.dropout, (_meta(5, 6), 0.5, False), {}),
    (torch.cat, ([_meta(2, 3, 4), _meta(2, 5, 4)], 1), {}),
    (torch.cat, ([_meta(2, 3), _meta(1, 3)],), {}),
    (torch.cat, ([_meta(2, 3), _meta(2, 4)],), {"dim": -1}),
]


@pytest.mark.parametrize("case", range(len(_FUNCTION_CASES)))
def test_function_shape_shortcuts_match_the_meta_kernels(case):
    fn, args, kwargs = _FUNCTION_CASES[case]
    want = fn(*args, **kwargs)
    got = capture.function_shape(fn, args, kwargs)
    assert got == (tuple(want.shape), want.dtype)


@pytest.mark.parametrize("fn,args", [
    (F.linear, (_meta(2, 7), _meta(3, 8))),                      # wrong in_features
    (F.linear, (_meta(2, 8), _meta(3, 8), _meta(4))),            # wrong bias
    (F.layer_norm, (_meta(2, 5, 8), (5,))),                      # normalized_shape mismatch
    (F.scaled_dot_product_attention, (_meta(2, 4, 6, 8), _meta(2, 4, 7, 5), _meta(2, 4, 7, 3))),
    (operator.add, (_meta(2, 3), _meta(4))),                     # not broadcastable
    (torch.cat, ([_meta(2, 3), _meta(3, 4)], 1)),                # sizes differ off the cat dim
])
def test_function_shape_shortcuts_leave_bad_arguments_to_the_kernel(fn, args):
    assert capture.function_shape(fn, args, {}) is None
    with pytest.raises(RuntimeError):
        fn(*args)


@pytest.mark.parametrize("module,shape", [
    (nn.LayerNorm(8), (2, 5, 8)), (nn.LayerNorm((5, 8)), (2, 5, 8)), (nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    (nn.Softmax(dim=1), (2, 3, 4)), (nn.LogSoftmax(dim=-1), (2, 3)),
    (nn.AdaptiveAvgPool2d((1, None)), (2, 3, 7, 5)), (nn.AdaptiveAvgPool1d(3), (4, 9)),
    (nn.AdaptiveAvgPool3d(2), (1, 2, 4, 4, 4)),
])
def test_module_shape_shortcuts_match_the_modules(module, shape):
    x = torch.randn(shape)
    assert capture.module_shape(module, (x,), {}) == tuple(module(x).shape)


def test_module_shape_shortcuts_leave_bad_inputs_to_the_module():
    assert capture.module_shape(nn.LayerNorm(8), (torch.randn(2, 7),), {}) is None
    assert capture.module_shape(nn.GroupNorm(2, 4), (torch.randn(2, 6, 3),), {}) is None


@pytest.mark.parametrize("module, shape", [
    (nn.LSTM(6, 5), (7, 6)),  # unbatched
    (nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True), (3, 7, 6)),
    (nn.LSTM(6, 5, proj_size=3, bidirectional=True), (7, 3, 6)),
    (nn.GRU(6, 5, num_layers=3, batch_first=True), (3, 7, 6)),
    (nn.RNN(6, 5, bidirectional=True), (7, 2, 6)),
])
def test_recurrent_shape_shortcuts_match_the_modules(module, shape):
    x = torch.randn(shape)
    got = capture.recurrent_outputs(module, (x,), {})
    want = module(x)
    assert [t.shape for t in torch.utils._pytree.tree_leaves(got)] == \
        [t.shape for t in torch.utils._pytree.tree_leaves(want)]
    assert all(t.device.type == "meta" for t in torch.utils._pytree.tree_leaves(got))


def test_recurrent_shape_shortcuts_leave_bad_inputs_and_states_to_the_module():
    lstm = nn.LSTM(6, 5)
    assert capture.recurrent_outputs(lstm, (torch.randn(7, 2, 4),), {}) is None  # wrong width
    state = (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    assert capture.recurrent_outputs(lstm, (torch.randn(7, 2, 6), state), {}) is None


def test_tensors_made_inside_forward_get_shapes_on_meta():
    class Ramp(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)

        def forward(self, x):
            pos = torch.arange(x.shape[1]).float()[None, :, None]  # made from a size: default device
            return self.proj(x + pos) + torch.zeros(6)

    x, model = torch.randn(2, 5, 4), Ramp()
    gm = fxprune.trace(model, x)
    assert capture.propagate_shapes(gm, (x,)) == "meta"  # no fallback to fake or real tensors
    assert tensor_meta([n for n in gm.graph.nodes if n.op == "output"][0].args[0]).shape == (2, 5, 6)
    # torch.fx puts the constant (torch.zeros(6)) on the traced root: the graph has it, the model not
    assert any(n.op == "get_attr" for n in gm.graph.nodes) and not any("constant" in k for k in vars(model))


@torch.fx.wrap
def _clamped_sizes(sizes, limit):
    """Mutates its list argument (as torchvision's video Swin does with its window size)."""
    for i in range(len(sizes)):
        sizes[i] = min(sizes[i], limit)
    return sizes


class _WrappedMutation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.head(F.adaptive_avg_pool2d(y, _clamped_sizes([6, 6], y.shape[-1])))


def test_wrapped_function_may_mutate_its_list_argument():
    """torch.fx passes a node's list literal to the interpreter as an immutable list, where
    the generated code passes a fresh list: shape propagation and the oracle run what the
    model runs."""
    torch.manual_seed(0)
    model, x = _WrappedMutation().eval(), torch.randn(1, 3, 4, 4)
    result, _ = prune_and_verify(model, x, ratio=0.5, frontend="fx")
    assert result.frontend == "fx"
    assert tensor_meta(next(n for n in result.groups.gm.graph.nodes if n.op == "output").args[0]).shape == (1, 4, 4, 4)
    assert result.module.conv.out_channels == 4


class _Features(nn.Module):
    """Returns an OrderedDict of feature maps, as torchvision's FPN backbones do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        from collections import OrderedDict

        out = OrderedDict()
        out["high"] = F.relu(self.a(x))
        out["low"] = self.b(out["high"]) * 1.0
        out["pooled"] = out["low"].mean((2, 3))
        return out


def test_ordered_dict_output_keeps_its_type_through_prune_and_save(tmp_path):
    """torch.fx records a returned OrderedDict as a plain dict; the captured graph's code
    returns an OrderedDict again, and so do the pruned module and its saved folder."""
    from collections import OrderedDict

    torch.manual_seed(0)
    model, x = _Features().eval(), torch.randn(1, 3, 8, 8)
    gm = fxprune.trace(model, x)
    assert type(gm(x)) is OrderedDict and list(gm(x)) == ["high", "low", "pooled"]
    result, _ = prune_and_verify(model, x, ratio=0.5, expect_removed=False)
    with torch.no_grad():
        out = result.module(x)
    assert type(out) is OrderedDict and list(out) == ["high", "low", "pooled"]
    fxprune.save(result, tmp_path / "saved")
    loaded = fxprune.load(tmp_path / "saved")
    with torch.no_grad():
        again = loaded(x)
    assert type(again) is OrderedDict and all(torch.equal(again[k], out[k]) for k in out)


@pytest.mark.parametrize("structure", ["dict", "list"])
def test_structured_inputs_are_constants_to_the_analysis(structure):
    """A model taking a dict (or list) of tensors: its entries are model inputs like any
    other (the analysis stopped with 'returned NoneType for a tensor output')."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.heads = nn.Linear(6, 16), nn.ModuleDict({"cls": nn.Linear(16, 3), "reg": nn.Linear(16, 4)})
            self.keys = ("x", "scale") if structure == "dict" else (0, 1)

        def forward(self, batch):
            x, scale = batch[self.keys[0]], batch[self.keys[1]]
            h = torch.relu(self.body(x * scale))
            return {k: m(h) for k, m in self.heads.items()}

    torch.manual_seed(0)
    x, scale = torch.randn(3, 6), torch.rand(3, 1) + 0.5
    batch = {"x": x, "scale": scale} if structure == "dict" else [x, scale]
    result, _ = prune_and_verify(Net().eval(), (batch,), ratio=0.5, healthy=False)  # fails without the rule
    assert result.frontend == "fx" and result.module.get_parameter("body.weight").shape[0] == 8


# -- a forward that assigns the model's parameters, buffers or submodules ------------------
def _registered(model: nn.Module) -> dict:
    """Every module's parameters, buffers and submodules, by object."""
    return {(name, registry, key): value for name, m in model.named_modules()
            for registry in ("_parameters", "_buffers", "_modules") for key, value in vars(m)[registry].items()}


def _assert_same_objects(model: nn.Module, before: dict) -> None:
    after = _registered(model)
    assert after.keys() == before.keys()
    assert [k for k, v in before.items() if after[k] is not v] == []


class RefreshedTable(nn.Module):
    """A forward that recomputes a registered buffer from itself and checks its size (a
    rotary cache refreshed in forward; timm's sincos embedding asserts its numel)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("table", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        self.table = self.table * 1.0
        assert self.table.numel() == 16
        return self.b(F.relu(self.a(x)) * self.table)


class LastInput(nn.Module):
    """A forward that stores a statistic of its input in a registered buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("last", torch.zeros(6))

    def forward(self, x):
        self.last = x.mean(0).detach()
        return self.b(F.relu(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("make", [RefreshedTable, LastInput])
def test_a_forward_assigning_a_buffer_leaves_the_model_as_it_was(make, frontend, tmp_path):
    """analyze, prune and save leave the user's model holding the same parameter, buffer
    and submodule objects with the same values, running to the same output and pickling;
    the captured graph and the pruned module, which pass the oracle, make the assignment
    on buffers of their own."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(4, 6)
    with torch.no_grad():
        ref = model(x)  # the state a forward on x leaves: later calls on x keep it
    objects, values = _registered(model), snapshot(model)
    groups = fxprune.analyze(model, x, frontend=frontend)
    _assert_same_objects(model, objects)
    x2 = torch.randn(5, 6)
    with torch.no_grad():
        groups.gm(x2)
    assert_untouched(model, values)
    result = fxprune.prune(model, x, ratio=0.5, frontend=frontend)
    _assert_same_objects(model, objects)
    assert_untouched(model, values)
    fxprune.save(result, tmp_path / "saved")
    _assert_same_objects(model, objects)
    assert_still_usable(model, (x,), ref, pickled=True)  # its forward assigns its buffer from here on
    assert result.frontend == ("export" if frontend == "export" else "fx")
    assert result.plan.n_removed == 8
    v = fxprune.verify(model, result, x)
    assert v.max_rel_err < 1e-6 and v.effect > 1e-4
    assert_untouched(model, values)
    assert_still_usable(model, (x,), ref, pickled=True)
    with torch.no_grad():
        out = result.module(x2)
        loaded = fxprune.load(tmp_path / "saved")(x2)
    assert out.shape == (5, 3) and torch.allclose(loaded, out)
    assert_untouched(model, values)  # the pruned module writes a buffer of its own
    if make is LastInput:
        assert torch.equal(result.module.get_buffer("last"), x2.mean(0))


class AssignedTensors(nn.Module):
    """A forward that reads a buffer, assigns it a new tensor, sets a plain tensor
    attribute, and reads both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("table", torch.linspace(1.5, 0.5, 16))

    def forward(self, x):
        h = F.relu(self.a(x)) * self.table
        self.table = torch.linspace(0.5, 1.5, 16)
        self.scale = torch.linspace(2.0, 1.0, 16)
        return self.b(h * self.table * self.scale)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_tensors_a_forward_assigns_are_values_of_the_graph(frontend):
    """The captured graph reads a buffer as the forward did at each point (the registered
    tensor before the assignment, the assigned one after) and keeps the assignment: run
    twice it gives what the model gives run twice, writing a buffer of its own. The model
    keeps its buffer and gets no attribute."""
    import copy

    torch.manual_seed(0)
    model, x = AssignedTensors().eval(), torch.randn(4, 6)
    twin, objects, values = copy.deepcopy(model), _registered(model), snapshot(model)
    gm = fxprune.trace(model, x, frontend=frontend)
    _assert_same_objects(model, objects)
    assert not hasattr(model, "scale")
    with torch.no_grad():
        first, second = gm(x), gm(x)
        assert torch.allclose(first, twin(x)) and torch.allclose(second, twin(x))
    assert not torch.allclose(first, second, atol=1e-3)  # the assignment changes the output
    assert_untouched(model, values)
    with torch.no_grad():
        model(x)  # the state a forward leaves: later calls keep it
    # export builds the assigned tensor in the graph (a factory op), which pins its channels
    prune_and_verify(model, x, ratio=0.5, frontend=frontend, healthy=False, expect_removed=frontend != "export")


class SwappedActivation(nn.Module):
    """A forward that replaces a submodule before calling it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(6, 16), nn.Linear(16, 3), nn.ReLU()

    def forward(self, x):
        self.act = nn.GELU()
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_a_forward_replacing_a_submodule_leaves_the_model_as_it_was(frontend, tmp_path):
    """The symbolic trace cannot call a submodule the model did not hold when it began:
    it fails naming the attribute; export (and auto, falling back to it) captures the
    forward. Either way the model keeps its submodule objects."""
    torch.manual_seed(0)
    model, x = SwappedActivation().eval(), torch.randn(4, 6)
    relu, objects = model.act, _registered(model)
    if frontend == "fx":
        with pytest.raises(fxprune.errors.TraceError, match="submodule 'act'"):
            fxprune.prune(model, x, ratio=0.5, frontend=frontend)
        assert model.act is relu
        _assert_same_objects(model, objects)
        return
    result = fxprune.prune(model, x, ratio=0.5, frontend=frontend)
    assert model.act is relu
    _assert_same_objects(model, objects)
    fxprune.save(result, tmp_path / "saved")
    _assert_same_objects(model, objects)
    assert result.frontend == "export" and result.plan.n_removed == 8
    values = snapshot(model)
    v = fxprune.verify(model, result, x)
    assert v.max_rel_err < 1e-6 and v.effect > 1e-4
    assert_untouched(model, values)
    with torch.no_grad():
        assert result.module(x).shape == (4, 3)


class InnerTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.linspace(0.5, 1.5, 16))

    def forward(self, h):
        self.table = self.table * 1.0
        return h * self.table


class RefreshedInner(nn.Module):
    """A submodule that recomputes its own buffer in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(6, 16), InnerTable(), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.inner(F.relu(self.a(x))))


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_a_submodule_assigning_its_buffer_is_kept_by_the_trace_and_refused_by_export(frontend):
    """torch.export drops a submodule's buffer assignment (it keeps only the model's own):
    it fails naming the buffer. The symbolic trace keeps it (auto captures with it)."""
    torch.manual_seed(0)
    model, x = RefreshedInner().eval(), torch.randn(4, 6)
    objects = _registered(model)
    if frontend == "export":
        with pytest.raises(fxprune.errors.TraceError, match="buffer 'inner.table'"):
            fxprune.prune(model, x, ratio=0.5, frontend=frontend)
        _assert_same_objects(model, objects)
        return
    result = fxprune.prune(model, x, ratio=0.5, frontend=frontend)
    _assert_same_objects(model, objects)
    assert result.frontend == "fx" and result.plan.n_removed == 8
    assert [n.target for n in result.module.graph.nodes if n.op == "call_method"] == ["copy_"]
    v = fxprune.verify(model, result, x)
    assert v.max_rel_err < 1e-6 and v.effect > 1e-4


class ResizedCache(nn.Module):
    """A forward that assigns a registered buffer a tensor of another shape (a cache
    rebuilt for the batch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("cache", torch.ones(1, 16))

    def forward(self, x):
        self.cache = torch.linspace(0.5, 1.5, 16).repeat(x.shape[0], 1)
        return self.b(F.relu(self.a(x)) * self.cache)


class DataAssigned(nn.Module):
    """A forward that rescales a parameter through ``.data``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        self.w.data = self.w.data * 2.0
        return self.b(F.relu(self.a(x)) * self.w)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
@pytest.mark.parametrize("make, named", [(ResizedCache, "buffer 'cache'"), (DataAssigned, r"'w\.data'")])
def test_an_assignment_no_graph_keeps_fails_the_capture_naming_it(make, named, frontend):
    """A buffer assigned a tensor of another shape (a graph keeps a buffer assignment as
    an in-place copy) and a parameter's ``.data`` assigned (torch.fx records no node for
    it) fail the capture with a TraceError naming the attribute (torch.export's own error
    for ``.data``); the model is left with its objects and values."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(4, 6)
    objects, values = _registered(model), snapshot(model)
    match = None if (make is DataAssigned and frontend == "export") else named
    with pytest.raises(fxprune.errors.TraceError, match=match):
        fxprune.prune(model, x, ratio=0.5, frontend=frontend)
    _assert_same_objects(model, objects)
    assert_untouched(model, values)


class _FactoryOfTracedSizes(nn.Module):
    """Tensors made in forward from traced sizes given as varargs, the first one traced
    (torch's argument parser takes ``ones(n, 3)`` as sizes only when ``n`` is an int)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        n, h = y.shape[0], y.shape[2]
        shift = torch.ones(n, 1, h, 1, dtype=y.dtype) + torch.zeros(n, 1, 1, 1).sum() \
            + torch.empty(n, 1, 1, 1).fill_(0.5) + 0 * (torch.rand(n, 1).sum() + torch.randn(n, 2).sum())
        return self.conv2(y + shift)


def test_factories_with_traced_varargs_sizes_are_traced_and_read_their_sizes_at_run_time():
    torch.manual_seed(0)
    model = _FactoryOfTracedSizes().eval()
    ones = torch.ones
    result, _ = prune_and_verify(model, torch.randn(2, 3, 6, 6), ratio=0.5)
    assert result.frontend == "fx"
    assert torch.ones is ones  # the trace put torch's own factory back
    assert result.module.conv1.out_channels == 4
    made = [n.target for n in result.module.graph.nodes if n.op == "call_function"]
    assert {torch.ones, torch.zeros, torch.empty, torch.rand, torch.randn} <= set(made)
    assert result.module(torch.randn(5, 3, 4, 4)).shape == (5, 4, 4, 4)  # the sizes are read at run time


class _OptionalMask(nn.Module):
    """An optional mask input, used only when given."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None):
        h = torch.relu(self.conv1(x))
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return self.conv2(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_input_given_as_none_is_traced_absent_and_a_value_there_is_an_error(frontend, tmp_path):
    import pickle

    from fxprune.errors import InputError

    torch.manual_seed(0)
    model, x = _OptionalMask().eval(), torch.randn(2, 3, 6, 6)
    result, _ = prune_and_verify(model, (x, None), ratio=0.5, frontend=frontend)
    assert result.frontend == frontend
    pruned = pickle.loads(pickle.dumps(result.module))
    assert pruned.get_parameter("conv1.weight").shape[0] == 4
    with torch.no_grad():
        assert pruned(x, None).shape == model(x).shape
        with pytest.raises(InputError, match="'mask' was None in the example inputs"):
            pruned(x, torch.zeros(2, 4, 6, 6, dtype=torch.bool))  # ignored silently before
    fxprune.save(result, tmp_path / "saved")  # the saved folder, which imports no fxprune, checks it too
    loaded = fxprune.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(x, None), pruned(x, None))
        with pytest.raises(ValueError, match="'mask' was None in the example inputs"):
            loaded(x, torch.zeros(2, 4, 6, 6, dtype=torch.bool))
