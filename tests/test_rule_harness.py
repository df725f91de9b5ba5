"""One rule at a time (tests/helpers/rule_harness.py): a view, a concat, a conv, a layer
norm and a pointwise op, each on a three-node graph, with the classes it makes.
Channels are named by small ints in order of first appearance (inputs first)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import Unsupported
from tests.helpers.rule_harness import run_rule


def test_view_splitting_channels_keeps_one_dim_prunable():
    # (B, 8, T) -> (B, 2, 4, T): under the "inner" policy the inner dim (head_dim) stays
    # prunable, so channel i of every block of 4 is one class (the same i goes from each)
    r = run_rule("view", torch.randn(2, 8, 3), 2, 2, 4, 3)
    assert r.rule == "split_relabel"
    assert r.out_dim == 2 and r.output == [0, 1, 2, 3]
    assert r.inputs == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert not r.pinned
    outer = run_rule("view", torch.randn(2, 8, 3), 2, 2, 4, 3, policy="outer")  # whole heads
    assert outer.out_dim == 1 and outer.output == [0, 1]
    assert outer.inputs == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_flatten_keeps_the_channel_order():
    r = run_rule(torch.flatten, torch.randn(2, 5, 1, 1), 1)
    assert r.rule == "relabel"
    assert r.out_dim == 1 and r.output == r.inputs[0] == [0, 1, 2, 3, 4]


def test_cat_along_channels_puts_the_inputs_side_by_side():
    r = run_rule(torch.cat, [torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)], kwargs={"dim": 1})
    assert r.rule == "cat"
    assert r.inputs == [[0, 1, 2], [3, 4]]
    assert r.out_dim == 1 and r.output == [0, 1, 2, 3, 4]
    assert not r.pinned


def test_cat_along_another_dim_couples_the_inputs_channels():
    r = run_rule(torch.cat, [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 4)], kwargs={"dim": 2})
    # the two inputs' channel c now share every output position of channel c
    assert r.inputs[0] == r.inputs[1] == r.output == [0, 1, 2]


def test_conv_makes_fresh_output_channels_and_consumes_its_input():
    conv = nn.Conv2d(3, 4, 3)
    r = run_rule(conv, torch.randn(1, 3, 8, 8))
    assert r.rule == "conv"
    assert r.inputs == [[0, 1, 2]]
    assert r.output == [3, 4, 5, 6]  # new channels, one per filter
    assert r.alignments[("op.weight", "out")] == r.output
    assert r.alignments[("op.weight", "in")] == r.inputs[0]
    assert r.alignments[("op.bias", "out")] == r.output
    assert r.consumed == [0]


def test_grouped_conv_removes_the_same_local_channels_from_every_group():
    conv = nn.Conv2d(4, 4, 1, groups=2)
    r = run_rule(conv, torch.randn(1, 4, 3, 3))
    # input channel i of group 0 and i of group 1 go together, as do the outputs
    assert r.inputs == [[0, 1, 0, 1]]
    assert r.output[0::2] == [r.output[0]] * 2 and r.output[1::2] == [r.output[1]] * 2


def test_layer_norm_keeps_the_channels_and_marks_them_inexact():
    norm = nn.LayerNorm(6)
    r = run_rule(norm, torch.randn(2, 5, 6), channel_dims=[2])
    assert r.rule == "layer_norm"
    assert r.output == r.inputs[0] == [0, 1, 2, 3, 4, 5]
    assert r.alignments[("op.weight", "norm")] == r.inputs[0]
    assert r.inexact == set(range(6))  # its statistics mix every channel
    assert not r.pinned


def test_pointwise_add_couples_aligned_channels():
    r = run_rule(torch.add, torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2))
    assert r.rule == "pointwise"
    assert r.inputs == [[0, 1, 2, 3], [0, 1, 2, 3]]  # the residual ties them
    assert r.output == [0, 1, 2, 3]


def test_pointwise_broadcast_across_channels_pins_them():
    # a (1, 1, H, W) map scaling every channel: its single position is pinned, the
    # channels it scales stay free (not coupled to it)
    r = run_rule(torch.mul, torch.randn(1, 4, 2, 2), torch.randn(1, 1, 2, 2))
    assert r.output == r.inputs[0] == [0, 1, 2, 3]
    assert r.inputs[1] == [4] and r.pinned == {4}


def test_softmax_over_channels_is_inexact():
    r = run_rule(F.softmax, torch.randn(2, 5), kwargs={"dim": -1})
    assert r.output == r.inputs[0] and r.inexact == set(r.inputs[0])


def test_integer_index_into_channels_pins_them():
    import operator

    r = run_rule(operator.getitem, torch.randn(2, 4, 3), (slice(None), 1))
    assert r.pinned == {0, 1, 2, 3}  # removing a channel would change which one x[:, 1] reads
    assert r.out_dim is None and r.output == 1  # the output is that channel's class


def test_a_refusal_is_raised_as_unsupported():
    with pytest.raises(Unsupported):
        run_rule(torch.tensor_split, torch.randn(2, 6), torch.tensor([2, 4]), kwargs={"dim": 1})


def test_a_parameter_argument_is_read_by_get_attr_and_aligned_by_path():
    r = run_rule(F.conv2d, torch.randn(1, 3, 5, 5), nn.Parameter(torch.randn(4, 3, 1, 1)))
    assert r.rule == "conv" and r.output == [3, 4, 5, 6]
    assert r.alignments[("p0", "in")] == r.inputs[0] == [0, 1, 2]
    assert r.alignments[("p0", "out")] == r.output


# -- named arguments ----------------------------------------------------------------------
def _named(fn, *args, **kwargs):
    """The arguments ``ctx.named_args`` gives the rule of ``fn(*args, **kwargs)``, by name,
    with each example tensor shown as its shape."""
    import fxprune.rules.registry as registry

    seen = {}
    spec_of = registry.lookup

    def spy(node, root):
        spec = spec_of(node, root)

        def analyze(ctx, n):
            seen.update({k: tuple(ctx.meta(v).shape) if isinstance(v, torch.fx.Node) else v
                         for k, v in ctx.named_args(("input", "dim")).items()})
            return spec.analyze(ctx, n)
        return registry.OpSpec(spec.name, analyze)

    import tests.helpers.rule_harness as harness

    saved, harness.lookup = harness.lookup, spy
    try:
        run_rule(fn, *args, kwargs=kwargs)
    finally:
        harness.lookup = saved
    return seen


def test_named_args_are_the_same_by_position_and_by_keyword():
    x = torch.randn(2, 8, 3)
    by_position, by_keyword = _named(F.glu, x, 1), _named(F.glu, x, dim=1)
    assert by_position == by_keyword == {"input": (2, 8, 3), "dim": 1}
    # an ATen overload: its schema's names, with ``self`` called ``input``
    assert _named(torch.ops.aten.glu.default, x, 1) == {"input": (2, 8, 3), "dim": 1}
    # defaults are filled in where the signature is known
    assert _named(F.softmax, x, 1)["dtype"] is None


def test_named_args_fall_back_to_the_rules_names_for_a_method():
    assert _named("softmax", torch.randn(2, 4), 1) == {"input": (2, 4), "dim": 1}
    assert _named("softmax", torch.randn(2, 4), dim=-1) == {"input": (2, 4), "dim": -1}


def test_named_args_name_the_node_when_the_rule_names_too_few():
    from fxprune.errors import AnalysisError

    with pytest.raises(AnalysisError, match="positional arguments but the rule names only 2"):
        _named("repeat", torch.randn(2, 4), 1, 2, 3)  # 4 positionals, the spy names 2


# -- an op spec's shape shortcut and FLOP count are what capture and the MAC count use ------
class _NoMetaKernel(nn.Module):
    """A (toy) layer whose forward cannot run on meta tensors: only its op spec's shape
    shortcut can give its output shape there."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        if x.device.type == "meta":
            raise RuntimeError("no meta kernel")
        return x @ self.weight


def _no_meta_shape(op, args, kwargs):
    return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta") if len(args) == 1 else None


def _no_meta_flops(op, args, out):
    return 1000


def _no_meta_rule(ctx, node):
    return ctx.labels_or_const(node.args[0])


def test_a_spec_declares_its_keys_shape_and_flops_in_one_place():
    from fxprune.budget import meta_stats
    from fxprune.capture import module_shape, propagate_shapes
    from fxprune.rules import registry

    if registry.module_spec(_NoMetaKernel) is None:
        registry.register(_NoMetaKernel, shape=_no_meta_shape, flops=_no_meta_flops)(_no_meta_rule)
    spec = registry.module_spec(_NoMetaKernel)
    assert spec.keys == (_NoMetaKernel,) and spec.shape is _no_meta_shape and spec.flops is _no_meta_flops
    assert module_shape(_NoMetaKernel(3), (torch.randn(2, 3),), {}) == (2, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _NoMetaKernel(3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x))

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, _NoMetaKernel) or super().is_leaf_module(m, name)

    net = Net()
    gm = torch.fx.GraphModule(net, Leaves().trace(net))
    assert propagate_shapes(gm, (torch.randn(4, 3),)) == "meta"  # the shortcut, not the kernel
    macs = meta_stats(gm, (torch.randn(4, 3),)).macs
    assert macs == (1000 + 2 * 4 * 3 * 2) // 2  # the spec's FLOPs, plus the linear's


def test_flops_without_a_shape_shortcut_is_refused():
    from fxprune.rules import registry

    with pytest.raises(ValueError, match="pass shape= too"):
        registry.register(type("Other", (nn.Module,), {}), flops=_no_meta_flops)


def test_named_args_bind_builtins_whose_overloads_name_their_parameters_alike():
    # F.conv2d's overloads differ only in padding's type: torch.fx will not choose one,
    # but every parameter has the same name in both
    x, w = torch.randn(1, 4, 6, 6), nn.Parameter(torch.randn(4, 1, 3, 3))
    assert _named(F.conv2d, x, w, None, 1, 1, 1, 4)["groups"] == 4
    named = _named(F.conv2d, x, w, padding="same", groups=4)
    assert named["padding"] == "same" and named["groups"] == 4 and named["weight"] == (4, 1, 3, 3)
    # torch.max(x, 1): the overloads call the second parameter dim or other, so the
    # rule's own names are used
    assert _named(torch.max, torch.randn(2, 4), 1) == {"input": (2, 4), "dim": 1}


def test_replace_arg_writes_where_the_call_passed_it():
    from fxprune.arguments import bind_args, replace_arg

    def f(x, w):
        return F.conv2d(x, w, None, 1, 1, 1, 1), F.conv2d(x, w, padding=1, groups=1), F.conv2d(x, w)

    gm = torch.fx.symbolic_trace(f)
    positional, keyword, default = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in (positional, keyword, default):
        replace_arg(node, bind_args(node), "groups", 2)
    assert positional.args[6] == 2 and "groups" not in positional.kwargs
    assert keyword.kwargs["groups"] == 2 and len(keyword.args) == 2
    assert default.kwargs == {"groups": 2}
    # an ATen schema's self is the rules' input
    gm = torch.fx.symbolic_trace(lambda x: torch.ops.aten.sum.dim_IntList(x, [1]))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    y = next(n for n in gm.graph.nodes if n.op == "placeholder")
    replace_arg(node, bind_args(node), "input", y)
    assert node.args[0] is y
    node.args, node.kwargs = (), {"self": y, "dim": [1]}
    replace_arg(node, bind_args(node), "dim", [0])
    assert node.kwargs == {"self": y, "dim": [0]}


def test_named_args_call_a_modules_first_argument_input():
    # nn.RMSNorm.forward(x): the rules read every layer's input as "input"
    assert _named(nn.RMSNorm(4), torch.randn(2, 4)) == {"input": (2, 4)}


def test_an_ops_aten_keys_share_its_spec():
    from fxprune.rules import registry

    spec = registry.module_spec(nn.Conv2d)
    assert spec is registry.function_spec(F.conv2d) is registry.function_spec(torch.ops.aten.conv2d)
    assert torch.ops.aten.conv2d in spec.keys and nn.Conv2d in spec.keys
    assert spec.rewrite is not None and spec.shape is not None and spec.flops is not None


@pytest.mark.parametrize("op, args", [
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (torch.randn(2, 3, 9, 9),)),
    (nn.Conv1d(4, 6, 3, dilation=2), (torch.randn(2, 4, 11),)),
    (nn.Linear(5, 7), (torch.randn(2, 3, 5),)),
    (F.linear, (torch.randn(4, 5), torch.randn(7, 5))),
    (F.scaled_dot_product_attention, (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5))),
    (nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3), (torch.randn(5, 2, 4),)),
    (nn.GRU(4, 6, batch_first=True), (torch.randn(2, 5, 4),)),
], ids=["conv2d", "conv1d", "Linear", "linear", "sdpa", "lstm", "gru"])
def test_a_specs_flop_count_is_what_the_kernel_counts(op, args):
    """The shape shortcut gives the kernel's output shapes, and the FLOP count what
    torch.utils.flop_counter counts when the kernel runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from fxprune.rules import registry

    spec = registry.module_spec(type(op)) if isinstance(op, nn.Module) else registry.function_spec(op)
    meta_args = tuple(a.to("meta") for a in args)
    out = spec.shape(op, meta_args, {})
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        want = op(*args)
    assert [t.shape for t in torch.utils._pytree.tree_leaves(out)] == \
        [t.shape for t in torch.utils._pytree.tree_leaves(want)]
    assert spec.flops(op, meta_args, out) == counter.get_total_flops()
