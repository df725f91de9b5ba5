"""docs/op-coverage.md is generated from the rule registry and kept current, and every
registered op is exercised: its rule runs on a real call of the op (through the rule
harness, tests/helpers/rule_harness.py) or the op is listed as known-untested with the
reason. A few small models go through ``fxprune.prune`` and the oracle
(``fxprune.verify``) with a record of the rules the analysis ran."""

from __future__ import annotations

import importlib.util
import operator
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune.analysis
import fxprune.rules  # noqa: F401  (fills the registry)
from fxprune.errors import Unsupported
from fxprune.rules import registry
from tests.helpers.oracle import prune_and_verify
from tests.helpers.rule_harness import RuleResult, run_rule

ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten
P = nn.Parameter  # a tensor the harness reads by get_attr (a functional layer's weight)


def test_the_op_coverage_table_is_current():
    spec = importlib.util.spec_from_file_location("op_coverage", ROOT / "tools" / "op_coverage.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.table()
    assert "| norm | `layer_norm` | yes |" in text and "`nn.LayerNorm`" in text
    assert (ROOT / "docs" / "op-coverage.md").read_text() == text, \
        "docs/op-coverage.md is stale: run python tools/op_coverage.py --write"


# -- examples ---------------------------------------------------------------------------
# An example is a function returning (op, args, kwargs, channel_dims) for run_rule: the op
# (a function, an ATen overload, a method name or a module), fresh example arguments.
Example = Callable[[], tuple[Any, tuple[Any, ...], dict[str, Any], list[int] | None]]


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _idx(*shape: int, high: int = 4) -> torch.Tensor:
    return torch.randint(0, high, shape)


def _ex(op: Any, *args: Any, channel_dims: list[int] | None = None, **kwargs: Any) -> Example:
    return lambda: (op, args, kwargs, channel_dims)


def _lazy(make: Callable[[], tuple[Any, ...]], **kwargs: Any) -> Example:
    """An example whose op and arguments are made when it runs (fresh tensors)."""
    def example() -> tuple[Any, tuple[Any, ...], dict[str, Any], list[int] | None]:
        op, *args = make()
        return op, tuple(args), kwargs, None
    return example


def _stat() -> torch.Tensor:
    """A running statistic (a parameter that takes no gradient)."""
    return P(_x(4), requires_grad=False)


def _cell_weights(gates: int, inputs: int = 3, hidden: int = 5) -> list[nn.Parameter]:
    """weight_ih, weight_hh, bias_ih, bias_hh of a recurrent layer with ``gates`` gate blocks."""
    rows = gates * hidden
    return [P(_x(rows, inputs)), P(_x(rows, hidden)), P(_x(rows)), P(_x(rows))]


def _tv() -> Any:
    return pytest.importorskip("torchvision.ops")


# Explicit examples, keyed by the op's name in the registry (the name the coverage test
# reports: a function's or ATen packet's ``__name__``, a method name, a module class's
# name, ``tag:<name>``); each name may list several examples, every one must fire the rule.
# Ops without an entry are tried with the generic calls of ``_generic_args``.
EXAMPLES: dict[str, list[Example]] = {
    "addmm": [_lazy(lambda: (torch.addmm, P(_x(3)), _x(2, 4), P(_x(4, 3)))),
              _lazy(lambda: (aten.addmm.default, P(_x(3)), _x(2, 4), P(_x(4, 3)))),
              _lazy(lambda: ("addmm", P(_x(3)), _x(2, 4), P(_x(4, 3))))],
    "baddbmm": [_lazy(lambda: (torch.baddbmm, _x(2, 3, 5), _x(2, 3, 4), _x(2, 4, 5))),
                _lazy(lambda: (aten.baddbmm.default, _x(2, 3, 5), _x(2, 3, 4), _x(2, 4, 5))),
                _lazy(lambda: ("baddbmm", _x(2, 3, 5), _x(2, 3, 4), _x(2, 4, 5)))],
    "batch_norm": [_lazy(lambda: (F.batch_norm, _x(2, 4, 3), _stat(), _stat().abs(), P(_x(4)), P(_x(4)))),
                   _lazy(lambda: (aten.batch_norm.default, _x(2, 4, 3), P(_x(4)), P(_x(4)), _stat(),
                                  _stat().abs(), False, 0.1, 1e-5, False))],
    "_native_batch_norm_legit_no_training": [
        _lazy(lambda: (aten._native_batch_norm_legit_no_training.default, _x(2, 4, 3), P(_x(4)), P(_x(4)),
                       _stat(), _stat().abs(), 0.1, 1e-5))],
    "_native_batch_norm_legit": [
        _lazy(lambda: (aten._native_batch_norm_legit.default, _x(2, 4, 3), P(_x(4)), P(_x(4)), _stat(),
                       _stat().abs(), False, 0.1, 1e-5))],
    "native_batch_norm": [
        _lazy(lambda: (aten.native_batch_norm.default, _x(2, 4, 3), P(_x(4)), P(_x(4)), _stat(),
                       _stat().abs(), False, 0.1, 1e-5))],
    "instance_norm": [_ex(F.instance_norm, _x(2, 4, 3)),
                      _ex(aten.instance_norm.default, _x(2, 4, 3), None, None, None, None, True, 0.1, 1e-5,
                          False)],
    "bilinear": [_lazy(lambda: (torch.bilinear, _x(2, 3), _x(2, 4), P(_x(5, 3, 4)), P(_x(5)))),
                 _lazy(lambda: (aten.bilinear.default, _x(2, 3), _x(2, 4), P(_x(5, 3, 4)), P(_x(5))))],
    "fold": [_ex(F.fold, _x(1, 16, 9), (4, 4), 2)],
    "Fold": [_ex(nn.Fold((4, 4), 2), _x(1, 16, 9))],
    "col2im": [_ex(aten.col2im.default, _x(1, 16, 9), [4, 4], [2, 2], [1, 1], [0, 0], [1, 1])],
    "im2col": [_ex(aten.im2col.default, _x(1, 4, 4, 4), [2, 2], [1, 1], [0, 0], [1, 1])],
    "conv1d": [_lazy(lambda: (F.conv1d, _x(1, 3, 5), P(_x(4, 3, 1)), P(_x(4)))),
               _lazy(lambda: (aten.conv1d.default, _x(1, 3, 5), P(_x(4, 3, 1)), P(_x(4))))],
    "conv2d": [_lazy(lambda: (F.conv2d, _x(1, 3, 5, 5), P(_x(4, 3, 1, 1)))),
               _lazy(lambda: (aten.conv2d.default, _x(1, 3, 5, 5), P(_x(4, 3, 1, 1))))],
    "convolution": [_lazy(lambda: (aten.convolution.default, _x(1, 4, 5, 5), P(_x(4, 2, 3, 3)), None, [1, 1],
                                   [1, 1], [1, 1], False, [0, 0], 2))],
    "conv3d": [_lazy(lambda: (F.conv3d, _x(1, 3, 2, 2, 2), P(_x(4, 3, 1, 1, 1)))),
               _lazy(lambda: (aten.conv3d.default, _x(1, 3, 2, 2, 2), P(_x(4, 3, 1, 1, 1))))],
    "conv_transpose1d": [_lazy(lambda: (F.conv_transpose1d, _x(1, 3, 5), P(_x(3, 4, 1)))),
                         _lazy(lambda: (aten.conv_transpose1d.default, _x(1, 3, 5), P(_x(3, 4, 1))))],
    "conv_transpose2d": [_lazy(lambda: (F.conv_transpose2d, _x(1, 3, 5, 5), P(_x(3, 4, 1, 1)))),
                         _lazy(lambda: (aten.conv_transpose2d.input, _x(1, 3, 5, 5), P(_x(3, 4, 1, 1))))],
    "conv_transpose3d": [_lazy(lambda: (F.conv_transpose3d, _x(1, 3, 2, 2, 2), P(_x(3, 4, 1, 1, 1)))),
                         _lazy(lambda: (aten.conv_transpose3d.input, _x(1, 3, 2, 2, 2), P(_x(3, 4, 1, 1, 1))))],
    "linear": [_lazy(lambda: (F.linear, _x(2, 3), P(_x(4, 3)), P(_x(4)))),
               _lazy(lambda: (aten.linear.default, _x(2, 3), P(_x(4, 3))))],
    "deform_conv2d": [_lazy(lambda: (_tv() and torch.ops.torchvision.deform_conv2d.default, _x(1, 3, 5, 5),
                                     P(_x(4, 3, 1, 1)), torch.zeros(1, 2, 5, 5), torch.zeros(1, 1), P(_x(4)),
                                     1, 1, 0, 0, 1, 1, 1, 1, False))],
    "einsum": [_lazy(lambda: (torch.einsum, "ij,jk->ik", _x(2, 4), _x(4, 3))),
               _lazy(lambda: (aten.einsum.default, "ij,jk->ik", [_x(2, 4), _x(4, 3)]))],
    "embedding": [_lazy(lambda: (F.embedding, _idx(2, 3, high=10), P(_x(10, 4)))),
                  _lazy(lambda: (aten.embedding.default, P(_x(10, 4)), _idx(2, 3, high=10)))],
    "embedding_bag": [_lazy(lambda: (F.embedding_bag, _idx(2, 3, high=10), P(_x(10, 4)))),
                      _lazy(lambda: (aten.embedding_bag.default, P(_x(10, 4)), _idx(6, high=10),
                                     torch.tensor([0, 3])))],
    "_embedding_bag": [_lazy(lambda: (aten._embedding_bag.default, P(_x(10, 4)), _idx(6, high=10),
                                      torch.tensor([0, 3])))],
    "Embedding": [_lazy(lambda: (nn.Embedding(10, 4), _idx(2, 3, high=10)))],
    "EmbeddingBag": [_lazy(lambda: (nn.EmbeddingBag(10, 4), _idx(2, 3, high=10)))],
    "expand": [_ex(aten.expand.default, _x(2, 4, 1), [2, 4, 5]), _ex("expand", _x(2, 4, 1), 2, 4, 5)],
    "scalar_tensor": [_ex(aten.scalar_tensor.default, 1.0)],
    "stochastic_depth": [_lazy(lambda: (_tv().stochastic_depth, _x(2, 4, 3, 3), 0.5, "row", False))],
    "StochasticDepth": [_lazy(lambda: (_tv().StochasticDepth(0.5, "row").eval(), _x(2, 4, 3, 3)))],
    "take_along_dim": [_lazy(lambda: (torch.take_along_dim, _x(2, 4, 3), _idx(2, 4, 3, high=3), 2)),
                       _lazy(lambda: (aten.take_along_dim.default, _x(2, 4, 3), _idx(2, 4, 3, high=3), 2)),
                       _lazy(lambda: ("take_along_dim", _x(2, 4, 3), _idx(2, 4, 3, high=3), 2))],
    "grid_sample": [_ex(F.grid_sample, _x(2, 4, 5, 5), _x(2, 3, 3, 2), align_corners=False)],
    "grid_sampler": [_ex(aten.grid_sampler.default, _x(2, 4, 5, 5), _x(2, 3, 3, 2), 0, 0, False)],
    "grid_sampler_2d": [_ex(aten.grid_sampler_2d.default, _x(2, 4, 5, 5), _x(2, 3, 3, 2), 0, 0, False)],
    "grid_sampler_3d": [_ex(aten.grid_sampler_3d.default, _x(2, 4, 3, 3, 3), _x(2, 2, 2, 2, 3), 0, 0, False)],
    "affine_grid": [_ex(F.affine_grid, _x(2, 2, 3), [2, 4, 5, 5], align_corners=False)],
    "affine_grid_generator": [_ex(aten.affine_grid_generator.default, _x(2, 2, 3), [2, 4, 5, 5], False)],
    "layer_norm": [_lazy(lambda: (F.layer_norm, _x(2, 5, 6), (6,), P(_x(6)), P(_x(6)))),
                   _lazy(lambda: (aten.layer_norm.default, _x(2, 5, 6), [6], P(_x(6)), P(_x(6))))],
    "rms_norm": [_lazy(lambda: (F.rms_norm, _x(2, 5, 6), (6,), P(_x(6)))),
                 _lazy(lambda: (aten.rms_norm.default, _x(2, 5, 6), [6], P(_x(6))))],
    "_softmax": [_ex(aten._softmax.default, _x(2, 4, 3), 1, False)],
    "_log_softmax": [_ex(aten._log_softmax.default, _x(2, 4, 3), 1, False)],
    "invert": [_ex(operator.invert, _x(2, 4, 3) > 0)],
    "tag:pointwise": [_ex(aten.sinh.default, _x(2, 4, 3))],  # sinh: no rule of its own
    "prelu": [_lazy(lambda: (torch.prelu, _x(2, 4, 3), P(_x(4)))),
              _lazy(lambda: (aten.prelu.default, _x(2, 4, 3), P(_x(4))))],
    "_prelu_kernel": [_lazy(lambda: (aten._prelu_kernel.default, _x(2, 4), P(_x(4))))],
    "roll": [_ex(aten.roll.default, _x(2, 4, 3), [1], [2]), _ex(torch.roll, _x(2, 4, 3), 1, 2),
             _ex("roll", _x(2, 4, 3), 1, 2)],
    "scatter_reduce": [_lazy(lambda: (torch.scatter_reduce, _x(2, 4, 3), 2, _idx(2, 4, 3, high=3),
                                      _x(2, 4, 3), "sum")),
                       _lazy(lambda: (aten.scatter_reduce.two, _x(2, 4, 3), 2, _idx(2, 4, 3, high=3),
                                      _x(2, 4, 3), "sum")),
                       _lazy(lambda: ("scatter_reduce", _x(2, 4, 3), 2, _idx(2, 4, 3, high=3), _x(2, 4, 3),
                                      "sum"))],
    "scatter_reduce_": [_lazy(lambda: ("scatter_reduce_", _x(2, 4, 3), 2, _idx(2, 4, 3, high=3), _x(2, 4, 3),
                                       "sum"))],
    "scatter_": [_lazy(lambda: ("scatter_", _x(2, 4, 3), 2, _idx(2, 4, 3, high=3), _x(2, 4, 3)))],
    "scatter_add_": [_lazy(lambda: ("scatter_add_", _x(2, 4, 3), 2, _idx(2, 4, 3, high=3), _x(2, 4, 3)))],
    "index_reduce": [_lazy(lambda: (torch.index_reduce, _x(2, 4, 3), 2, torch.tensor([0, 2]), _x(2, 4, 2),
                                    "prod")),
                     _lazy(lambda: (aten.index_reduce.default, _x(2, 4, 3), 2, torch.tensor([0, 2]),
                                    _x(2, 4, 2), "prod")),
                     _lazy(lambda: ("index_reduce", _x(2, 4, 3), 2, torch.tensor([0, 2]), _x(2, 4, 2), "prod"))],
    "index_reduce_": [_lazy(lambda: ("index_reduce_", _x(2, 4, 3), 2, torch.tensor([0, 2]), _x(2, 4, 2),
                                     "prod"))],
    "getattr": [_ex(getattr, _x(2, 4, 3), "shape")],
    "lp_pool1d": [_ex(F.lp_pool1d, _x(2, 4, 6), 2.0, 2)],
    "unflatten": [_ex(torch.unflatten, _x(2, 4, 3), 1, (2, 2)), _ex(aten.unflatten.int, _x(2, 4, 3), 1, [2, 2]),
                  _ex("unflatten", _x(2, 4, 3), 1, (2, 2))],
    "_weight_norm": [_lazy(lambda: (aten._weight_norm.default, P(_x(4, 3)), P(_x(4, 1)), 0))],
    "index": [_ex(aten.index.Tensor, _x(2, 4, 3), [None, torch.tensor([0, 2])])],
    "_grouped_mm": [_lazy(lambda: (aten._grouped_mm.default, _x(6, 8), P(_x(2, 8, 4)),
                                   torch.tensor([2, 6], dtype=torch.int32)))],  # 2 experts
    # export's FFT kernels and resampling with scale factors
    "_fft_r2c": [_ex(aten._fft_r2c.default, _x(2, 4, 6), [2], 0, True)],
    "_fft_c2c": [_ex(aten._fft_c2c.default, torch.randn(2, 4, 6, dtype=torch.complex64), [2], 0, True)],
    "_fft_c2r": [_ex(aten._fft_c2r.default, torch.randn(2, 4, 6, dtype=torch.complex64), [2], 0, 10)],
    "upsample_nearest1d": [_ex(aten.upsample_nearest1d.vec, _x(2, 4, 6), None, [2.0])],
    "upsample_nearest3d": [_ex(aten.upsample_nearest3d.vec, _x(2, 4, 3, 3, 3), None, [2.0] * 3)],
    "upsample_linear1d": [_ex(aten.upsample_linear1d.vec, _x(2, 4, 6), None, False, [2.0])],
    "upsample_trilinear3d": [_ex(aten.upsample_trilinear3d.vec, _x(2, 4, 3, 3, 3), None, False, [2.0] * 3)],
    "_upsample_nearest_exact1d": [_ex(aten._upsample_nearest_exact1d.vec, _x(2, 4, 6), None, [2.0])],
    "_upsample_nearest_exact3d": [_ex(aten._upsample_nearest_exact3d.vec, _x(2, 4, 3, 3, 3), None, [2.0] * 3)],
    # export's recurrent cells and layers: the weights as a list (gates x hidden rows)
    "lstm_cell": [_lazy(lambda: (aten.lstm_cell.default, _x(2, 3), [_x(2, 5), _x(2, 5)], *_cell_weights(4)))],
    "gru_cell": [_lazy(lambda: (aten.gru_cell.default, _x(2, 3), _x(2, 5), *_cell_weights(3)))],
    "rnn_tanh_cell": [_lazy(lambda: (aten.rnn_tanh_cell.default, _x(2, 3), _x(2, 5), *_cell_weights(1)))],
    "rnn_relu_cell": [_lazy(lambda: (aten.rnn_relu_cell.default, _x(2, 3), _x(2, 5), *_cell_weights(1)))],
    "lstm": [_lazy(lambda: (aten.lstm.input, _x(5, 2, 3), [torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)],
                            _cell_weights(4), True, 1, 0.0, False, False, False))],
    "gru": [_lazy(lambda: (aten.gru.input, _x(5, 2, 3), torch.zeros(1, 2, 5), _cell_weights(3), True, 1, 0.0,
                           False, False, False))],
    "rnn_tanh": [_lazy(lambda: (aten.rnn_tanh.input, _x(5, 2, 3), torch.zeros(1, 2, 5), _cell_weights(1), True, 1,
                                0.0, False, False, False))],
    "rnn_relu": [_lazy(lambda: (aten.rnn_relu.input, _x(5, 2, 3), torch.zeros(1, 2, 5), _cell_weights(1), True, 1,
                                0.0, False, False, False))],
}


def _generic_args() -> Iterator[tuple[Any, ...]]:
    """Argument lists tried in turn on a function, ATen overload or method without an
    explicit example (the first the op accepts eagerly is given to its rule)."""
    x = _x(2, 4, 6, 6)
    yield from [(x,), (x, x), (x, 1), (x, 1.5), (x, x, x), (x > 0, x, x), (x, x > 0, 0.0), (x, _x(2, 4, 6, 1)),
                (_x(2, 4, 6),), (_x(2, 4),), (_x(2, 4, 3, 3, 3),), (x, 1, 2), (x, 0, 2, 3, 1), (x, [0, 2, 3, 1]),
                (x, 2), (x, 2, 1), (x, [2, 2], 1), ([x, x],), ([x, x], 1), (_x(2, 4), _x(4, 3)),
                (_x(2, 3, 4), _x(2, 4, 5)), (_x(4), _x(3)), (x, 1, torch.tensor([0, 2])),
                (x, 1, _idx(2, 4, 6, 6)), (x, 1, _idx(2, 4, 6, 6), _x(2, 4, 6, 6)),
                (x, 1, torch.tensor([0, 2]), _x(2, 2, 6, 6)), (x, 1, 0, 2), (x, (2, 4, 36)), (x, 2, 4, 36),
                (x, [2, 4, 36]), ((2, 4),), (2, 4), (x, (2, 4)), (x, (2, 4), 1.0), (x, 1.0), ((2, 4), 1.0), (),
                (x, x, 0.5), (_x(2, 4, 6), _x(2, 4, 6), _x(2, 4, 6)), (x, [1, 1]), (x, 1, 1), (x, 2, 1, 2),
                (x, 3), (x, [1, 1, 1, 1]), (_x(2, 4), 1), (x, (1, 1)), (x, 3, 1, 1), (x, 1, True)]


# module types without an explicit example: constructor arguments, then inputs, tried in turn
_MODULE_CTORS: list[tuple[Any, ...]] = [(), (4,), (4, 4), (4, 4, 1), (2,), (1,), (0.5,), ((1, 1),), (4, 4, 4),
                                        (1, (2, 2)), (3,)]


def _module_inputs() -> list[tuple[torch.Tensor, ...]]:
    return [(_x(2, 4, 6, 6),), (_x(2, 4, 6),), (_x(2, 4),), (_x(2, 4, 3, 3, 3),), (_x(5, 2, 4),),
            (_x(2, 4), _x(2, 4))]


def _accepts(op: Any, args: tuple[Any, ...]) -> bool:
    """Whether ``op(*args)`` runs eagerly (a method name: on ``args[0]``)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(op, str):
                if not args or not isinstance(args[0], torch.Tensor):
                    return False
                getattr(args[0], op)(*args[1:])
            else:
                op(*args)
    except Exception:
        return False
    return True


def _calls(table: str, key: Any) -> Iterator[tuple[Any, tuple[Any, ...], dict[str, Any], list[int] | None]]:
    """Calls of the op registered under ``key`` (table ``table``) that run eagerly."""
    if table == "module":
        for ctor in _MODULE_CTORS:
            try:
                module = key(*ctor).eval()
            except Exception:
                continue
            for inputs in _module_inputs():
                if _accepts(module, inputs):
                    yield module, inputs, {}, None
        return
    if table == "function" and isinstance(key, torch._ops.OpOverloadPacket):
        ops = [getattr(key, o) for o in key.overloads()]
    elif table in ("function", "method"):
        ops = [key]
    else:
        return
    for op in ops:
        for args in _generic_args():
            if _accepts(op, args):
                yield op, args, {}, None


def _name(table: str, key: Any) -> str:
    """The name an op is written with: a method name, a module class's name, a function's
    or ATen packet's ``__name__``, a custom op's qualified name, ``tag:<name>``."""
    if table in ("method", "op_name"):
        return str(key)
    if table == "module":
        return str(key.__name__)
    if table == "tag":
        return "tag:" + key.name
    return str(getattr(key, "__name__", key))


def _matches(op: Any, table: str, key: Any) -> bool:
    """Whether calling ``op`` reaches the registry through ``key`` (EXAMPLES are filed by
    name, which a function, its ATen packet and a method may share)."""
    if table == "function":
        return op is key or isinstance(op, torch._ops.OpOverload) and op.overloadpacket is key
    if table == "method":
        return op == key
    if table == "module":
        return type(op) is key
    if table == "op_name":
        return isinstance(op, torch._ops.OpOverload) and op._schema.name == key
    return isinstance(op, torch._ops.OpOverload) and key in op.tags  # a tag


def _run(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dims: list[int] | None) -> RuleResult | None:
    """The rule's answer on one call, None where it refused (``Unsupported``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        try:
            return run_rule(op, *args, kwargs=kwargs, channel_dims=dims)
        except Unsupported:
            return None


def _exercised() -> tuple[dict[str, set[str]], list[str]]:
    """(rule name -> names of its ops no example fired the rule of, explicit examples that
    did not fire their op's rule). Explicit examples must run and fire; generic calls are
    tried until one does."""
    unexercised: dict[str, set[str]] = {}
    broken: list[str] = []
    matched: set[tuple[str, int]] = set()
    for table, key, spec in registry.entries():
        if not spec.analyze.__module__.startswith("fxprune."):
            continue  # a rule registered by a test
        name = _name(table, key)
        fired = tried = False
        for example in EXAMPLES.get(name, []):
            op, args, kwargs, dims = example()
            if not _matches(op, table, key):
                continue  # an example of another op of that name
            matched.add((name, id(example)))
            tried = True
            try:
                r = _run(op, args, kwargs, dims)
            except Exception as exc:  # a bug in the rule or the example: reported below
                broken.append(f"{name}: {op} raised {type(exc).__name__}: {exc}")
                continue
            if r is None or r.rule != spec.name:
                broken.append(f"{name}: {op} {'was refused' if r is None else f'ran rule {r.rule}'}, "
                              f"not {spec.name}")
                continue
            fired = True
        if not tried:
            for op, args, kwargs, dims in _calls(table, key):
                try:
                    r = _run(op, args, kwargs, dims)
                except Exception:
                    continue  # a call the op accepts in a form its rule does not take: try the next
                if r is not None:
                    assert r.rule == spec.name, f"{name}: ran rule {r.rule}, registered under {spec.name}"
                    fired = True
                    break
        if not fired:
            unexercised.setdefault(spec.name, set()).add(name)
    broken += [f"{name}: example {i} calls no registered op of that name" for name, examples in EXAMPLES.items()
               for i, example in enumerate(examples) if (name, id(example)) not in matched]
    return unexercised, broken


KNOWN_UNTESTED = {  # rule -> (why, names of its ops that no example exercises)
    "compare": ("not Tensor methods in this torch (registered for graphs that call them as such)",
                {"cosine_similarity", "pairwise_distance"}),
    "first_input": ("needs a CUDA device", {"cuda"}),
    "grouped_mm": ("a custom op that exists only once transformers defines it",
                   {"transformers::grouped_mm_fallback"}),
    "pointwise": ("not Tensor methods in this torch (registered for graphs that call them as such)",
                  {"hardswish", "silu"}),
    "relabel": ("a property (x.mT), reached as getattr", {"mT"}),
}


def test_every_registered_op_fires_its_rule_or_is_listed_as_known_untested():
    """Every op in the rule registry (``registry.entries()``, the table docs/op-coverage.md
    lists) is called once, as a three-node graph through the rule harness, and its
    registered rule must run on it without refusing: an explicit example from
    ``EXAMPLES``, else the first of a list of generic calls the op accepts eagerly. Ops
    that cannot be called this way are listed in ``KNOWN_UNTESTED`` under their rule with
    the reason; the list must stay exact (an op that gains an example has to leave it)."""
    unexercised, broken = _exercised()
    assert not broken, "explicit examples that do not fire their op's rule:\n" + "\n".join(broken)
    missing = {rule: sorted(names - KNOWN_UNTESTED.get(rule, ("", set()))[1])
               for rule, names in unexercised.items()}
    missing = {r: n for r, n in missing.items() if n}
    assert not missing, (f"ops whose rule no example fires (add an example to EXAMPLES, or list them in "
                         f"KNOWN_UNTESTED with a reason): {missing}")
    stale = {rule: sorted(names - unexercised.get(rule, set())) for rule, (_, names) in KNOWN_UNTESTED.items()}
    stale = {r: n for r, n in stale.items() if n}
    assert not stale, f"KNOWN_UNTESTED lists ops that are now exercised or no longer exist: {stale}"
    assert all(why for why, _ in KNOWN_UNTESTED.values())


def test_a_broken_example_is_reported():
    """The coverage check fails on an example that its rule refuses, and on one that calls
    no op of the name it is filed under."""
    saved = EXAMPLES["rms_norm"]
    EXAMPLES["rms_norm"] = [_lazy(lambda: (F.rms_norm, _x(2, 5, 6), (6,), _x(6))),  # weight not a parameter
                            _lazy(lambda: (nn.Conv2d(3, 4, 1), _x(1, 3, 4, 4)))]
    try:
        unexercised, broken = _exercised()
    finally:
        EXAMPLES["rms_norm"] = saved
    assert any(b.startswith("rms_norm:") and "was refused" in b for b in broken), broken
    assert "rms_norm: example 1 calls no registered op of that name" in broken
    assert "rms_norm" in unexercised["layer_norm"]


# -- through the analysis, the rewrite and the oracle --------------------------------------
class _ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        y = torch.cat([y, F.pad(y, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]], dim=1)
        y, z = y.chunk(2, dim=1)
        return self.pool(self.b(y + z)).flatten(1)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.glu(self.norm(self.up(x)), dim=-1).softmax(-1))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


@pytest.mark.parametrize("make, x, rules", [
    (_ConvBlock, (2, 3, 6, 6), {"conv", "batch_norm", "pointwise", "cat", "pad", "getitem", "split",
                                "spatial", "relabel"}),
    (_Mlp, (2, 5, 6), {"linear", "layer_norm", "glu", "mixing_along_dim"}),
    (_Recurrent, (2, 5, 4), {"recurrent", "getitem", "reduce", "linear"}),
], ids=["conv", "mlp", "recurrent"])
def test_rules_fire_in_a_pruned_and_verified_model(monkeypatch, make, x, rules):
    fired: set[str] = set()

    def recording_lookup(node: torch.fx.Node, root: nn.Module) -> Any:
        spec = registry.lookup(node, root)
        if spec is not None:
            fired.add(spec.name)
        return spec

    monkeypatch.setattr(fxprune.analysis, "lookup", recording_lookup)
    torch.manual_seed(0)
    prune_and_verify(make(), torch.randn(*x), ratio=0.5)
    assert rules <= fired, f"rules that did not run: {sorted(rules - fired)}"
