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
