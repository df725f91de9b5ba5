"""Masked semantics: an op evaluated as if the removed channels were absent.

The oracle (``fxprune.verify``) runs the original graph with the removed channels
of a plan masked out. Linear consumers (a conv's or linear layer's weight
columns, a sum over channels) see them as zeros, which is exactly what removing
them does. An op that *mixes* the values of a channel dim (layer, group and RMS
norm statistics, softmax, mean, variance, max, local response norm) gives other
results on zeros than on a shorter dim, so its rule supplies a masked semantics:
a function that evaluates it on the kept positions only. The generic one,
:func:`compact_apply`, compacts the kept positions of every input's channel dim,
applies the op and scatters the result back; ops whose arguments carry the
channel count (``normalized_shape``) or per-channel parameters of their own
(a norm's affine) have their own function beside their rule.

A masked semantics receives a :class:`MaskedCall` and returns the op's output
with the original shape. Positions of removed channels in that output hold
zeros: no kept value reads them (every consumer of a removed channel is masked
or is itself evaluated on the kept positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .arguments import CallArgs, bind_args

__all__ = ["MaskedCall", "MaskedSemantics", "compact", "compact_apply", "scatter"]


@dataclass
class MaskedCall:
    """One call of a mixing op, as the oracle's interpreter meets it.

    ``args``/``kwargs`` are the evaluated arguments (plain lists, tensors);
    ``kept(x)`` gives ``(dim, kept indices)`` of an argument node's value, or None
    when none of its channels is removed; ``run(args, kwargs)`` calls the op the
    node calls (function, method or module) on other arguments.
    """

    node: torch.fx.Node
    args: tuple
    kwargs: dict
    module: torch.nn.Module | None
    kept: Callable[[Any], tuple[int, torch.Tensor] | None]
    run: Callable[[tuple, dict], Any]
    # (dim, kept indices) of a label tensor (a weight's columns), or None
    kept_labels: Callable[[torch.Tensor], tuple[int, torch.Tensor] | None] | None = None
    # recompute(node, {attribute path: transform}): ``node``'s value recomputed with those
    # tensors transformed (a weight computed in forward from its parameter's kept columns)
    recompute: Callable[[torch.fx.Node, dict], Any] | None = None
    _call: CallArgs | None = field(default=None, repr=False)  # the node's arguments by name

    def input_kept(self, name: str = "input") -> tuple[int, torch.Tensor] | None:
        """Kept indices of the node's tensor argument ``name``."""
        return self.kept(self._bound().values.get(name))

    def arg(self, name: str, default: Any = None) -> Any:
        """The evaluated argument ``name`` (see :func:`fxprune.arguments.bind_args`), or
        ``default`` where the call left it out."""
        pos, keyword = self._bound().slot(name, len(self.args))
        return self.args[pos] if pos is not None else self.kwargs.get(keyword, default)

    def with_arg(self, args: list, kwargs: dict, name: str, value: Any) -> None:
        """Set argument ``name`` in ``args``/``kwargs`` (a copy of the evaluated ones) where
        the node passed it; an argument left out stays out."""
        pos, keyword = self._bound().slot(name, len(args))
        if pos is not None:
            args[pos] = value
        elif keyword in kwargs:
            kwargs[keyword] = value

    def _bound(self) -> CallArgs:
        if self._call is None:
            names = ("input", *(f"arg{i}" for i in range(1, len(self.node.args))))  # a method call
            self._call = bind_args(self.node, names, type(self.module) if self.module is not None else None)
        return self._call


MaskedSemantics = Callable[[MaskedCall], Any]


def compact(value: Any, kept: tuple[int, torch.Tensor] | None, dim: int | None = None) -> Any:
    """``value`` with only the kept positions along ``dim`` (default: the kept dim)."""
    if kept is None or not isinstance(value, torch.Tensor):
        return value
    d = kept[0] if dim is None else dim
    if value.shape[d] == 1:  # broadcast along the channel dim: nothing to select
        return value
    return value.index_select(d, kept[1].to(value.device))


def scatter(value: Any, kept: tuple[int, torch.Tensor] | None, shape: tuple[int, ...]) -> Any:
    """A tensor of ``shape`` holding ``value`` at the kept positions along the kept dim
    and zeros elsewhere (``value`` as is when it already has ``shape``)."""
    if kept is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(shape):
        return value
    d, idx = kept
    out = value.new_zeros(shape)
    return out.index_copy(d, idx.to(value.device), value)


def _output_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    from .meta import tensor_meta

    m = tensor_meta(node)
    return None if m is None else tuple(m.shape)


def compact_apply(call: MaskedCall) -> Any:
    """The generic masked semantics: every tensor argument with removed channels is
    compacted along its channel dim, the op runs on that, and an output that kept the
    channel dim is scattered back to its original shape (softmax over the channels,
    a mean, max or variance over them, a distance between two vectors)."""
    def shrink(node_arg: Any, value: Any) -> Any:
        if isinstance(node_arg, torch.fx.Node) and isinstance(value, torch.Tensor):
            return compact(value, call.kept(node_arg))
        if isinstance(node_arg, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(value)(shrink(a, v) for a, v in zip(node_arg, value))
        return value

    args = tuple(shrink(a, v) for a, v in zip(call.node.args, call.args))
    kwargs = {k: shrink(call.node.kwargs.get(k), v) for k, v in call.kwargs.items()}
    out = call.run(args, kwargs)
    shape = _output_shape(call.node)
    if shape is None:
        return out
    return scatter(out, call.kept(call.node), shape)
