"""Rules of convolutions, concatenation, contractions, ATen ops, embeddings and recurrent
layers read a call's arguments by parameter name: a call passing an argument by position,
by keyword or leaving it to its default is analysed and rewritten alike."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.arguments import bind_args
from tests.helpers.oracle import prune_and_verify
from tests.helpers.rule_harness import run_rule

aten = torch.ops.aten


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _same_analysis(a, b) -> None:
    assert a.rule == b.rule
    assert _equal(a.output, b.output) and a.out_dim == b.out_dim
    assert a.alignments == b.alignments
    assert a.pinned == b.pinned and a.inexact == b.inexact
    assert a.barriers == b.barriers


# -- functional convolutions: groups by position, by keyword, or left to its default ------------
class FunctionalDepthwise(nn.Module):
    """A stem, a functional depthwise 3x3 conv (groups passed as ``how`` says) or, for
    ``"default"``, a functional dense 1x1 conv (groups left at 1), and a head."""

    def __init__(self, how: str, c: int = 8):
        super().__init__()
        self.how, self.c = how, c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        if how == "default":
            self.weight = nn.Parameter(torch.randn(c, c, 1, 1) * 0.3)
        else:
            self.weight = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.how == "positional":
            h = F.conv2d(h, self.weight, self.bias, 1, 1, 1, self.c)
        elif self.how == "keyword":
            h = F.conv2d(h, self.weight, self.bias, padding=1, groups=self.c)
        else:
            h = F.conv2d(h, self.weight, self.bias)
        return self.head(torch.relu(h))


def _conv_calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("how", ["positional", "keyword", "default"])
def test_functional_conv_groups_by_position_keyword_and_default(how):
    torch.manual_seed(0)
    model = FunctionalDepthwise(how)
    result, _ = prune_and_verify(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    (call,) = _conv_calls(result.module, F.conv2d)
    groups = bind_args(call).values.get("groups", 1)  # (F.conv2d binds without defaults)
    kept = result.module.stem.out_channels
    assert kept < 8
    assert groups == (1 if how == "default" else kept)
    if how == "positional":  # written where the call passed it
        assert call.args[6] == kept and "groups" not in call.kwargs
    elif how == "keyword":
        assert call.kwargs["groups"] == kept


def test_functional_conv_analysis_is_the_same_by_position_and_by_keyword():
    x, w = torch.randn(1, 6, 5, 5), nn.Parameter(torch.randn(6, 1, 3, 3))
    by_position = run_rule(F.conv2d, x, w, None, 1, 1, 1, 6)
    by_keyword = run_rule(F.conv2d, x, w, kwargs={"padding": 1, "groups": 6})
    _same_analysis(by_position, by_keyword)
    assert by_position.output == by_position.inputs[0]  # depthwise: the input's channels carry through


# -- aten.convolution: groups is its 9th argument -----------------------------------------------
def test_aten_convolution_reads_groups_by_name():
    x = torch.randn(1, 6, 5, 5)
    depthwise = run_rule(aten.convolution.default, x, nn.Parameter(torch.randn(6, 1, 3, 3)), None,
                         [1, 1], [1, 1], [1, 1], False, [0, 0], 6)
    assert depthwise.output == depthwise.inputs[0]
    assert depthwise.alignments[("p0", "channel")] == depthwise.inputs[0]
    grouped = run_rule(aten.convolution.default, x, nn.Parameter(torch.randn(4, 3, 3, 3)), None,
                       [1, 1], [1, 1], [1, 1], False, [0, 0], 2)
    # two groups of three input channels: the same local channels go in both groups
    assert grouped.inputs[0][:3] == grouped.inputs[0][3:]
    assert grouped.output[:2] == grouped.output[2:]
    # the same call through its functional twin
    twin = run_rule(F.conv2d, x, nn.Parameter(torch.randn(4, 3, 3, 3)), None, 1, 1, 1, 2)
    assert twin.output == grouped.output and twin.inputs == grouped.inputs
    # transposed (its 7th argument): weight (C_in, C_out / groups, k, k), as F.conv_transpose2d's
    w = torch.randn(6, 2, 3, 3)
    transposed = run_rule(aten.convolution.default, x, nn.Parameter(w), None, [1, 1], [0, 0], [1, 1], True,
                          [0, 0], 2)
    twin = run_rule(F.conv_transpose2d, x, nn.Parameter(w.clone()), None, 1, 0, 0, 2)
    _same_analysis(transposed, twin)
    assert len(transposed.output) == 4


class AtenDepthwise(nn.Module):
    """A stem, a depthwise conv written as aten.convolution (groups passed positionally,
    9th), and a head."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = aten.convolution.default(h, self.weight, self.bias, [1, 1], [1, 1], [1, 1], False, [0, 0], self.c)
        return self.head(torch.relu(h))


def test_aten_convolution_groups_rewritten_at_their_position():
    torch.manual_seed(0)
    result, _ = prune_and_verify(AtenDepthwise(), torch.randn(2, 3, 8, 8), ratio=0.5)
    (call,) = _conv_calls(result.module, aten.convolution.default)
    kept = result.module.stem.out_channels
    assert kept < 8 and call.args[8] == kept and call.args[6] is False


# -- concatenation: torch.concatenate's dim may be given as axis --------------------------------
def test_concatenate_reads_axis_as_the_dim():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    by_axis = run_rule(torch.concatenate, [x, y], kwargs={"axis": 1})
    assert by_axis.output == by_axis.inputs[0] + by_axis.inputs[1]
    for op in (torch.cat, torch.concat, torch.concatenate):
        _same_analysis(run_rule(op, [x, y], 1), by_axis)
        _same_analysis(run_rule(op, [x, y], kwargs={"dim": 1}), by_axis)
    _same_analysis(run_rule(torch.concat, [x, y], kwargs={"axis": 1}), by_axis)


class ConcatenateAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.concatenate([self.a(x), self.b(x)], axis=1)))


def test_concatenate_with_axis_prunes_and_verifies():
    torch.manual_seed(0)
    result, _ = prune_and_verify(ConcatenateAxis(), torch.randn(2, 3, 8, 8), ratio=0.5)
    assert result.module.head.in_channels == result.module.a.out_channels + result.module.b.out_channels < 10


def test_unbind_and_split_dims_by_position_and_keyword():
    x = torch.randn(2, 4, 3)
    _same_analysis(run_rule(torch.unbind, x, 0), run_rule(torch.unbind, x, kwargs={"dim": 0}))
    _same_analysis(run_rule("unbind", x, 0), run_rule("unbind", x, kwargs={"dim": 0}))
    pinned = run_rule(torch.unbind, x, kwargs={"dim": 1})  # over the channels: pinned
    assert set(pinned.inputs[0]) <= pinned.pinned
    _same_analysis(run_rule(torch.tensor_split, x, 2, 1), run_rule(torch.tensor_split, x, 2, kwargs={"dim": 1}))


# -- contractions ----------------------------------------------------------------------------
def test_sdpa_mask_by_position_and_keyword():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.randn(2, 4, 5, 6)
    dims = [1, 1, 1, 1]  # the heads are the channels, the mask's too
    _same_analysis(run_rule(F.scaled_dot_product_attention, q, k, v, mask, channel_dims=dims),
                   run_rule(F.scaled_dot_product_attention, q, k, v, kwargs={"attn_mask": mask}, channel_dims=dims))


def test_sdpa_one_dim_mask_runs_along_s():
    """A 1-d mask is broadcast over L: it has S's letter only, never L's."""
    q, k, v = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = torch.randn(6)
    # q's channels along L (length 6 = S), k's and v's along S: the mask's run along S, not L
    r = run_rule(F.scaled_dot_product_attention, q, k, v, kwargs={"attn_mask": mask}, channel_dims=[1, 1, 1, 0])
    assert not set(r.inputs[0]) & set(r.inputs[3])  # q's L channels are not the mask's S positions
    assert set(r.inputs[3]) <= r.pinned  # channels along S of the scores: kept whole
    assert not set(r.inputs[0]) & r.pinned


def test_matmul_and_addmm_operands_by_position_and_keyword():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    _same_analysis(run_rule(torch.matmul, a, b), run_rule(torch.matmul, a, kwargs={"other": b}))
    _same_analysis(run_rule(torch.mm, a, b), run_rule(torch.mm, a, kwargs={"mat2": b}))
    _same_analysis(run_rule("matmul", a, b), run_rule("matmul", a, kwargs={"other": b}))
    bias = torch.randn(5)
    _same_analysis(run_rule(torch.addmm, bias, a, b), run_rule(torch.addmm, bias, kwargs={"mat1": a, "mat2": b}))
    x = torch.randn(4)
    _same_analysis(run_rule(torch.outer, x, x.clone()), run_rule(torch.outer, x, kwargs={"vec2": x.clone()}))


# -- ATen forms of getitem, top-k --------------------------------------------------------------
def test_aten_slice_select_topk_by_position_and_keyword():
    x = torch.randn(2, 6, 4)
    _same_analysis(run_rule(aten.slice.Tensor, x, 1, 0, 4), run_rule(aten.slice.Tensor, x, kwargs={"dim": 1, "end": 4}))
    _same_analysis(run_rule(aten.select.int, x, 2, 1), run_rule(aten.select.int, x, kwargs={"dim": 2, "index": 1}))
    _same_analysis(run_rule(torch.topk, x, 2, 1), run_rule(torch.topk, x, 2, kwargs={"dim": 1}))
    _same_analysis(run_rule("topk", x, 2, 1), run_rule("topk", x, 2, kwargs={"dim": 1}))


# -- embeddings and recurrent cells --------------------------------------------------------------
def test_embedding_weight_and_max_norm_by_name():
    idx = torch.randint(0, 10, (2, 3))
    w = nn.Parameter(torch.randn(10, 6))
    by_position = run_rule(F.embedding, idx, w, None, 1.0)
    by_keyword = run_rule(F.embedding, idx, kwargs={"weight": w, "max_norm": 1.0})
    _same_analysis(by_position, by_keyword)
    assert by_position.inexact  # max_norm mixes the embedding dim
    assert not run_rule(F.embedding, idx, w).inexact
    aten_form = run_rule(aten.embedding.default, nn.Parameter(torch.randn(10, 6)), idx)
    assert aten_form.alignments.keys() == by_position.alignments.keys()


def test_aten_cell_weights_by_name():
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    w_ih, w_hh = nn.Parameter(torch.randn(15, 4)), nn.Parameter(torch.randn(15, 5))
    by_position = run_rule(aten.gru_cell.default, x, h, w_ih, w_hh, channel_dims=[1, 1])
    by_keyword = run_rule(aten.gru_cell.default, x, h, kwargs={"w_ih": w_ih, "w_hh": w_hh}, channel_dims=[1, 1])
    _same_analysis(by_position, by_keyword)
    assert by_position.output == by_position.inputs[1]  # the new state has the old state's units
