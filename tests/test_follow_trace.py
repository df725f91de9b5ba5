"""The symbolic trace that follows example values (``symbolic_trace(..., follow=True)``,
used for Hugging Face models): Python that needs a size reads it on the example inputs,
a condition on a tensor's values still fails, sizes read from value-shaped ops are not
shapes, nothing the user passed is written, and past a memory budget the trace goes on
on the meta device."""

import operator

import pytest
import torch
from torch import nn

from fxprune.capture import tracer as tracer_module
from fxprune.capture.tracer import symbolic_trace
from fxprune.errors import TraceError
from fxprune.meta import tensor_meta


class SizeBranches(nn.Module):
    """Forward code plain symbolic tracing cannot follow: ``*args`` in the signature, len()
    and unpacking of a shape, a branch on the sequence length, a shape joined with a tuple."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.out = nn.Linear(12, 8)

    def forward(self, *args, **kwargs):
        x = args[0]
        b, n, _ = x.shape
        h = self.proj(x)
        if n > 1 and len(h.shape) == 3:
            h = torch.relu(h) * torch.arange(n, device=x.device)[None, :, None]
        else:
            h = h * 0.0
        h = h.view(h.size()[:-1] + (3, 4)).sum(-1)
        h = torch.cat([h, h, h, h], dim=-1)
        return self.out(h)


def test_size_checks_are_read_on_the_example_values():
    torch.manual_seed(0)
    model = SizeBranches().eval()
    x = torch.randn(2, 5, 8)
    with pytest.raises(TraceError):
        symbolic_trace(model, example_inputs=(x,))  # plain tracing stops at *args/len/branch
    gm = symbolic_trace(model, example_inputs=(x,), follow=True)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        y = torch.randn(3, 7, 8)  # the sequence length is read at run time, the branch kept
        torch.testing.assert_close(gm(y), model(y))
    # shape records come from the followed values
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tensor_meta(out).shape == (2, 5, 8)
    # the joined shape became one size per element: (b, n, 3, 4) with literal channel sizes
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert list(view.args[1][2:]) == [3, 4]


class ValueBranch(nn.Module):
    def forward(self, x):
        if (x > 0).any():
            return x * 2.0
        return x


class ValueShapedBranch(nn.Module):
    def forward(self, x):
        idx = (x > 0).nonzero()
        if idx.shape[0] > 3:  # a size that depends on the values
            return x * 2.0
        return x


@pytest.mark.parametrize("model", [ValueBranch(), ValueShapedBranch()], ids=["value", "value-shaped"])
def test_a_condition_on_values_still_fails(model):
    with pytest.raises(TraceError):
        symbolic_trace(model, example_inputs=(torch.randn(4, 6),), follow=True)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        x.mul_(2.0)
        w = self.scale
        w.add_(0.0)  # an in-place op on the model's own parameter, as traced
        if x.shape[-1] == 6:
            x = x + w
        return x


def test_following_writes_neither_the_inputs_nor_the_model():
    model = InPlace()
    x = torch.randn(3, 6)
    x0, s0 = x.clone(), model.scale.detach().clone()
    symbolic_trace(model, example_inputs=(x,), follow=True)
    assert torch.equal(x, x0) and torch.equal(model.scale.detach(), s0)


def test_past_the_memory_budget_the_trace_goes_on_on_meta(monkeypatch):
    torch.manual_seed(0)
    model = SizeBranches().eval()
    x = torch.randn(2, 5, 8)
    monkeypatch.setattr(tracer_module, "FOLLOW_BYTES", 200)  # a few activations in
    gm = symbolic_trace(model, example_inputs=(x,), follow=True)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tensor_meta(out).shape == (2, 5, 8)


class MaskAfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        picked = h[h > 0]  # its shape depends on the linear's output values
        return picked.sum() + h.sum(), h.shape[-1]


def test_a_value_shaped_op_after_a_layer_gets_no_shape_from_stand_in_values():
    """Layers whose output shape their attributes give are followed by zeros of that shape
    (only shapes steer the trace); an op whose shape depends on values must not record a
    shape computed from them."""
    torch.manual_seed(0)
    model = MaskAfterLinear().eval()
    x = torch.randn(4, 6)
    gm = symbolic_trace(model, example_inputs=(x,), follow=True)
    picked = next(n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].op == "call_module")
    got = tensor_meta(picked)
    with torch.no_grad():
        h = model.lin(x)
        assert got is None or got.shape == tuple(h[h > 0].shape)
        torch.testing.assert_close(gm(x)[0], model(x)[0])


class FillValueOfTheDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        scores = self.proj(x)
        keep = x.shape[-1] // 2
        fill = torch.finfo(scores.dtype).min  # a mask's fill value, as Hugging Face models write it
        return scores[..., :keep].softmax(-1), torch.full_like(scores[..., keep:], fill)


def test_a_followed_trace_reads_finfo_of_a_traced_dtype():
    model, x = FillValueOfTheDtype().eval(), torch.randn(2, 6)
    finfo = torch.finfo
    gm = symbolic_trace(model, example_inputs=(x,), follow=True)
    assert torch.finfo is finfo  # put back after the trace
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            assert torch.equal(got, want)
    with pytest.raises(TraceError, match="finfo"):  # without example values: torch's error
        symbolic_trace(model)
