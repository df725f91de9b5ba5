"""The one place where fxprune's node.meta keys are defined and read.

Capture stores an immutable :class:`TensorMeta` (or a tuple of them, or a
plain Python value such as an ``int`` from ``x.size(1)``) under a single key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx

META_KEY = "fxprune_meta"
LIFTED_KEY = "fxprune_lifted_inputs"
FRONTEND_KEY = "fxprune_frontend"  # gm.meta: which front end captured the graph
PYTREE_SPECS = ("_in_spec", "_out_spec")  # GraphModule attributes of a pytree in/out graph


def copy_pytree_specs(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst`` the pytree input/output specs of ``src`` (an exported graph's generated
    code flattens its inputs and rebuilds its outputs with them)."""
    for attr in PYTREE_SPECS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


class TensorMeta(NamedTuple):
    """Shape and dtype of one tensor value in the graph."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _int(size: Any) -> int:
    """A size as an int: a symbolic size of an exported graph (batch, sequence length)
    by the value it had on the example inputs."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            raise ValueError(f"symbolic size {size} has no example value")
        return int(hint)
    return int(size)


def describe(value: Any) -> Any:
    """Turn a runtime value into what capture stores: TensorMeta for tensors,
    tuples of those for tuples, Python scalars and sizes as they are (symbolic sizes by
    their example value), None otherwise."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(_int(s) for s in value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(_int(s) for s in value)
    if isinstance(value, torch.SymInt):
        return _int(value)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, torch.dtype | torch.device):
        return value
    return None


def set_meta(node: torch.fx.Node, value: Any) -> None:
    node.meta[META_KEY] = describe(value)


def has_meta(node: torch.fx.Node) -> bool:
    return META_KEY in node.meta


def get_meta(node: torch.fx.Node) -> Any:
    """The stored description of ``node``'s value (TensorMeta, tuple, scalar or None)."""
    return node.meta.get(META_KEY)


def tensor_meta(node: Any) -> TensorMeta | None:
    """TensorMeta of ``node`` when it is a graph node producing one tensor, else None."""
    if isinstance(node, torch.fx.Node):
        m = node.meta.get(META_KEY)
        if isinstance(m, TensorMeta):
            return m
    return None


def is_multi(node: Any) -> bool:
    """True when ``node`` produces a tuple of values (``torch.max(x, dim)``, ``split``)."""
    m = node.meta.get(META_KEY) if isinstance(node, torch.fx.Node) else None
    return isinstance(m, tuple) and not isinstance(m, TensorMeta)


def graph_inputs(gm: torch.fx.GraphModule, inputs: tuple) -> tuple:
    """The positional inputs ``gm`` takes, given the inputs of the model it was captured
    from: capture lifts inputs that are ``nn.Parameter`` s into the graph as constants."""
    lifted = set(getattr(gm, "meta", {}).get(LIFTED_KEY, ()))
    return tuple(v for i, v in enumerate(inputs) if i not in lifted)
