"""Shape propagation: every node of a captured graph gets an immutable shape record
(``fxprune.meta``).

Shapes are computed on the ``meta`` device (no real FLOPs, no activations allocated);
when an op does not support meta tensors, under a FakeTensorMode; and only as a last
resort with the real example inputs. Common layers and functions get their shape from
their attributes or argument shapes without running a kernel: the shape shortcut of
their op spec in the rule registry (``OpSpec.shape``, declared in the op's family file
under ``fxprune/rules/``); anything unusual goes to the kernel, which raises its own
error.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.fx
from torch import nn

from .._util import mutable_args
from ..errors import InputError
from ..meta import TensorMeta, get_meta, set_meta
from ..rules.registry import OpSpec, function_spec, module_spec


class MetaProp(torch.fx.Interpreter):
    """Runs the graph once and stores each node's shape description.

    With ``on_meta`` every parameter, buffer and input is swapped for a tensor on
    the ``meta`` device (shapes only, no storage, no FLOPs); the user's modules
    are called through ``torch.func.functional_call`` so they are not touched.
    """

    def __init__(self, gm: torch.fx.GraphModule, on_meta: bool = False):
        super().__init__(gm)
        self.on_meta = on_meta
        self._meta_state: dict[str, nn.Module] = {}

    def skipped(self, spec: OpSpec, op: Any, args: tuple, out: Any) -> None:
        """Called when the shape shortcut of ``spec`` gave the output of ``op`` (a module or
        a function) without running its kernel, where the spec counts FLOPs
        (``spec.flops``): a FLOP counter adds what the kernel would have counted."""

    def call_module(self, target, args, kwargs):
        if not self.on_meta:
            return super().call_module(target, args, kwargs)
        module = self.submodules.get(target) or self.fetch_attr(target)
        spec = module_spec(type(module))
        if spec is not None and spec.shape is not None:
            out = spec.shape(module, args, kwargs)
            if out is not None:  # known from the module's attributes: no kernel
                if spec.flops is not None:
                    self.skipped(spec, module, args, out)
                return out
        shadow = self._meta_state.get(target)
        if shadow is None:
            shadow = self._meta_state[target] = _meta_shadow(module)
        with torch.device("meta"):  # a forward may make tensors from sizes
            return shadow(*args, **kwargs)

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        return mutable_args(*super().fetch_args_kwargs_from_env(n))

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return to_meta(value) if self.on_meta else value

    def call_function(self, target, args, kwargs):
        if self.on_meta and "device" in kwargs:  # exported graphs name the capture's device
            kwargs = {**kwargs, "device": torch.device("meta")}
        if self.on_meta:
            spec = function_spec(target)
            if spec is not None and spec.shape is not None:
                out = spec.shape(target, args, kwargs)
                if out is not None:  # known from the argument shapes: no (Python) meta kernel
                    if spec.flops is not None:
                        self.skipped(spec, target, args, out)
                    return out
        return super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            # a tensor made from sizes (arange, zeros) must be meta too; the device mode costs
            # every torch call a Python detour, so it is entered only where that can happen
            meta_mode = torch.device("meta") if self.on_meta and _may_make_tensors(n) else contextlib.nullcontext()
            with meta_mode:
                result = super().run_node(n)
        except InputError:
            raise
        except Exception as exc:
            raise NodeFailure(n, exc) from exc
        set_meta(n, result)
        return result


def _may_make_tensors(n: torch.fx.Node) -> bool:
    """Whether running ``n`` may create a tensor on the default device: a function or
    method none of whose inputs is a tensor (a module's forward, which may too, is run
    under the meta device by ``MetaProp.call_module`` where no shortcut applies)."""
    if n.op not in ("call_function", "call_method"):
        return False
    return not any(isinstance(get_meta(i), TensorMeta) for i in n.all_input_nodes)


def module_shape(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Output shape of a layer from its attributes, by the shape shortcut of its op spec
    (exact type); None where there is none or anything is unusual."""
    spec = module_spec(type(module))
    out = spec.shape(module, args, kwargs) if spec is not None and spec.shape is not None else None
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def recurrent_outputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """(output, h_n) of nn.RNN/GRU, (output, (h_n, c_n)) of nn.LSTM, as meta tensors, by the
    shape shortcut of the recurrent op spec; None for anything else."""
    spec = module_spec(type(module))
    out = spec.shape(module, args, kwargs) if spec is not None and spec.shape is not None else None
    return out if isinstance(out, tuple) else None


def function_shape(target: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of a function's output from the argument shapes, by the shape
    shortcut of its op spec; None where there is none or anything is unusual (the kernel
    then runs and raises its own error)."""
    spec = function_spec(target)
    out = spec.shape(target, args, kwargs) if spec is not None and spec.shape is not None else None
    return (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else None


def _meta_shadow(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (and its children) whose tensors live on the meta
    device; the user's module is not touched."""
    shadow = copy.copy(module)
    for key, value in list(vars(module).items()):
        if isinstance(value, dict):
            shadow.__dict__[key] = dict(value)
    shadow._parameters = {k: None if v is None else nn.Parameter(to_meta(v), v.requires_grad)
                          for k, v in module._parameters.items()}
    shadow._buffers = {k: to_meta(v) for k, v in module._buffers.items()}
    shadow._modules = {k: None if v is None else _meta_shadow(v) for k, v in module._modules.items()}
    return shadow


def to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return torch.empty_like(value, device="meta")
    return value


class NodeFailure(Exception):
    def __init__(self, node: torch.fx.Node, exc: BaseException):
        super().__init__(str(exc))
        self.node = node
        self.exc = exc

def propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple, *, fake: bool = True) -> str:
    """Store the shape of every node of ``gm`` run on ``inputs``; return the mode that
    worked: 'meta' (shapes only), 'fake' (FakeTensorMode) or 'real' (the example inputs)."""
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_ph != len(inputs):
        raise InputError(f"the model takes {n_ph} positional input(s) but {len(inputs)} example "
                         f"input(s) were given; pass a tuple with one example per input")
    modes = ["meta", "fake", "real"] if fake else ["real"]
    last: NodeFailure | None = None
    for mode in modes:
        try:
            with torch.no_grad():
                if mode == "meta":
                    MetaProp(gm, on_meta=True).run(*(to_meta(t) for t in inputs))
                elif mode == "fake":
                    from torch._subclasses.fake_tensor import FakeTensorMode
                    fmode = FakeTensorMode(allow_non_fake_inputs=True)
                    fin = tuple(fmode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
                    with fmode:
                        MetaProp(gm).run(*fin)
                else:
                    MetaProp(gm).run(*inputs)
            return mode
        except NodeFailure as failure:
            last = failure
    assert last is not None
    node = last.node
    raise InputError(
        f"the example inputs do not fit the model: running node {node.format_node()} failed with "
        f"{type(last.exc).__name__}: {last.exc}. Fix: pass example inputs of the shape and dtype "
        f"the model expects (got {[tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in inputs]})"
    ) from last.exc
