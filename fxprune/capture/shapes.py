"""Shape propagation: every node of a captured graph gets an immutable shape record
(``fxprune.meta``).

Shapes are computed on the ``meta`` device (no real FLOPs, no activations allocated);
when an op does not support meta tensors, under a FakeTensorMode; and only as a last
resort with the real example inputs. Common layers and functions get their shape from
their attributes or argument shapes without running a kernel; anything unusual goes to
the kernel, which raises its own error.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .._util import mutable_args
from ..errors import InputError
from ..meta import TensorMeta, get_meta, set_meta


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

    def skipped(self, kind: str, args: tuple, out_shape: tuple[int, ...], module: nn.Module | None = None) -> None:
        """Called when a shortcut gave the output of a conv, linear, attention or recurrent
        layer (``kind``) without running its kernel; a FLOP counter adds what the kernel
        would have counted."""

    def call_module(self, target, args, kwargs):
        if not self.on_meta:
            return super().call_module(target, args, kwargs)
        module = self.submodules.get(target) or self.fetch_attr(target)
        shape = module_shape(module, args, kwargs)
        if shape is not None:  # the shape is known from the module's attributes: no kernel
            kind = _COUNTED_MODULES.get(type(module))
            if kind is not None:
                self.skipped(kind, args, shape, module)
            return torch.empty(shape, dtype=args[0].dtype, device="meta")
        got = recurrent_outputs(module, args, kwargs)
        if got is not None:
            self.skipped("recurrent", args, tuple(got[0].shape), module)
            return got
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
            got = function_shape(target, args, kwargs)
            if got is not None:  # known from the argument shapes: no (Python) meta kernel
                kind = _COUNTED_FUNCTIONS.get(target)
                if kind is not None:
                    self.skipped(kind, args, got[0])
                return torch.empty(got[0], dtype=got[1], device="meta")
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


# modules whose output has the shape and dtype of their input (exact types: a subclass
# may have a forward of its own)
_SAME_SHAPE = frozenset({nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.SiLU,
                         nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                         nn.ELU, nn.SELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
                         nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout})


_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def module_shape(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Output shape of common layers from their attributes (meta kernels for batch norm
    run Python decompositions: computing the shape is ~100x cheaper); None otherwise."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    shape = tuple(args[0].shape)
    if type(module) in _SAME_SHAPE:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                (len(shape) < 2 or shape[1] != module.num_features):
            return None  # let the kernel raise its own error
        return shape
    if type(module) is nn.LayerNorm:
        ns = tuple(module.normalized_shape)
        return shape if len(shape) >= len(ns) and shape[len(shape) - len(ns):] == ns else None
    if type(module) is nn.GroupNorm:
        return shape if len(shape) >= 2 and shape[1] == module.num_channels else None
    if type(module) in (nn.Softmax, nn.LogSoftmax):
        return shape if module.dim is not None and -len(shape) <= module.dim < max(len(shape), 1) else None
    k = _ADAPTIVE_AVG.get(type(module))
    if k is not None:
        size = module.output_size
        size = (size,) * k if isinstance(size, int) else tuple(size)
        if len(shape) not in (k + 1, k + 2) or len(size) != k or min(shape[-k:]) < 1:
            return None
        return shape[:-k] + tuple(n if o is None else o for o, n in zip(size, shape[-k:]))
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        k = len(module.kernel_size)
        if len(shape) != k + 2 or shape[1] != module.in_channels or isinstance(module.padding, str):
            return None
        spatial = tuple((n + 2 * p - d * (ks - 1) - 1) // s + 1 for n, p, d, ks, s in
                        zip(shape[2:], module.padding, module.dilation, module.kernel_size, module.stride))
        return None if min(spatial) < 1 else (shape[0], module.out_channels, *spatial)
    if type(module) is nn.Linear and shape and shape[-1] == module.in_features:
        return (*shape[:-1], module.out_features)
    return None


def recurrent_outputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """(output, h_n) of nn.RNN/GRU, (output, (h_n, c_n)) of nn.LSTM, as meta tensors from
    the module's attributes: on meta these run a Python decomposition step by step (half
    a second for one bidirectional LSTM over 14 steps). Only for a plain input tensor and
    no initial state; anything else goes to the kernel, which checks it."""
    if type(module) not in (nn.LSTM, nn.GRU, nn.RNN) or kwargs or len(args) != 1:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (2, 3) \
            or x.shape[-1] != module.input_size or min(x.shape) < 1:
        return None
    d = 2 if module.bidirectional else 1
    out_size = getattr(module, "proj_size", 0) or module.hidden_size
    batch = () if x.ndim == 2 else (x.shape[0 if module.batch_first else 1],)
    output = (*x.shape[:-1], d * out_size)

    def meta(*shape):
        return torch.empty(shape, dtype=x.dtype, device="meta")

    h_n = meta(d * module.num_layers, *batch, out_size)
    if type(module) is nn.LSTM:
        return meta(*output), (h_n, meta(d * module.num_layers, *batch, module.hidden_size))
    return meta(*output), h_n


# shortcut layers whose kernels a FLOP counter counts (see MetaProp.skipped)
_COUNTED_MODULES = {nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.Linear: "linear"}


_BINARY = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
# elementwise functions of one tensor (the other arguments are flags and constants)
_UNARY = frozenset({F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
                    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, torch.sigmoid, F.tanh,
                    torch.tanh, torch.exp, torch.neg, torch.abs, F.dropout, F.dropout1d, F.dropout2d,
                    F.dropout3d, F.alpha_dropout})


def function_shape(target: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of a few functions whose meta kernels are Python decompositions
    (linear, layer_norm, attention, broadcasting arithmetic), from the argument shapes;
    None where anything is unusual, so that the kernel runs and raises its own error."""
    if target in _UNARY:
        x = args[0] if args else kwargs.get("input")
        others = list(args[1:]) + [v for k, v in kwargs.items() if k != "input"]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or \
                any(isinstance(v, torch.Tensor) for v in others):
            return None
        return tuple(x.shape), x.dtype
    if target in _BINARY:
        if kwargs or len(args) != 2 or not any(isinstance(a, torch.Tensor) for a in args):
            return None
        if not all(isinstance(a, (torch.Tensor, int, float)) and not isinstance(a, bool) for a in args):
            return None
        try:
            shape = torch.broadcast_shapes(*(a.shape for a in args if isinstance(a, torch.Tensor)))
            return tuple(shape), torch.result_type(*args)
        except RuntimeError:
            return None
    if target is torch.cat or target is torch.concat:
        tensors, dim = (args[0] if args else kwargs.get("tensors")), (args[1] if len(args) > 1 else kwargs.get("dim", 0))
        if set(kwargs) - {"tensors", "dim"} or not isinstance(tensors, (list, tuple)) or not tensors or \
                not isinstance(dim, int) or not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        first = tensors[0]
        if first.ndim == 0 or not -first.ndim <= dim < first.ndim:
            return None
        d = dim % first.ndim
        rest = [first.shape[:d], first.shape[d + 1:]]
        if any(t.ndim != first.ndim or t.dtype != first.dtype or [t.shape[:d], t.shape[d + 1:]] != rest
               for t in tensors):
            return None
        return (*first.shape[:d], sum(t.shape[d] for t in tensors), *first.shape[d + 1:]), first.dtype
    if target is torch._C._nn.linear or target is F.linear:
        x, w, b = (list(args) + [kwargs.get("bias")])[:3] if len(args) >= 2 and set(kwargs) <= {"bias"} \
            else (None, None, None)
        if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.ndim == 2 and x.ndim >= 1
                and x.shape[-1] == w.shape[1] and x.dtype == w.dtype
                and (b is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (w.shape[0],)))):
            return None
        return (*x.shape[:-1], w.shape[0]), x.dtype
    if target is torch.layer_norm or target is F.layer_norm:
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
            return None
        bound = {**dict(zip(names, args)), **kwargs}
        x, ns = bound.get("input"), bound.get("normalized_shape")
        if not isinstance(x, torch.Tensor) or not isinstance(ns, (int, tuple, list)):
            return None
        ns = (ns,) if isinstance(ns, int) else tuple(ns)
        params = [bound[k] for k in ("weight", "bias") if bound.get(k) is not None]
        if len(ns) > x.ndim or tuple(x.shape[x.ndim - len(ns):]) != ns or \
                any(not isinstance(p, torch.Tensor) or tuple(p.shape) != ns for p in params):
            return None
        return tuple(x.shape), x.dtype
    if target is torch._C._nn.scaled_dot_product_attention or target is F.scaled_dot_product_attention:
        if len(args) != 3 or set(kwargs) - {"attn_mask", "dropout_p", "is_causal", "scale"}:
            return None
        q, k, v = args
        mask = kwargs.get("attn_mask")
        if not all(isinstance(t, torch.Tensor) and t.ndim >= 2 and t.dtype == q.dtype for t in (q, k, v)):
            return None
        if not (q.ndim == k.ndim == v.ndim and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
                and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
            return None
        if mask is not None:
            try:
                if not isinstance(mask, torch.Tensor) or \
                        torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])) != (*q.shape[:-1], k.shape[-2]):
                    return None
            except RuntimeError:
                return None
        return (*q.shape[:-1], v.shape[-1]), q.dtype
    return None


_COUNTED_FUNCTIONS = {torch._C._nn.linear: "linear", F.linear: "linear",
                      torch._C._nn.scaled_dot_product_attention: "attention",
                      F.scaled_dot_product_attention: "attention"}


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
