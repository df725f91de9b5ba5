"""Repeated blocks under torch.export: one block traced, its graph spliced in for the rest.

A transformer is mostly a run of identical blocks (30 decoder layers of one class, with
parameters of the same shapes and the same settings). torch.export traces every op of
every block through fake tensors and symbolic shapes, which is most of a language
model's capture time. Here a run of identical blocks (:func:`find_runs`) is captured as:

1. the model exported with each block's forward replaced by one opaque op
   (``fxprune::block``) whose output shapes come from running the block once on fake
   tensors (cached per input signature);
2. each distinct call signature of a run (the tensor inputs' shapes and dtypes, the
   non-tensor arguments) exported once, on its first block, with the input dims that
   are symbolic in the model's graph symbolic again;
3. every opaque op replaced by a copy of that graph whose attribute reads name the
   called block's own parameters and buffers.

Blocks count as identical when they have the same class, the same parameter and buffer
names, shapes and dtypes, the same submodule classes, and the same plain attributes
(numbers, strings, flags; an attribute that holds the block's own index, such as
``layer_idx``, may differ). Where the weights are real, the spliced graph is run on
the example inputs and compared with the model itself before it is used; anything that
does not hold falls back to exporting the whole model (the reason is kept in
``gm.meta["fxprune_repeated"]`` either way).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

REPEATED_KEY = "fxprune_repeated"  # gm.meta: what the repeated-block capture did, or why it was not used
MIN_RUN = 4  # shorter runs are exported whole: splicing pays off from a few blocks on

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _value(v: Any, depth: int = 0) -> Any:
    """A comparable description of an attribute's value: plain values as they are,
    tensors by shape and dtype, containers by their items, functions by identity, other
    objects (a per-block helper object, a shared config) by class and attributes, two
    levels deep (then by identity)."""
    if _plain(v):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, (tuple, list, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return (type(v).__name__, tuple(_value(e, depth) for e in items))
    if isinstance(v, dict):
        return ("dict", tuple((k, _value(e, depth)) for k, e in v.items()))
    if callable(v) and not hasattr(v, "__dict__") or depth >= 2 or not hasattr(v, "__dict__") \
            or isinstance(v, type) or callable(v) and not isinstance(v, nn.Module) and hasattr(v, "__code__"):
        return ("id", id(v))
    return (type(v), tuple((k, _value(e, depth + 1)) for k, e in sorted(vars(v).items())
                           if not k.endswith("_hooks")))


_INDEX_WORDS = ("idx", "index", "layer", "number", "_id")


def _attributes(m: nn.Module, index: int | None) -> tuple:
    """The settings of ``m`` that may change what its forward does (:func:`_value`; the
    block's own index, under a name that says so, by a marker)."""
    out = []
    for k, v in sorted(vars(m).items()):
        if k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set") or k.endswith("_hooks") \
                or k.startswith("_forward_") or k.startswith("_backward_") or k.startswith("_state_dict") \
                or k.startswith("_load_state_dict"):
            continue
        if index is not None and type(v) is int and v == index and any(w in k.lower() for w in _INDEX_WORDS):
            out.append((k, "<index>"))
        else:
            out.append((k, _value(v)))
    return tuple(out)


def _hooked(m: nn.Module) -> bool:
    return any(getattr(m, h, None) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                            "_backward_pre_hooks", "_state_dict_hooks"))


def signature(block: nn.Module, index: int | None) -> tuple | None:
    """What must match for two blocks to trace to the same graph; None for a block that
    is never treated as a repeat (one with hooks, which the opaque op would skip)."""
    parts = []
    for name, m in block.named_modules():
        if _hooked(m) or "forward" in vars(m):
            return None
        params = tuple((k, tuple(p.shape), p.dtype, p.requires_grad) for k, p in m._parameters.items()
                       if p is not None)
        buffers = tuple((k, tuple(b.shape), b.dtype, k in m._non_persistent_buffers_set)
                        for k, b in m._buffers.items() if b is not None)
        parts.append((name, type(m), params, buffers, _attributes(m, index)))
    return tuple(parts)


def find_runs(model: nn.Module, min_len: int = MIN_RUN) -> list[list[tuple[str, nn.Module]]]:
    """Runs of at least ``min_len`` consecutive identical children of a ``ModuleList`` or
    ``Sequential`` (outermost first; nothing inside a run's blocks is searched again)."""
    runs: list[list[tuple[str, nn.Module]]] = []
    inside: set[int] = set()
    for path, container in model.named_modules():
        if id(container) in inside or not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        keyed = []
        for name, child in container.named_children():
            index = int(name) if name.isdigit() else None
            keyed.append((f"{path}.{name}" if path else name, child, signature(child, index)))
        for sig, group in itertools.groupby(keyed, key=lambda e: e[2]):
            members = [(p, c) for p, c, _ in group]
            if sig is not None and len(members) >= min_len and len({id(c) for _, c in members}) == len(members):
                runs.append(members)
                inside.update(id(m) for _, c in members for m in c.modules())
    return runs


@dataclass
class Call:
    """One distinct way a run's blocks are called: the pytree of (args, kwargs) with the
    non-tensor leaves, and the first block called so."""

    key: int
    run: int
    path: str
    run_paths: frozenset[str]
    block: nn.Module
    in_spec: Any
    constants: list  # per leaf: the value, or None for a tensor leaf (tensor_leaf marks which)
    tensor_leaf: list[bool]
    tensors: list  # the fake tensors of the first call
    out_leaves: list = field(default_factory=list)  # per output leaf: the value (None for a tensor)
    out_is_tensor: list[bool] = field(default_factory=list)
    out_spec: Any = None
    out_meta: list = field(default_factory=list)  # (shape, stride, dtype, device) per tensor output


_ACTIVE = threading.local()


def _calls() -> dict[int, Call]:
    calls = getattr(_ACTIVE, "calls", None)
    if calls is None:
        raise RuntimeError("fxprune::block ran outside a repeated-block capture")
    return calls


@torch.library.custom_op("fxprune::block", mutates_args=())
def _block(key: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A block's forward as one op, for the capture only (never in a returned graph)."""
    raise RuntimeError("fxprune::block is a capture placeholder and does not run")


@_block.register_fake
def _block_fake(key: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    call = _calls()[key]
    if call.out_spec is None:  # the first call of this signature: the block run once on fake tensors
        args, kwargs = pytree.tree_unflatten(_merge(call, tensors), call.in_spec)
        with _unstubbed(call.block):
            out = call.block(*args, **kwargs)
        leaves, call.out_spec = pytree.tree_flatten(out)
        call.out_is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
        call.out_leaves = [None if t else v for v, t in zip(leaves, call.out_is_tensor)]
        call.out_meta = [(tuple(v.shape), tuple(v.stride()), v.dtype, v.device) for v in leaves
                         if isinstance(v, torch.Tensor)]
    return [torch.empty_strided(s, st, dtype=d, device=dev) for s, st, d, dev in call.out_meta]


def _merge(call: Call, tensors: list) -> list:
    it = iter(tensors)
    return [next(it) if is_t else c for c, is_t in zip(call.constants, call.tensor_leaf)]


@contextlib.contextmanager
def _unstubbed(block: nn.Module) -> Iterator[None]:
    stub = block.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if stub is not None:
            block.__dict__["forward"] = stub


def _same_call(call: Call, spec: Any, constants: list, tensor_leaf: list, tensors: list) -> bool:
    if call.in_spec != spec or call.tensor_leaf != tensor_leaf or len(call.tensors) != len(tensors):
        return False
    if any(type(a) is not type(b) or a != b for a, b in zip(call.constants, constants) if a is not None):
        return False
    for a, b in zip(call.tensors, tensors):
        if a.dtype != b.dtype or a.device != b.device or a.ndim != b.ndim or a.requires_grad != b.requires_grad:
            return False
        for x, y in zip(a.shape, b.shape):
            if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
                if str(x) != str(y):  # the same symbol (or the same size expression)
                    return False
            elif x != y:
                return False
    return True


class Stubs:
    """While entered, every block of ``runs`` calls ``fxprune::block`` instead of running
    (where its arguments are tensors and plain values); ``calls`` holds each distinct call."""

    def __init__(self, runs: list[list[tuple[str, nn.Module]]]):
        self.runs = runs
        self.calls: dict[int, Call] = {}
        self._paths = [frozenset(p for p, _ in members) for members in runs]

    def __enter__(self) -> Stubs:
        _ACTIVE.calls = self.calls
        for r, members in enumerate(self.runs):
            for path, block in members:
                block.__dict__["forward"] = self._stub(r, path, block)
        return self

    def __exit__(self, *exc: Any) -> None:
        for members in self.runs:
            for _, block in members:
                block.__dict__.pop("forward", None)
        _ACTIVE.calls = None

    def _stub(self, run: int, path: str, block: nn.Module):
        real = type(block).forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            leaves, spec = pytree.tree_flatten((args, kwargs))
            tensor_leaf = [isinstance(v, torch.Tensor) for v in leaves]
            if not all(t or _plain(v) for v, t in zip(leaves, tensor_leaf)):
                return real(block, *args, **kwargs)  # a cache object, a callable: traced as it is
            tensors = [v for v, t in zip(leaves, tensor_leaf) if t]
            constants = [None if t else v for v, t in zip(leaves, tensor_leaf)]
            call = next((c for c in self.calls.values()
                         if c.run == run and _same_call(c, spec, constants, tensor_leaf, tensors)), None)
            if call is None:
                call = Call(len(self.calls), run, path, self._paths[run], block, spec, constants, tensor_leaf,
                            list(tensors))
                self.calls[call.key] = call
            outs = torch.ops.fxprune.block(call.key, tensors)
            it = iter(outs)
            return pytree.tree_unflatten([next(it) if t else v for v, t in zip(call.out_leaves, call.out_is_tensor)],
                                         call.out_spec)

        return forward


class Wrapper(nn.Module):
    """Calls ``block`` with the flattened inputs of one recorded call (export takes the
    list of tensors; the plain values are fixed)."""

    def __init__(self, block: nn.Module, call: Call):
        super().__init__()
        self.block = block
        self._call = call

    def forward(self, tensors: list[torch.Tensor]) -> Any:
        args, kwargs = pytree.tree_unflatten(_merge(self._call, tensors), self._call.in_spec)
        return self.block(*args, **kwargs)


def example_tensors(call: Call) -> tuple[list[torch.Tensor], list[dict | None]]:
    """Inputs for exporting a call on its own: zeros of each fake input's example shape
    (values never steer an export), and the dims to keep symbolic (those symbolic in the
    model's graph)."""
    from ..meta import describe

    examples, dims = [], []
    auto = torch.export.Dim.AUTO
    for t in call.tensors:
        shape = describe(t).shape
        device = t.device if t.device.type != "meta" else torch.device("meta")
        examples.append(torch.zeros(shape, dtype=t.dtype, device=device))
        dyn = {d: auto for d, s in enumerate(t.shape) if isinstance(s, torch.SymInt)}
        dims.append(dyn or None)
    return examples, dims


__all__ = ["MIN_RUN", "REPEATED_KEY", "Call", "Stubs", "Wrapper", "example_tensors", "find_runs", "signature"]
