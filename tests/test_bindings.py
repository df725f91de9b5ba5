"""ATen's Python bindings (``torch._C._nn.pad``, ``torch._C._linalg.linalg_vector_norm``),
which ``torch.nn.functional`` wraps and Dynamo's graphs call directly, are analysed by
their ATen op's rule, with the arguments of its schema."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.oracle import prune_and_verify
from tests.helpers.rule_harness import CONSTANT, run_rule


def _same(a, b):
    assert (a.inputs, a.output, a.out_dim, a.pinned, a.inexact, a.consumed) == \
        (b.inputs, b.output, b.out_dim, b.pinned, b.inexact, b.consumed)


def test_pad_binding_is_analysed_like_functional_pad():
    x = torch.randn(2, 4, 5, 5)
    for pad, kwargs in [((1, 1, 2, 0), {}), ((0, 0, 0, 0, 1, 2), {}), ((1, 1, 1, 1), {"mode": "reflect"})]:
        binding = run_rule(torch._C._nn.pad, x, pad, kwargs=kwargs)
        assert not binding.barriers, binding.barriers
        _same(binding, run_rule(F.pad, x, pad, kwargs=kwargs))
    channel = run_rule(torch._C._nn.pad, x, (0, 0, 0, 0, 1, 2))
    assert channel.output == [CONSTANT, 0, 1, 2, 3, CONSTANT, CONSTANT]  # padded channels are constants


@pytest.mark.parametrize("name,args,twin,twin_args", [
    ("adaptive_avg_pool2d", ((1, 1),), F.adaptive_avg_pool2d, ((1, 1),)),
    ("silu", (), F.silu, ()),
    ("hardswish", (), F.hardswish, ()),
    ("elu", (1.0,), F.elu, (1.0,)),
    ("leaky_relu", (0.1,), F.leaky_relu, (0.1,)),
    ("glu", (-1,), F.glu, (-1,)),
    ("upsample_nearest2d", ((10, 12),), F.interpolate, ((10, 12),)),
])
def test_nn_bindings_are_analysed_like_their_functional_twins(name, args, twin, twin_args):
    x = torch.randn(2, 4, 6, 6)
    binding = run_rule(getattr(torch._C._nn, name), x, *args)
    assert not binding.barriers, binding.barriers
    _same(binding, run_rule(twin, x, *twin_args))


class Bindings(nn.Module):
    """What Dynamo leaves of F.pad and torch.linalg.vector_norm: their bindings."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.c, self.fc = nn.Conv2d(10, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        h = torch._C._nn.pad(torch.relu(self.a(x)), (1, 1, 1, 1), "reflect")
        h = torch._C._nn.pad(torch.relu(self.b(h)), (0, 0, 0, 0, 1, 1))  # two constant channels
        return self.fc(torch._C._linalg.linalg_vector_norm(self.c(h), 2, (2, 3)))


def test_model_calling_bindings_prunes_through_them():
    torch.manual_seed(0)
    result, _ = prune_and_verify(Bindings().eval(), torch.randn(2, 3, 10, 10), ratio=0.5)
    assert not result.groups.barriers, result.groups.barriers
    m = result.module
    assert m.get_parameter("a.weight").shape[0] == 4 and m.get_parameter("b.weight").shape[0] == 4
    assert m.get_parameter("c.weight").shape[1] == 6  # 4 kept channels and the 2 padded
