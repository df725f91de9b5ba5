"""Rules read their arguments by parameter name: the same call by position and by keyword
is analysed alike (gather, scatter, narrow, the norms, reductions, unflatten, unfold),
and models that pass sizes, dims and group counts by keyword prune and verify."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.oracle import prune_and_verify
from tests.helpers.rule_harness import run_rule


def _same(a, b):
    """Two rule results decide the same classes, pins, alignments and consumers."""
    assert (a.rule, a.inputs, a.output, a.out_dim) == (b.rule, b.inputs, b.output, b.out_dim)
    assert (a.alignments, a.pinned, a.inexact, a.consumed) == (b.alignments, b.pinned, b.inexact, b.consumed)


def _idx(*shape, high=3):
    return torch.randint(0, high, shape)


# -- by position and by keyword ---------------------------------------------------------
def test_gather_reads_dim_and_index_by_name():
    x, idx = torch.randn(2, 4, 5), _idx(2, 4, 2)
    by_position = run_rule(torch.gather, x, 2, idx)
    _same(by_position, run_rule(torch.gather, x, kwargs={"dim": 2, "index": idx}))
    _same(by_position, run_rule("gather", x, 2, kwargs={"index": idx}))
    assert by_position.pinned  # the index spans the channels with a size of its own


def test_take_along_dim_reads_its_indices_and_dim_by_name():
    x, idx = torch.randn(2, 4, 5), _idx(2, 4, 2)
    by_position = run_rule(torch.take_along_dim, x, idx, 2)
    _same(by_position, run_rule(torch.take_along_dim, x, kwargs={"indices": idx, "dim": 2}))


@pytest.mark.parametrize("op,src", [(torch.scatter, "src"), (torch.scatter_add, "src"),
                                    (torch.index_add, "source")])
def test_scatter_reads_its_source_by_keyword(op, src):
    x, s = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    idx = _idx(2, 4, 5, high=5) if op is not torch.index_add else torch.tensor([0, 2, 1, 4, 3])
    by_position = run_rule(op, x, 2, idx, s)
    _same(by_position, run_rule(op, x, 2, idx, kwargs={src: s}))
    _same(by_position, run_rule(op, x, kwargs={"dim": 2, "index": idx, src: s}))
    # the source's channels go with the input's (it is read, not skipped)
    assert by_position.inputs[0] == by_position.inputs[-1]


def test_scatter_method_reads_its_source_by_keyword():
    x, s, idx = torch.randn(2, 4, 5), torch.randn(2, 4, 5), _idx(2, 4, 5, high=5)
    _same(run_rule("scatter_add", x, 2, idx, s), run_rule("scatter_add", x, 2, idx, kwargs={"src": s}))


def test_narrow_by_keyword():
    x = torch.randn(2, 6, 3)
    by_position = run_rule(torch.narrow, x, 1, 2, 3)
    assert by_position.output == [2, 3, 4]
    _same(by_position, run_rule(torch.narrow, x, kwargs={"dim": 1, "start": 2, "length": 3}))
    _same(by_position, run_rule("narrow", x, 1, kwargs={"start": 2, "length": 3}))


def test_layer_norm_reads_normalized_shape_by_keyword():
    x, w = torch.randn(2, 5, 6), nn.Parameter(torch.randn(6))
    by_position = run_rule(F.layer_norm, x, [6], w, channel_dims=[2])
    by_keyword = run_rule(F.layer_norm, x, kwargs={"normalized_shape": [6], "weight": w}, channel_dims=[2])
    _same(by_position, by_keyword)
    assert by_keyword.alignments[("p0", "norm")] == by_keyword.inputs[0]
    assert by_keyword.inexact == set(by_keyword.inputs[0])


def test_group_norm_reads_num_groups_by_keyword():
    x = torch.randn(2, 8, 3)
    by_position = run_rule(F.group_norm, x, 2)
    _same(by_position, run_rule(F.group_norm, x, kwargs={"num_groups": 2}))
    # four groups of two: local channel i of every group goes together
    assert run_rule(F.group_norm, x, kwargs={"num_groups": 4}).inputs == [[0, 1] * 4]


@pytest.mark.parametrize("op", [torch.sum, "sum", torch.amax, "mean"])
def test_a_reduction_reads_dim_and_keepdim_by_keyword(op):
    x = torch.randn(2, 4, 5)
    by_position = run_rule(op, x, 2, True)
    _same(by_position, run_rule(op, x, kwargs={"dim": 2, "keepdim": True}))
    _same(by_position, run_rule(op, x, 2, kwargs={"keepdim": True}))
    assert by_position.out_dim == 1 and by_position.output == [0, 1, 2, 3]


def test_std_and_var_take_unbiased_before_keepdim():
    # std(x, dim, unbiased, keepdim): a third positional argument is unbiased, so the
    # reduced dim is dropped; the output (3,) varies along its dim 0
    x = torch.randn(4, 3)
    for op in (torch.std, torch.var, "std", "var"):
        r = run_rule(op, x, 0, True)
        assert r.out_dim == 0 and r.output == [0, 1, 2], op
        _same(r, run_rule(op, x, 0, kwargs={"unbiased": True}))
        kept = run_rule(op, x, 0, True, True)  # keepdim: (1, 3)
        assert kept.out_dim == 1 and kept.output == [0, 1, 2], op


def test_max_with_another_tensor_by_keyword_is_elementwise():
    x, y = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    r = run_rule(torch.max, x, kwargs={"other": y})
    assert r.rule == run_rule(torch.max, x, y).rule
    assert r.inputs[0] == r.inputs[1] == r.output  # aligned positions meet


@pytest.mark.parametrize("op", [torch.unflatten, "unflatten"])
def test_unflatten_reads_sizes_by_keyword(op):
    x = torch.randn(2, 8, 3)
    by_position = run_rule(op, x, 1, (2, 4))
    _same(by_position, run_rule(op, x, 1, kwargs={"sizes": (2, 4)}))
    _same(by_position, run_rule(op, x, kwargs={"dim": 1, "sizes": (2, 4)}))


def test_unfold_reads_its_dimension_by_name():
    x = torch.randn(2, 4, 6)
    along = run_rule(torch.ops.aten.unfold.default, x, 1, 2, 1)  # windows over the channels: pinned
    assert along.pinned == set(along.inputs[0])
    _same(along, run_rule("unfold", x, 1, 2, 1))
    _same(along, run_rule("unfold", x, kwargs={"dimension": 1, "size": 2, "step": 1}))
    across = run_rule("unfold", x, kwargs={"dimension": 2, "size": 2, "step": 1})
    assert not across.pinned
    _same(across, run_rule(torch.ops.aten.unfold.default, x, 2, 2, 1))


def test_roll_reads_dims_by_keyword():
    x = torch.randn(2, 4, 5)
    assert run_rule(torch.roll, x, 1, kwargs={"dims": 1}).pinned == {0, 1, 2, 3}
    assert not run_rule(torch.roll, x, 1, kwargs={"dims": 2}).pinned


# -- models passing arguments by keyword prune and verify -------------------------------
class _NormByKeyword(nn.Module):
    """conv -> a functional norm with its sizes passed by keyword -> conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(1 + 0.5 * torch.rand(8))
        self.bias = nn.Parameter(0.1 * torch.randn(8))
        self.conv2 = nn.Conv2d(8, 4, 1)


class _GroupNormByKeyword(_NormByKeyword):
    def forward(self, x):
        y = F.group_norm(self.conv1(x), num_groups=4, weight=self.weight, bias=self.bias)
        return self.conv2(F.relu(y))


class _LayerNormByKeyword(_NormByKeyword):
    def forward(self, x):
        y = self.conv1(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, normalized_shape=(8,), weight=self.weight, bias=self.bias)
        return self.conv2(F.gelu(y.permute(0, 3, 1, 2)))


class _NarrowByKeyword(nn.Module):
    """A GLU written with narrow: channel i of the value half goes with i of the gate."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        value = torch.narrow(y, dim=1, start=0, length=4)
        gate = torch.narrow(y, dim=1, start=4, length=4)
        return self.conv2(value * torch.sigmoid(gate))


class _NarrowFromTheEnd(_NarrowByKeyword):
    """The gate half read with a negative start (counted from the end of the dim)."""

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(y.narrow(1, 0, 4) * torch.sigmoid(y.narrow(1, -4, 4)))


class _UnflattenByKeyword(nn.Module):
    """Two groups of four channels summed: channel i of both goes together."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv1(x).unflatten(dim=1, sizes=(2, 4))
        return self.conv2(F.relu(y).sum(dim=1))


class _StdPool(nn.Module):
    """Per-channel spatial statistics: ``std(x, dim, unbiased)`` drops the reduced dim."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv1(x).flatten(2)
        return self.fc(y.std(2, True) + torch.var(y, 2, False))


class _GatherScatterByKeyword(nn.Module):
    """Top-k positions gathered with a broadcast index passed by keyword, then scattered
    back with ``src`` by keyword: the rewrite narrows the index to the kept channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.score = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv1(x).flatten(2)
        idx = self.score(x).flatten(2).topk(5, dim=2).indices.expand(-1, 8, -1)
        picked = torch.gather(y, dim=2, index=idx)
        back = torch.zeros_like(y).scatter_add(2, idx, src=F.relu(picked))
        return self.fc(back.sum(dim=2) + picked.mean(2))


@pytest.mark.parametrize("make", [_GatherScatterByKeyword, _GroupNormByKeyword, _LayerNormByKeyword,
                                  _NarrowByKeyword, _NarrowFromTheEnd, _UnflattenByKeyword, _StdPool])
def test_a_model_passing_arguments_by_keyword_prunes_and_verifies(make):
    torch.manual_seed(0)
    result, _ = prune_and_verify(make(), torch.randn(2, 3, 6, 6), ratio=0.5)
    assert result.plan.n_removed > 0


def test_group_norm_by_keyword_removes_whole_groups_under_the_outer_policy():
    torch.manual_seed(0)
    result, _ = prune_and_verify(_GroupNormByKeyword(), torch.randn(2, 3, 6, 6), ratio=0.5, policy="outer")
    gn = next(n for n in result.module.graph.nodes if n.target is F.group_norm)
    assert (gn.args[1] if len(gn.args) > 1 else gn.kwargs["num_groups"]) == 2  # 4 groups, half of them kept


def test_narrow_and_unflatten_keep_their_keywords_where_the_rewrite_changes_them():
    torch.manual_seed(0)
    result, _ = prune_and_verify(_NarrowByKeyword(), torch.randn(2, 3, 6, 6), ratio=0.5)
    narrows = [n for n in result.module.graph.nodes if n.target is torch.narrow]
    assert [n.kwargs for n in narrows] == [{"dim": 1, "start": 0, "length": 2}, {"dim": 1, "start": 2, "length": 2}]
    result, _ = prune_and_verify(_UnflattenByKeyword(), torch.randn(2, 3, 6, 6), ratio=0.5)
    unflatten = next(n for n in result.module.graph.nodes if n.target == "unflatten")
    assert unflatten.kwargs == {"dim": 1, "sizes": [2, 2]}


def test_a_broadcast_index_passed_by_keyword_is_narrowed_where_it_was_passed():
    torch.manual_seed(0)
    result, _ = prune_and_verify(_GatherScatterByKeyword(), torch.randn(2, 3, 6, 6), ratio=0.5)
    nodes = {n.name: n for n in result.module.graph.nodes}
    gather, scatter = nodes["gather"], nodes["scatter_add"]
    assert gather.kwargs["index"].target == "narrow" and gather.kwargs["dim"] == 2
    assert scatter.args[2].target == "narrow" and "src" in scatter.kwargs
