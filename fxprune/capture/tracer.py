"""The torch.fx front end: a symbolic tracer that keeps fxprune's invariants.

The tracer finds parameter names in one table, reads a function's bytecode once per
trace, takes proxies and plain values as node arguments directly, records basic slice
assignment as ``operator.setitem``, computes branch conditions that depend on shapes
only, and makes the graph hold what the forward did to the model's state (which is then
restored: :mod:`.state`). Modules that :mod:`fxprune.decompose` knows are traced as their
functional decompositions (:mod:`.decompositions`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import operator
import sys
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from ..meta import TensorMeta, set_meta
from .decompositions import DecomposingTracer
from .graphs import ancestors, graph_module, set_args
from .shapes import MetaProp, module_shape, to_meta
from .source import user_frame
from .state import ABSENT, Registered, own_written_buffers, resolve, state_restored


class _Proxy(torch.fx.Proxy):
    """A Proxy whose ``__iter__`` (``a, b = x.shape``: torch.fx reads the calling bytecode
    to learn how many values are unpacked) disassembles each code object once per trace
    instead of once per unpacking."""

    def __iter__(self):
        import bisect
        import dis

        frame = sys._getframe(1)
        code = frame.f_code
        cache = self.tracer._instructions
        got = cache.get(code)
        if got is None:
            insts = list(dis.get_instructions(code))
            got = cache[code] = ([i.offset for i in insts], insts)
        offsets, insts = got
        if sys.version_info >= (3, 11):
            k = bisect.bisect_left(offsets, frame.f_lasti)
        else:
            k = frame.f_lasti // 2
        inst = insts[k] if k < len(insts) else None
        if inst is not None and inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))
        return self.tracer.iter(self)

    def __len__(self):
        """``len(x)``: from the example values when the tracer follows them, else torch.fx's
        error."""
        known = self.tracer.shape_value(self)
        if known is not _UNKNOWN:
            return len(known)
        return super().__len__()

    def __add__(self, other):
        """``x.size()[:-1] + (n,)``: where the tracer follows example values, a shape
        joined with a tuple becomes a tuple of its sizes, one node each (the form a view
        with literal sizes has, whose channel counts the rewrite updates)."""
        sizes = self._sizes() if isinstance(other, (tuple, list)) else None
        return torch.fx.Proxy.__add__(self, other) if sizes is None else sizes + tuple(other)

    def __radd__(self, other):
        sizes = self._sizes() if isinstance(other, (tuple, list)) else None
        return torch.fx.Proxy.__radd__(self, other) if sizes is None else tuple(other) + sizes

    def _sizes(self) -> tuple | None:
        """A followed shape as a tuple of one proxy per size, or None."""
        known = self.tracer.shape_value(self)
        if isinstance(known, tuple) and self.node in getattr(self.tracer, "_shape_nodes", ()):
            return tuple(self[i] for i in range(len(known)))
        return None

    def __index__(self):
        """A size used as an index or count (``range(n)``): its example value, when the
        tracer follows values and the size comes from shapes alone."""
        known = self.tracer.shape_value(self)
        if known is not _UNKNOWN and isinstance(known, int):
            return known
        raise TypeError(f"'{type(self).__name__}' cannot be used as an index while tracing")

    def __setitem__(self, key, value):
        """``x[index] = v`` with a basic index becomes an ``operator.setitem`` node (torch.fx
        has none: such models fell back to export); other indices still fail the trace."""
        if not _basic_index(key) or not isinstance(value, (torch.fx.Proxy, int, float)) \
                or isinstance(value, bool):
            raise TypeError(f"'{type(self).__name__}' object does not support item assignment "
                            f"with index {key!r}")
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __setattr__(self, name, value):
        """``t.data = v`` on a traced tensor fails the trace: the graph has no node for it,
        and the ops after it would read the old values (torch.fx sets an attribute of the
        Proxy and goes on)."""
        if name == "data":
            what = self.node.target if self.node.op == "get_attr" else self.node.name
            raise TypeError(f"the forward assigns '{what}.data' of a traced tensor: torch.fx records "
                            f"no write to a tensor's data")
        super().__setattr__(name, value)


def _proxy_getattr(self, k):
    return _Attribute(self, k)


_Proxy.__getattr__ = _proxy_getattr  # x.shape: an attribute proxy with _Proxy's behaviour


class _Attribute(torch.fx.proxy.Attribute, _Proxy):
    """``x.shape``/``x.size`` of a traced value (made a node when used): ``len``, iteration
    and joining behave as for :class:`_Proxy`."""


class OrderedDictOutput(torch.fx.graph.CodeGen):
    """Generated code that returns an ``OrderedDict`` where the model did (torch.fx
    records a model's returned OrderedDict as a plain dict: torchvision's segmentation
    models and FPN backbones would come back with another output type)."""

    def generate_output(self, output_args, **kwargs):
        plain = super().generate_output(output_args, **kwargs)
        return "return collections.OrderedDict(" + plain[len("return "):] + ")"

    def process_outputs(self, outputs):
        return collections.OrderedDict(outputs)

    def additional_globals(self):
        return [("collections", collections)]


class _ModuleStack(collections.OrderedDict):
    """The tracer's module stack, copied onto every node it creates: ``copy.copy`` of an
    OrderedDict goes through the pickle protocol (a quarter of a transformer's tracing
    time); this copies it directly, to the same plain OrderedDict."""

    def __copy__(self):
        return collections.OrderedDict(self)


def _basic_index(key: Any) -> bool:
    """Ints, slices of ints, None and Ellipsis (alone or in a tuple): an index whose written
    region is known when tracing."""
    entries = key if isinstance(key, tuple) else (key,)
    for e in entries:
        if isinstance(e, slice):
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (e.start, e.stop, e.step)):
                return False
        elif not (e is None or e is Ellipsis or (isinstance(e, int) and not isinstance(e, bool))):
            return False
    return True


_PLAIN_ARGS = (int, float, bool, str, type(...))  # arguments a graph holds as they are

# torch factories taking sizes as varargs: torch's argument parser only takes ``ones(n, 3)``
# as a size list when ``n`` is an int, so a traced size first (``ones(x.shape[0], 3)``)
# fails there; the trace passes such sizes as one tuple, which it records
_VARARG_FACTORIES = ("ones", "zeros", "empty", "rand", "randn")


def _packing_sizes(factory: Any) -> Any:
    """``torch.ones(n, 3)`` with a traced ``n`` calls ``torch.ones((n, 3))``."""
    def call(*size: Any, **kwargs: Any) -> Any:
        if len(size) > 1 and isinstance(size[0], torch.fx.Proxy):
            return factory(size, **kwargs)
        return factory(*size, **kwargs)
    call.__name__, call.__qualname__, call.__doc__ = factory.__name__, factory.__qualname__, factory.__doc__
    return call


def _reading_traced_dtype(info: Any) -> Any:
    """``torch.finfo(x.dtype)`` (a mask's fill value) reads the dtype on the example values
    where the tracer follows them, as torch.export specializes it (torch's ``finfo`` and
    ``iinfo`` take no traced value)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.fx.Proxy) and isinstance(args[0].tracer, Tracer):
            known = args[0].tracer.shape_value(args[0])
            if isinstance(known, torch.dtype):
                return info(known, *args[1:], **kwargs)
        return info(*args, **kwargs)
    call.__name__, call.__qualname__, call.__doc__ = info.__name__, info.__qualname__, info.__doc__
    return call


@contextlib.contextmanager
def _torch_functions_wrapped(names: tuple[str, ...], wrap: Any) -> Any:
    """While tracing: ``torch.<name>`` for each of ``names`` is ``wrap(torch.<name>)``, put
    back afterwards."""
    saved = {name: getattr(torch, name) for name in names}
    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


_UNKNOWN = object()  # a traced value not followed (no example values, or one that failed)
FOLLOW_BYTES = 1 << 30  # example values held while following a trace; beyond, it goes on on meta
# what reading a tensor's shape looks like in a traced graph: attributes and methods whose
# result depends on no tensor's values
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "layout",
                          "requires_grad", "is_meta"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "get_device", "is_floating_point",
                            "is_complex", "is_contiguous", "element_size", "stride"})


class Tracer(DecomposingTracer):
    """A symbolic tracer with extra leaf modules that remembers the module stack,
    so a failure can name the module being traced."""

    def __init__(self, leaf_modules: Iterable = (), example_inputs: tuple | None = None, careful: bool = False,
                 follow: bool = False):
        super().__init__(example_inputs, careful)
        # follow: every traced value is also computed on the example inputs as the trace goes,
        # and Python that needs a size (a branch on a sequence length, len(), unpacking a
        # shape) reads it there, as torch.export specializes such values
        self.follow = follow and example_inputs is not None
        self._values: dict[torch.fx.Node, Any] = {}
        self._shape_nodes: set[torch.fx.Node] = set()
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes become graph nodes
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self._fxp_stack: list[tuple[str, str]] = []
        self.module_stack = _ModuleStack()
        self._reads: dict[torch.fx.Node, Any] = {}

    def is_leaf_user(self, m: nn.Module, qualname: str) -> bool:
        """Whether the user asked for ``m`` to stay opaque."""
        return bool((self._leaf_types and isinstance(m, self._leaf_types)) or qualname in self._leaf_names
                    or id(m) in self._leaf_ids)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if (self._leaf_types and isinstance(m, self._leaf_types)) or qualname in self._leaf_names \
                or id(m) in self._leaf_ids:
            return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self._attr_names: dict[int, str] | None = None
        self._reads = {}
        self._instructions: dict[types.CodeType, tuple[list[int], list]] = {}
        self._ordered_keys: list[list] = []
        self._static: set[torch.fx.Node] = set()
        self._values, self._shape_nodes = {}, set()
        self._dynamic: set[torch.fx.Node] = set()
        self._stand_in: set[torch.fx.Node] = set()  # values computed from zeros standing in for a layer's output
        self._on_meta, self._held = False, 0
        self._shadows: dict[str, nn.Module] = {}
        try:
            with _torch_functions_wrapped(_VARARG_FACTORIES, _packing_sizes), \
                    _torch_functions_wrapped(("finfo", "iinfo"), _reading_traced_dtype):
                graph = super().trace(root, concrete_args)
        finally:
            self._instructions = {}
            self._values, self._shadows = {}, {}  # the example values (activations) are not kept
        for n in reversed(list(graph.nodes)):  # what only a static branch condition used
            if n in self._static and not n.users and n.op in ("call_function", "call_method", "get_attr"):
                graph.erase_node(n)
        out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
        if out is not None and isinstance(out.args[0], dict) and list(out.args[0]) in self._ordered_keys \
                and type(graph._codegen) is torch.fx.graph.CodeGen:
            graph._codegen = OrderedDictOutput()  # the model returned an OrderedDict
        return graph

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's ``getattr``, with the attribute's qualified name found in a table
        built once per trace (torch.fx walks every named parameter, then every buffer, on
        each first access of one: quadratic in a transformer's parameter count). A tensor
        not in the table is not one the model held when the table was built: a forward
        assigned it (``self.table = torch.ones(8)``), and it is a value of the graph, not
        an attribute (torch.fx would find it under the assigned name, and that name holds
        the old tensor once the model is restored)."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._attr_names is None:
            names: dict[int, str] = {}
            for n, t in self.root.named_parameters():
                names.setdefault(id(t), n)
            self._param_ids = set(names)
            for n, t in self.root.named_buffers():
                names.setdefault(id(t), n)
            self._attr_names = names
        name = self._attr_names.get(id(attr_val))
        if name is None:
            return attr_val
        if isinstance(attr_val, torch.nn.Parameter) != (id(attr_val) in self._param_ids):
            return super().getattr(attr, attr_val, parameter_proxy_cache)  # what torch.fx does
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def run_to(self, target: torch.fx.Node) -> TensorMeta | None:
        """Shape and dtype of ``target`` on the example inputs, computed on meta from the
        nodes it depends on; None where not known."""
        need = ancestors(target)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        inputs = set(placeholders[:len(self.example_inputs)])
        if len(inputs) < len(self.example_inputs) or any(n in need for n in placeholders[len(inputs):]):
            return None  # depends on an argument specialized by concrete_args
        try:
            out = self._run_on_meta(target, need | inputs, [to_meta(t) for t in self.example_inputs])
        except Exception:  # an op without a meta kernel, a data-dependent size: not known here
            return None
        return TensorMeta(tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else None

    def _run_on_meta(self, target: torch.fx.Node, nodes: set, inputs: list) -> Any:
        """The value of ``target`` computed from ``nodes`` of the graph traced so far (its
        ancestors, placeholders fed with ``inputs``), on the meta device. An attribute
        the forward has assigned since a get_attr node read it is fed as an input: the
        value the node read."""
        graph, env, reads = torch.fx.Graph(), {}, []
        for n in self.graph.nodes:
            if n in nodes:
                read = self.stale_read(n)
                if read is ABSENT:
                    env[n] = graph.node_copy(n, env.__getitem__)
                else:
                    env[n] = graph.placeholder(n.name)
                    reads.append(to_meta(read))
            if n is target:
                break
        graph.output(env[target])
        # the trace patches nn.Module.__call__ (and wrapped functions) while it runs:
        # running modules here needs them as they are
        unpatched = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", contextlib.nullcontext)
        with torch.no_grad(), unpatched():
            return MetaProp(torch.fx.GraphModule(self.root, graph), on_meta=True).run(*inputs, *reads)

    def stale_read(self, node: torch.fx.Node) -> Any:
        """What the get_attr ``node`` read when the model no longer holds it under the node's
        target (a forward assigned the attribute since, or the capture restored it), else
        ``ABSENT``."""
        read = self._reads.get(node, ABSENT) if node.op == "get_attr" else ABSENT
        return ABSENT if read is ABSENT or read is resolve(self.root, node.target) else read

    def settle_assignments(self, graph: torch.fx.Graph, registered: "Registered", model_name: str) -> None:
        """Make ``graph`` hold what the forward did to the model's parameters, buffers and
        submodules during the trace, and put them back as they were (``registered``).

        * Every get_attr node refers to the tensor it read: one whose attribute the forward
          assigned afterwards (or that it assigned itself) becomes a constant.
        * A buffer the model had and the forward assigned (``self.table = self.table * 1.0``,
          ``self.last = x.mean(0)``) is written at the end of the graph, in place, as
          torch.export does: the graph then changes its own buffer as the model changes its
          own. The value must have the buffer's shape and dtype, and no module the graph
          calls as one node may hold the buffer (it would read the old one).
        * A parameter assignment, or a buffer's removal, fails the trace (TraceError naming
          it): a graph cannot keep either. A submodule assignment the trace got through (the
          calls name the modules the model holds) and a buffer the forward adds are dropped,
          as a plain attribute it sets is.
        """
        changes = registered.changes()
        registered.restore()
        writes = []
        for name, kind, before, now in changes:
            if kind == "_parameters" and before is not None:
                what = "removes" if now is ABSENT or now is None else "assigns"
                raise TraceError(f"could not trace {model_name}: its forward {what} parameter '{name}', which a "
                                 f"captured graph cannot keep. Fix: compute the value in forward without "
                                 f"storing it on the module")
            if kind != "_buffers" or before is ABSENT or before is None:
                continue
            if now is ABSENT or now is None:
                raise TraceError(f"could not trace {model_name}: its forward removes buffer '{name}', which a "
                                 f"captured graph cannot keep. Fix: keep the buffer and compute the value "
                                 f"without storing it")
            writes.append((name, before, now))
        for node in list(graph.nodes):  # reads of tensors the model no longer holds there
            read = self.stale_read(node)
            if read is ABSENT:
                continue
            if not isinstance(read, torch.Tensor):
                raise TraceError(f"could not trace {model_name}: its forward reassigns '{node.target}', "
                                 f"which the graph reads as a {type(read).__name__}. Fix: read it before "
                                 f"assigning it, or do not store it on the module")
            with graph.inserting_before(node):
                constant = self.create_arg(read)
            node.replace_all_uses_with(constant)
            graph.erase_node(node)
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        called = {n.target for n in graph.nodes if n.op == "call_module"}
        for name, before, now in writes:
            atoms = name.split(".")
            caller = next((p for p in (".".join(atoms[:i]) for i in range(1, len(atoms))) if p in called), None)
            if caller is not None:
                raise TraceError(f"could not trace {model_name}: its forward assigns buffer '{name}' of module "
                                 f"'{caller}', which the graph calls as one node: the module would read the "
                                 f"buffer it had, not the one assigned. Fix: compute the value without storing "
                                 f"it on the module")
            if isinstance(now, torch.fx.Proxy) and now.tracer is self:
                value, meta = now.node, self.run_to(now.node)
            elif isinstance(now, torch.Tensor):
                with graph.inserting_before(out):
                    value = self.create_arg(now)
                meta = TensorMeta(tuple(now.shape), now.dtype)
            else:
                raise TraceError(f"could not trace {model_name}: its forward assigns buffer '{name}' a "
                                 f"{type(now).__name__}. Fix: assign it a tensor")
            held = TensorMeta(tuple(before.shape), before.dtype)
            if meta != held:
                got = "a value whose shape is not known on the example inputs" if meta is None else \
                    f"a tensor of shape {meta.shape} and dtype {meta.dtype}"
                raise TraceError(f"could not trace {model_name}: its forward assigns buffer '{name}' {got}, "
                                 f"and the model holds one of shape {held.shape} and dtype {held.dtype}; a "
                                 f"captured graph keeps a buffer assignment as an in-place copy, which needs "
                                 f"both to match. Fix: register the buffer with the shape and dtype the "
                                 f"forward gives it, or compute the value without storing it")
            with graph.inserting_before(out):
                graph.call_method("copy_", (graph.get_attr(name), value))

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        """``if`` or ``assert`` on a traced value that depends on no model input and on
        no tensor's values, only on shapes (a buffer's ``numel()``, a parameter's shape:
        timm's ``assert self.periods.numel() == dim``), has one value whatever the inputs
        and the state: it is computed (on meta) and the branch taken, as torch.export
        specializes such values. A condition on the inputs, or on a buffer's values (a
        flag a forward may flip), still fails the trace."""
        if self.follow and obj.node in self._shape_nodes:
            value = self._values.get(obj.node, _UNKNOWN)
            if value is not _UNKNOWN and not isinstance(value, torch.Tensor):
                return bool(value)  # a size condition on the example inputs: specialized, as export does
        need = ancestors(obj.node)
        if any(n.op == "placeholder" for n in need):
            return super().to_bool(obj)
        try:
            value = bool(self._run_on_meta(obj.node, need, []))  # a meta tensor has no value
        except Exception:
            return super().to_bool(obj)
        self._static |= need
        return value

    def proxy(self, node):
        return _Proxy(node, self)

    # -- following example values (``follow``) -------------------------------------------

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """With ``follow``: a forward that takes ``*args``/``**kwargs`` (a decorated
        forward, as Hugging Face models have) gets one placeholder per example input,
        named after the undecorated forward's parameters; and an output that is a pytree
        node of its own class (a ``ModelOutput``) is returned as that class again."""
        if not self.follow:
            fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
            return fn, self._none_inputs(args, is_module)
        import inspect

        import torch.utils._pytree as pytree

        try:
            params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())
        except (TypeError, ValueError):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names = [p.name for p in params[1 if is_module else 0:]
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        star = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
        if star is not None:  # forward(x, *args): the other example inputs fill *args
            names += [f"{star}_{i}" for i in range(len(self.example_inputs) - len(names))]
        if len(names) < len(self.example_inputs) or concrete_args:
            fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
            return fn, self._none_inputs(args, is_module)
        args = [self.root] if is_module else []
        args += [self.create_proxy("placeholder", names[i], (), {}) for i in range(len(self.example_inputs))]
        in_spec = pytree.tree_flatten(tuple(args[1 if is_module else 0:]))[1]
        plain = (tuple, list, dict, collections.OrderedDict)

        def fn(*a):
            out = root_fn(*a)
            if type(out) in plain or type(out) not in pytree.SUPPORTED_NODES:
                return out
            leaves, out_spec = pytree.tree_flatten(out)
            self.graph._codegen = torch.fx.graph._PyTreeCodeGen(
                torch.fx.graph._PyTreeInfo(names[:len(self.example_inputs)], in_spec, out_spec))
            return leaves

        return fn, self._none_inputs(args, is_module)

    def _none_inputs(self, args: Any, is_module: bool) -> Any:
        """The forward's arguments with None where the example input is None (an optional
        mask not given): the forward sees what it is called with, its ``if mask is not
        None`` branches not taken; the placeholder stays, checked by the front end
        (``expect_none``)."""
        if not self.example_inputs or not isinstance(args, (list, tuple)):
            return args
        out, first = list(args), 1 if is_module else 0
        for i, x in enumerate(self.example_inputs):
            k = first + i
            if x is None and k < len(out) and isinstance(out[k], torch.fx.Proxy) and out[k].node.op == "placeholder":
                out[k] = None
        return type(args)(out) if isinstance(args, tuple) else out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.follow and isinstance(proxy, torch.fx.Proxy):
            self._follow(proxy.node)
        return proxy

    def _follow(self, node: torch.fx.Node) -> None:
        """Compute ``node``'s value on the example inputs from its inputs' values (or
        leave it unknown), and note whether it depends on shapes only."""
        values = self._values
        if node.op == "placeholder":
            k = sum(1 for n in values if n.op == "placeholder")
            x = self.example_inputs[k] if k < len(self.example_inputs) else _UNKNOWN
            values[node] = x.clone() if isinstance(x, torch.Tensor) else x  # an in-place op must not reach it
            set_meta(node, x)
            return
        if node.op == "get_attr":
            value = resolve(self.root, node.target)
            values[node] = to_meta(value) if self._on_meta and isinstance(value, torch.Tensor) else value
            set_meta(node, value)
            return
        unknown = False

        def value_of(n: torch.fx.Node) -> Any:
            nonlocal unknown
            v = values.get(n, _UNKNOWN)
            if v is _UNKNOWN:
                unknown = True
            return v

        args = torch.fx.node.map_arg(node.args, value_of)
        kwargs = torch.fx.node.map_arg(node.kwargs, value_of)
        if unknown:
            values[node] = _UNKNOWN
            return
        inputs = node.all_input_nodes
        value_shaped = _data_dependent_shape(node, args)
        if any(i in self._stand_in for i in inputs):
            if value_shaped:  # its shape would come from stand-in values
                values[node] = _UNKNOWN
                return
            self._stand_in.add(node)
        if value_shaped or any(i in self._dynamic for i in inputs):
            self._dynamic.add(node)  # its shape (or a size read from it) depends on values
        elif node.op == "call_function" and node.target is getattr and args[1] in _SHAPE_ATTRS \
                or node.op == "call_method" and node.target in _SHAPE_METHODS \
                or node.op in ("call_function", "call_method") and inputs \
                and all(i in self._shape_nodes for i in inputs):
            self._shape_nodes.add(node)
        if self._on_meta and "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("meta")}
        try:
            with torch.no_grad(), torch.device("meta") if self._on_meta else contextlib.nullcontext():
                value = values[node] = self._evaluate(node, args, kwargs)
        except Exception:  # noqa: BLE001 (a value not followed: Python that needs it fails as before)
            values[node] = _UNKNOWN
            self._shape_nodes.discard(node)
            return
        if isinstance(value, torch.Tensor):
            self._shape_nodes.discard(node)
            if not self._on_meta and value.device.type != "meta":
                self._held += value.numel() * value.element_size()
                if self._held > FOLLOW_BYTES:
                    self._to_meta()
        set_meta(node, value)  # the shape record, as shape propagation would store it

    def _to_meta(self) -> None:
        """Follow the rest of the trace on the meta device (shapes, no data): the example
        values held exceed ``FOLLOW_BYTES``."""
        self._on_meta = True
        self._shadows = {}
        for node, value in self._values.items():
            if isinstance(value, torch.Tensor):
                self._values[node] = to_meta(value)

    def _evaluate(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op in ("call_function", "call_method") and args and _in_place(node) \
                and isinstance(args[0], torch.Tensor) and id(args[0]) in (self._attr_names or ()):
            args = (args[0].clone(), *args[1:])  # the model's own tensor is never written
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            if module._modules or module._forward_hooks or module._forward_pre_hooks:
                from torch.fx._symbolic_trace import _maybe_revert_all_patches

                with _maybe_revert_all_patches():
                    return module(*args, **kwargs)
            x = args[0] if args else None
            if not self._on_meta and not kwargs and isinstance(x, torch.Tensor) and x.is_floating_point():
                # a layer whose output shape its attributes give (a linear, a conv): zeros of
                # that shape stand in for its output, as only shapes steer the trace
                shape = module_shape(module, args, kwargs)
                if shape is not None:
                    self._stand_in.add(node)
                    return x.new_zeros(shape)
            shadow = self._shadows.get(node.target)
            if shadow is None:
                shadow = self._shadows[node.target] = _shadow(module, self._on_meta)
            return type(module).forward(shadow, *args, **kwargs)
        return _UNKNOWN

    def shape_value(self, proxy: torch.fx.Proxy) -> Any:
        """The example value of ``proxy`` where Python may read it without depending on any
        tensor's values (a size, a shape, a tuple's length), else ``_UNKNOWN``."""
        if not self.follow:
            return _UNKNOWN
        value = self._values.get(proxy.node, _UNKNOWN)
        if value is _UNKNOWN:
            return _UNKNOWN
        if proxy.node in self._shape_nodes or isinstance(value, (torch.Tensor, tuple, list)):
            return value
        return _UNKNOWN

    def iter(self, obj):
        known = self.shape_value(obj)
        if known is not _UNKNOWN and not isinstance(known, (int, float, bool)):
            return (obj[i] for i in range(len(known)))
        return super().iter(obj)

    def keys(self, obj):
        value = self._values.get(obj.node, _UNKNOWN) if self.follow else _UNKNOWN
        if isinstance(value, dict):
            return list(value.keys())
        return super().keys(obj)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if kind == "get_attr" and hasattr(self, "root"):  # what it reads now: a forward may assign it later
            self._reads[node] = resolve(self.root, target)
        return set_args(node, args, kwargs)

    def create_arg(self, a):
        # the common exact types first: torch.fx's own fast path is keyed on its Proxy
        # class (ours is a subclass), and its Tracer tests every argument against
        # parameters, tensors, modules and opaque classes before reaching it
        t = type(a)
        if t is _Proxy:
            return a.node
        if t in _PLAIN_ARGS or a is None:
            return a
        if t is tuple:
            return tuple([self.create_arg(e) for e in a])
        if t is list:
            return [self.create_arg(e) for e in a]
        if t is collections.OrderedDict:
            self._ordered_keys.append(list(a))
        return super().create_arg(a)

    def call_whole_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:
            if not self.follow:
                raise
            return forward(*args, **kwargs)  # a module the model holds outside its tree (in a dict): traced through
        self._fxp_stack.append((qualname, type(m).__name__))
        try:
            return super().call_whole_module(m, forward, args, kwargs)
        finally:
            self._fxp_stack.pop()

def _in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``x.add_(y)``, ``x += y``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and (name.endswith("_") and not name.endswith("__")
                                      or name.startswith("i") and getattr(operator, name, None) is node.target)


def _shadow(module: nn.Module, on_meta: bool = False) -> nn.Module:
    """A stand-in for a leaf module whose attributes are found without
    ``nn.Module.__getattr__`` (which torch.fx patches while tracing): its forward runs on
    example values without making graph nodes (on meta tensors with ``on_meta``)."""
    shadow = copy.copy(module)
    for registry in ("_parameters", "_buffers", "_modules"):
        for k, v in getattr(module, registry).items():
            shadow.__dict__[k] = to_meta(v) if on_meta and isinstance(v, torch.Tensor) else v
    return shadow


# ops whose output shape depends on their input's values: a size read from their output is
# data, not shape (no branch may be taken on it)
_VALUE_SHAPED = frozenset({"nonzero", "nonzero_static", "masked_select", "unique", "unique_consecutive",
                           "_unique", "_unique2", "argwhere", "bincount", "histc", "repeat_interleave",
                           "masked_scatter", "tolist", "item"})


def _data_dependent_shape(node: torch.fx.Node, args: tuple) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _VALUE_SHAPED:
        return True
    if isinstance(node.target, torch._ops.OpOverload) and (
            torch.Tag.dynamic_output_shape in node.target.tags or torch.Tag.data_dependent_output in node.target.tags):
        return True
    if name == "where" and len(args) == 1:
        return True
    if node.target is operator.getitem and args and isinstance(args[0], torch.Tensor):  # x[mask]
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _trace_hint(exc: BaseException) -> str:
    msg = str(exc)
    if "records no write to a tensor's data" in msg:
        return "compute the new value and use it instead of assigning it to the tensor's .data"
    if "control flow" in msg or "iteration" in msg or "bool" in msg:
        return ("the model branches or loops on a traced value; pass concrete_args={'name': value} "
                "for inputs that select a branch, or mark the module as a leaf with leaf_modules=[...]")
    return "mark the offending module as a leaf with leaf_modules=[ModuleType or 'qualified.name'] " \
           "(its channels will be pinned) or pass concrete_args for non-tensor inputs"


def symbolic_trace(model: nn.Module, *, leaf_modules: Iterable = (),
                   concrete_args: dict[str, Any] | None = None,
                   example_inputs: tuple | None = None, careful: bool = False,
                   follow: bool = False) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the module and line on
    failure. ``example_inputs``, where given, let decompositions learn the shape and dtype
    of a traced value (``Tracer.example_meta``)."""
    tracer = Tracer(leaf_modules, example_inputs, careful, follow)
    # the model is left as it was, also without the tensor constants torch.fx puts on it
    # (the GraphModule built here copies them first) and with the parameters, buffers and
    # submodules it had before the forward ran (restored before the GraphModule is built)
    with state_restored(model) as registered:
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises many exception types; we re-type them here
            stack = tracer._fxp_stack
            in_module = f" in module '{stack[-1][0]}' ({stack[-1][1]})" if stack else ""
            where = user_frame(sys.exc_info()[2])
            at = f" at {where}" if where else ""
            raise TraceError(
                f"could not trace {type(model).__name__}{in_module}{at}: {type(exc).__name__}: {exc}"
                f"{_assignments_note(registered.changes())}. Fix: {_trace_hint(exc)}."
            ) from exc
        tracer.settle_assignments(graph, registered, type(model).__name__)
        if concrete_args:
            _inline_concrete_args(graph, model, concrete_args)
        gm = graph_module(tracer.root, graph, type(model).__name__)
        own_written_buffers(gm, model)
        return gm


def _assignments_note(changes: list[tuple[str, str, Any, Any]]) -> str:
    """What a failed trace's forward assigned of the model's parameters, buffers and
    submodules, for the error message ('' when nothing)."""
    kinds = {"_parameters": "parameter", "_buffers": "buffer", "_modules": "submodule"}
    said = ", ".join(f"{kinds[kind]} '{name}'" for name, kind, _, _ in changes)
    if not said:
        return ""
    modules = "; torch.fx calls only the submodules the model held when the trace began, " \
        "frontend='export' captures such a forward" if any(kind == "_modules" for _, kind, _, _ in changes) else ""
    return f" (the forward assigned {said} during the trace{modules})"

def _inline_concrete_args(graph: torch.fx.Graph, model: nn.Module, concrete_args: dict) -> None:
    """Placeholders of specialized arguments become constants: the graph takes only the
    remaining inputs."""
    import inspect

    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name not in concrete_args:
            continue
        value = concrete_args[name]
        for user in list(node.users):
            swap = lambda a: value if a is node else a  # noqa: E731
            user.args = torch.fx.node.map_aggregate(user.args, swap)
            user.kwargs = torch.fx.node.map_aggregate(user.kwargs, swap)
        graph.erase_node(node)
