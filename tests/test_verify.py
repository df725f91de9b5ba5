"""The oracle checks the module the user gets, on every group, in every dtype.

Each test builds a model whose removed channels pass through an op that mixes
channel values (a norm, softmax, mean, a count used as a value), checks that
``fxprune.verify`` covers every removed channel, and that it fails when the
pruned module is wrong in a way only such an op would reveal.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import DegenerateReferenceError, VerificationError
from fxprune.masked import MaskedCall, compact, compact_apply, scatter
from fxprune.verify import _Masked, as_float64, consumer_masks, masked_reference
from tests.helpers.oracle import perturbed, prune_and_verify


class Mixer(nn.Module):
    """A linear layer whose features go through one channel-mixing op, then a head."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.ln = nn.LayerNorm(16)
        self.gn = nn.GroupNorm(4, 16)
        self.rms = nn.RMSNorm(16)
        with torch.no_grad():
            for n in (self.ln, self.gn, self.rms):
                n.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = torch.relu(self.a(x)) + 0.1
        how = self.how
        if how == "layer_norm":
            h = self.ln(h)
        elif how == "functional_layer_norm":
            h = F.layer_norm(h, (16,), self.ln.weight, self.ln.bias)
        elif how == "rms_norm":
            h = self.rms(h)
        elif how == "hand_rms_norm":  # as Hugging Face writes it
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms.weight
        elif how == "group_norm":
            h = self.gn(h)
        elif how == "softmax":
            h = h * torch.softmax(h, dim=-1)
        elif how == "mean_var":
            h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, keepdim=True) + 1e-3).sqrt()
        elif how == "max":
            h = h / h.amax(-1, keepdim=True)
        elif how == "count_as_value":
            h = h * h.size(-1) ** -0.5 + h.sum(-1, keepdim=True) / h.shape[-1]
        elif how == "logsumexp":
            h = h - torch.logsumexp(h, -1, keepdim=True)
        return self.b(h)


MIXERS = ["layer_norm", "functional_layer_norm", "rms_norm", "hand_rms_norm", "group_norm", "softmax",
          "mean_var", "max", "count_as_value", "logsumexp"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("how", MIXERS)
def test_mixing_ops_are_checked_exactly_on_the_returned_module(how, frontend):
    torch.manual_seed(0)
    result, v = prune_and_verify(Mixer(how).eval(), torch.randn(5, 6), ratio=0.5, healthy=False,
                                 frontend=frontend)
    n = result.plan.n_removed  # channel classes (group norm: one class is a channel of every group)
    frozen = how == "count_as_value" and frontend == "export"  # export bakes the count in as a constant
    assert v.inexact_groups == (0 if frozen else 1) and v.groups_checked == v.groups_removed == 1
    assert v.channels_checked == v.channels_removed == n == (2 if how == "group_norm" else 8)
    assert v.max_rel_err < 1e-12 and v.precision == "float64"
    assert f"checked 1/1 groups, {n}/{n} removed channels" in v.summary()


def _wrong_norm_scale(result):
    """The pruned module with one kept norm scale nudged by 1%: only a check that runs the
    returned module through the norm can see it."""
    bad = copy.deepcopy(result.module)
    scales = [p for n, p in bad.named_parameters() if n.endswith("weight") and p.ndim == 1]
    with torch.no_grad():
        scales[0][0] *= 1.01
    return dataclasses.replace(result, module=bad)


@pytest.mark.parametrize("how", ["layer_norm", "rms_norm", "group_norm"])
def test_a_wrong_norm_parameter_in_the_returned_module_fails(how):
    torch.manual_seed(0)
    model, x = Mixer(how).eval(), torch.randn(5, 6)
    result = fxprune.prune(model, x, ratio=0.5)
    with pytest.raises(VerificationError, match="differs from the oracle"):
        fxprune.verify(model, _wrong_norm_scale(result), x)


def test_zeroed_channels_are_not_the_reference_of_a_mixing_op():
    """Zeros in a layer norm's statistics are not the pruned model: the reference
    evaluates the norm over the kept channels, and differs from the zeroed one."""
    torch.manual_seed(0)
    model, x = Mixer("layer_norm").eval(), torch.randn(5, 6)
    result = fxprune.prune(model, x, ratio=0.5)
    groups, kept = result.groups, result.plan.kept
    ref = masked_reference(groups, kept, (x,))
    zeroed = _Masked(groups.gm, consumer_masks(groups, kept)).run(x)
    with torch.no_grad():
        got = result.module(x)
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, zeroed, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_verify_and_stay_sensitive(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    from tests.helpers.healthy import make_healthy

    make_healthy(net, (1, 3, 8, 8))
    net = net.to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    result, v = prune_and_verify(net, x, ratio=0.5, healthy=False)
    assert v.precision == "float64" and v.max_rel_err < 1e-12 and v.complete
    assert result.module(x).dtype == dtype


class MixedPrecision(nn.Module):
    """A bfloat16 model with a float32 layer norm, cast in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)
        with torch.no_grad():
            self.n.weight.uniform_(0.5, 1.5)
        self.a.to(torch.bfloat16)
        self.b.to(torch.bfloat16)

    def forward(self, x):
        h = self.n(self.a(x).float()).to(torch.bfloat16)
        return self.b(torch.softmax(h, -1) * h)


def test_a_mixed_precision_model_verifies_in_float64():
    torch.manual_seed(0)
    model, x = MixedPrecision().eval(), torch.randn(3, 8, dtype=torch.bfloat16)
    result, v = prune_and_verify(model, x, ratio=0.5, healthy=False)
    assert v.complete and v.max_rel_err < 1e-12
    assert result.module.n.weight.dtype == torch.float32 and result.module(x).dtype == torch.bfloat16


def test_as_float64_promotes_weights_constants_and_casts_and_leaves_the_input_alone():
    model = MixedPrecision().eval()
    gm = fxprune.trace(model, torch.randn(3, 8, dtype=torch.bfloat16))
    code = gm.code
    wide = as_float64(gm)
    assert "torch.bfloat16" in code and "torch.bfloat16" not in wide.code and "float()" not in wide.code
    assert {p.dtype for p in wide.parameters()} == {torch.float64}
    assert gm.code == code and gm.a.weight.dtype == torch.bfloat16


def test_nan_in_the_returned_module_fails():
    torch.manual_seed(0)
    model, x = Mixer("softmax").eval(), torch.randn(5, 6)
    result = fxprune.prune(model, x, ratio=0.5)
    bad = copy.deepcopy(result.module)
    with torch.no_grad():
        bad.b.bias[0] = float("nan")
    with pytest.raises(VerificationError, match="differs from the oracle: relative error inf"):
        fxprune.verify(model, dataclasses.replace(result, module=bad), x)


class Standardized(nn.Module):
    """A conv whose weight is standardized across its inputs in forward: the kept weights
    depend on the removed ones, so the reference recomputes the weight from the kept
    columns of its parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        w = (self.w - self.w.mean((1, 2, 3), keepdim=True)) / (self.w.std((1, 2, 3), keepdim=True) + 1e-5)
        h = F.conv2d(torch.relu(self.a(x)), w, padding=1)
        return self.head(h.mean((2, 3)))


def test_a_weight_computed_across_its_inputs_is_recomputed_from_the_kept_columns():
    torch.manual_seed(0)
    result, v = prune_and_verify(Standardized().eval(), torch.randn(2, 3, 6, 6), ratio=0.5, healthy=False)
    assert v.inexact_groups >= 1 and v.complete and v.max_rel_err < 1e-12


class MaxNorm(nn.Module):
    """An embedding with max_norm renormalizes (and rewrites) the rows it looks up: no
    masked semantics exists."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8, max_norm=1.0)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.emb(ids)))


def test_an_op_without_masked_semantics_is_named_never_silently_passed():
    torch.manual_seed(0)
    model, ids = MaxNorm().eval(), torch.randint(0, 10, (4, 5))
    with torch.no_grad():
        model(ids)  # the lookup renormalizes the rows it reads: settle them first
    result = fxprune.prune(model, ids, ratio=0.5)
    v = fxprune.verify(model, result, ids)
    assert v.groups_removed > v.groups_checked and not v.complete
    assert any("max_norm" in u for u in v.unchecked), v.unchecked
    assert "not checked: group" in v.summary()


def test_a_staged_result_checks_the_module_the_user_holds():
    from fxprune.blocks import Bert

    torch.manual_seed(0)
    model, x = Bert().eval(), torch.randint(0, 50, (2, 8))
    result, v = prune_and_verify(model, x, ratio=0.5, policy="both", healthy=False)
    assert len(result.stages) == 2 and v.complete
    bad = dataclasses.replace(result, module=perturbed(result.module, 0.01))
    with pytest.raises(VerificationError):
        fxprune.verify(model, bad, x)


def test_a_degenerate_reference_and_a_graph_that_does_not_reproduce_the_model_are_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    x = torch.randn(3, 4)
    result = fxprune.prune(model, x, ratio=0.5)
    with pytest.raises(DegenerateReferenceError, match="healthy activations"):
        fxprune.verify(model, result, x)

    class Scaled(nn.Module):  # its forward reads a Python number the graph froze
        def __init__(self):
            super().__init__()
            self.lin, self.out, self.factor = nn.Linear(4, 8), nn.Linear(8, 2), 1.0

        def forward(self, x):
            return self.out(torch.relu(self.lin(x)) * self.factor)

    scaled = Scaled()
    result = fxprune.prune(scaled, x, ratio=0.5)
    scaled.factor = 3.0
    with pytest.raises(VerificationError, match="does not reproduce the model"):
        fxprune.verify(scaled, result, x)


# -- masked semantics, against brute force ------------------------------------------------
def _call(node_fn, x: torch.Tensor, kept_idx: torch.Tensor, channel: int, kw: dict) -> MaskedCall:
    graph = torch.fx.Graph()
    inp = graph.placeholder("x")
    node = graph.call_function(node_fn, (inp,), kw)
    from fxprune.meta import META_KEY, TensorMeta

    node.meta[META_KEY] = TensorMeta(tuple(node_fn(x, **kw).shape), x.dtype)
    kept = {inp: (channel, kept_idx), node: (channel, kept_idx)}
    return MaskedCall(node, (x,), kw, None, lambda a: kept.get(a), lambda a, k: node_fn(*a, **k))


@pytest.mark.parametrize("fn, kw, reduces", [
    (torch.softmax, {"dim": 1}, False), (torch.log_softmax, {"dim": 1}, False), (torch.cumsum, {"dim": 1}, False),
    (torch.mean, {"dim": 1}, True), (torch.var, {"dim": 1}, True), (torch.amax, {"dim": 1}, True),
    (torch.logsumexp, {"dim": 1}, True)])
def test_compact_apply_is_the_op_on_the_kept_positions(fn, kw, reduces):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 2)
    keep = torch.tensor([0, 2, 3, 6])
    got = compact_apply(_call(fn, x, keep, 1, kw))
    want = fn(x[:, keep], **kw)
    if reduces:
        assert torch.allclose(got, want)
    else:
        assert got.shape == x.shape and torch.allclose(got[:, keep], want)
        assert not got[:, [1, 4, 5]].any()  # removed positions hold zeros


@pytest.mark.parametrize("by_keyword", [False, True])
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_norm_masked_semantics_read_arguments_by_name(norm, by_keyword):
    from fxprune.meta import META_KEY, TensorMeta
    from fxprune.rules.norm import masked_group_norm, masked_layer_norm

    torch.manual_seed(0)
    keep = torch.tensor([0, 2, 3, 5])
    if norm == "layer":  # channels last: normalized over them
        x, w, b, dim = torch.randn(2, 3, 6), torch.rand(6) + 0.5, torch.randn(6), 2
        fn, names, masked = torch.nn.functional.layer_norm, ("input", "normalized_shape", "weight", "bias"), \
            masked_layer_norm
        values = (x, (6,), w, b)
        want = fn(x[..., keep], (4,), w[keep], b[keep])
    else:  # 6 channels in 3 groups of 2: each group keeps the same local channel
        x, w, b, dim = torch.randn(2, 6, 4), torch.rand(6) + 0.5, torch.randn(6), 1
        fn, names, masked = torch.nn.functional.group_norm, ("input", "num_groups", "weight", "bias"), \
            masked_group_norm
        keep = torch.tensor([0, 2, 4])
        values = (x, 3, w, b)
        want = fn(x[:, keep], 3, w[keep], b[keep])
    graph = torch.fx.Graph()
    nodes = [graph.placeholder(n) if isinstance(v, torch.Tensor) else v for n, v in zip(names, values)]
    args, kwargs = ((), dict(zip(names, nodes))) if by_keyword else (tuple(nodes), {})
    node = graph.call_function(fn, args, kwargs)
    node.meta[META_KEY] = TensorMeta(tuple(x.shape), x.dtype)
    evaluated = ((), dict(zip(names, values))) if by_keyword else (values, {})
    kept = {nodes[0]: (dim, keep)}
    call = MaskedCall(node, *evaluated, None, lambda a: kept.get(a), lambda a, k: fn(*a, **k))
    got = masked(call)
    moved = [slice(None)] * x.ndim
    moved[dim] = keep
    assert torch.allclose(got[tuple(moved)], want, atol=1e-6)
    removed = [i for i in range(x.shape[dim]) if i not in keep.tolist()]
    moved[dim] = torch.tensor(removed)
    assert not got[tuple(moved)].any()


def test_compact_and_scatter_round_trip():
    x = torch.randn(2, 5)
    kept = (1, torch.tensor([1, 3]))
    assert torch.equal(compact(x, kept), x[:, [1, 3]])
    back = scatter(compact(x, kept), kept, (2, 5))
    assert torch.equal(back[:, [1, 3]], x[:, [1, 3]]) and not back[:, [0, 2, 4]].any()
    assert compact(x, None) is x and compact(torch.ones(2, 1), kept).shape == (2, 1)


def test_each_module_keeps_its_own_train_or_eval_mode_after_rewrite():
    """An eval-mode net inside a container left in train mode: the pruned BatchNorm
    stays in eval mode (running statistics), as in the model."""
    from torch import nn

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        inner[1].running_mean.uniform_(-1, 1)
        inner[1].running_var.uniform_(0.5, 2)
    outer = nn.Sequential(inner)
    x = torch.randn(2, 3, 8, 8)
    result = fxprune.prune(outer, x, ratio=0.5)
    assert result.module.training and not result.module.get_submodule("0.1").training
    fxprune.verify(outer, result, x)
