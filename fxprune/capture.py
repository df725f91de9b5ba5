"""Capture: a model and example inputs become a torch.fx GraphModule whose
every node carries its shape (``fxprune.meta``).

Shapes are computed on the ``meta`` device (no real FLOPs, no activations
allocated); when an op does not support meta tensors, under a FakeTensorMode;
and only as a last resort with the real example inputs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import linecache
import operator
from dataclasses import dataclass
import sys
import traceback
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._util import as_tuple, mutable_args
from . import hf
from .decompose import decomposition
from .errors import InputError, TraceError
from .meta import FRONTEND_KEY, LIFTED_KEY, TensorMeta, copy_pytree_specs, get_meta, set_meta, tensor_meta
from .rules.context import get_tensor
from .passes_base import Pass, PruneState, register_pass


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


class _OrderedDictOutput(torch.fx.graph.CodeGen):
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


class _Tracer(torch.fx.Tracer):
    """A symbolic tracer with extra leaf modules that remembers the module stack,
    so a failure can name the module being traced."""

    def __init__(self, leaf_modules: Iterable = (), example_inputs: tuple | None = None, careful: bool = False):
        super().__init__()
        # decompositions may read ranks on the example inputs where a cheaper guess usually
        # holds (an attention query is batched): a retrace after that guess failed
        self.careful = careful and example_inputs is not None
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes become graph nodes
        self.example_inputs = example_inputs
        self._example_metas: dict[torch.fx.Node, TensorMeta | None] = {}
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
        try:
            graph = super().trace(root, concrete_args)
        finally:
            self._instructions = {}
        for n in reversed(list(graph.nodes)):  # what only a static branch condition used
            if n in self._static and not n.users and n.op in ("call_function", "call_method", "get_attr"):
                graph.erase_node(n)
        out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
        if out is not None and isinstance(out.args[0], dict) and list(out.args[0]) in self._ordered_keys \
                and type(graph._codegen) is torch.fx.graph.CodeGen:
            graph._codegen = _OrderedDictOutput()  # the model returned an OrderedDict
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

    def example_meta(self, value: Any) -> TensorMeta | None:
        """Shape and dtype of a traced value on the example inputs, or None where they are
        not known (no example inputs, or a value that cannot be computed from them alone).
        A decomposition whose ops depend on them (an attention mask's rank and dtype) asks
        here instead of branching on a Proxy: the nodes the value depends on are run once,
        on the meta device."""
        if not isinstance(value, torch.fx.Proxy) or self.example_inputs is None:
            return None
        node = value.node
        if node not in self._example_metas:
            self._example_metas[node] = self._run_to(node)
        return self._example_metas[node]

    def _run_to(self, target: torch.fx.Node) -> TensorMeta | None:
        need = _ancestors(target)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        inputs = set(placeholders[:len(self.example_inputs)])
        if len(inputs) < len(self.example_inputs) or any(n in need for n in placeholders[len(inputs):]):
            return None  # depends on an argument specialized by concrete_args
        try:
            out = self._run_on_meta(target, need | inputs, [_to_meta(t) for t in self.example_inputs])
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
                if read is _ABSENT:
                    env[n] = graph.node_copy(n, env.__getitem__)
                else:
                    env[n] = graph.placeholder(n.name)
                    reads.append(_to_meta(read))
            if n is target:
                break
        graph.output(env[target])
        # the trace patches nn.Module.__call__ (and wrapped functions) while it runs:
        # running modules here needs them as they are
        unpatched = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", contextlib.nullcontext)
        with torch.no_grad(), unpatched():
            return _MetaProp(torch.fx.GraphModule(self.root, graph), on_meta=True).run(*inputs, *reads)

    def stale_read(self, node: torch.fx.Node) -> Any:
        """What the get_attr ``node`` read when the model no longer holds it under the node's
        target (a forward assigned the attribute since, or the capture restored it), else
        ``_ABSENT``."""
        read = self._reads.get(node, _ABSENT) if node.op == "get_attr" else _ABSENT
        return _ABSENT if read is _ABSENT or read is _resolve(self.root, node.target) else read

    def settle_assignments(self, graph: torch.fx.Graph, registered: "_Registered", model_name: str) -> None:
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
                what = "removes" if now is _ABSENT or now is None else "assigns"
                raise TraceError(f"could not trace {model_name}: its forward {what} parameter '{name}', which a "
                                 f"captured graph cannot keep. Fix: compute the value in forward without "
                                 f"storing it on the module")
            if kind != "_buffers" or before is _ABSENT or before is None:
                continue
            if now is _ABSENT or now is None:
                raise TraceError(f"could not trace {model_name}: its forward removes buffer '{name}', which a "
                                 f"captured graph cannot keep. Fix: keep the buffer and compute the value "
                                 f"without storing it")
            writes.append((name, before, now))
        for node in list(graph.nodes):  # reads of tensors the model no longer holds there
            read = self.stale_read(node)
            if read is _ABSENT:
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
                value, meta = now.node, self._run_to(now.node)
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
        need = _ancestors(obj.node)
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

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if kind == "get_attr" and hasattr(self, "root"):  # what it reads now: a forward may assign it later
            self._reads[node] = _resolve(self.root, target)
        return _set_args(node, args, kwargs)

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

    def call_module(self, m, forward, args, kwargs):
        replacement = decomposition(m, kwargs)
        if replacement is not None and not self.is_leaf_user(m, self.path_of_module(m)):
            return replacement(m, *args, **kwargs)  # traced through, made analyzable
        qualname = self.path_of_module(m)
        self._fxp_stack.append((qualname, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._fxp_stack.pop()


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_CONTAINERS = (dict, list, set, collections.OrderedDict)
_REGISTRIES = ("_parameters", "_buffers", "_modules")
_ABSENT = object()  # an entry a module does not have


class _Registered:
    """The parameters, buffers and submodules of every module of a model, as a capture
    found them, and the data each parameter and buffer holds (references and aliases: no
    tensor is copied)."""

    def __init__(self, model: nn.Module):
        self.saved = [(name, m, {k: (m.__dict__[k], dict(m.__dict__[k])) for k in _REGISTRIES},
                       (m._non_persistent_buffers_set, set(m._non_persistent_buffers_set)))
                      for name, m in model.named_modules()]
        tensors = {id(t): t for m in model.modules() for registry in ("_parameters", "_buffers")
                   for t in m.__dict__[registry].values() if isinstance(t, torch.Tensor)}
        self.data = [(t, t.data) for t in tensors.values()]

    def changes(self) -> list[tuple[str, str, Any, Any]]:
        """(qualified name, registry, value before, value now) of each entry a forward
        assigned since, added (before: ``_ABSENT``) or removed (now: ``_ABSENT``)."""
        out = []
        for prefix, m, registries, _ in self.saved:
            for kind, (_, before) in registries.items():
                now = m.__dict__[kind]
                for k in dict.fromkeys([*before, *now]):
                    old, new = before.get(k, _ABSENT), now.get(k, _ABSENT)
                    if old is not new:
                        out.append((f"{prefix}.{k}" if prefix else k, kind, old, new))
        return out

    def restore(self) -> None:
        """Put every saved entry back, in the dicts the modules had."""
        for _, m, registries, (nonpersistent, names) in self.saved:
            for kind, (box, before) in registries.items():
                box.clear()
                box.update(before)
                m.__dict__[kind] = box
            nonpersistent.clear()
            nonpersistent.update(names)
            m.__dict__["_non_persistent_buffers_set"] = nonpersistent
        for t, data in self.data:  # ``t.data = ...`` in an eager forward
            if not _same_data(t.data, data):
                t.data = data


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same data the same way (True where that cannot be
    told: a layout without strides)."""
    if (a.dtype, a.shape, a.device, a.layout) != (b.dtype, b.shape, b.device, b.layout):
        return False
    try:
        return a.stride() == b.stride() and a.storage_offset() == b.storage_offset() and a.data_ptr() == b.data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other layouts
        return True


@contextlib.contextmanager
def _state_restored(model: nn.Module):
    """Undo what a forward run during capture leaves on the model's modules: attributes
    it sets, caches it fills (timm's LeViT keeps its attention biases in a dict keyed by
    device: a trace left a Proxy there, and the user's model no longer pickled), the
    parameters, buffers and submodules it assigns or registers (a rotary cache refreshed in
    forward, ``self.table = self.table * 1.0``: they would hold a Proxy or a fake tensor),
    and the data it assigns them (``self.w.data = ...``, run eagerly). Yields the
    :class:`_Registered` state, whose ``restore()`` puts those back before the context ends."""
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
        saved.append((m, attrs, {k: copy.copy(v) for k, v in attrs.items() if type(v) in _CONTAINERS}))
    registered = _Registered(model)
    try:
        yield registered
    finally:
        registered.restore()
        for m, attrs, contents in saved:
            d = m.__dict__
            for k in [k for k in d if k not in _MODULE_INTERNALS and k not in attrs]:
                del d[k]  # set during the capture
            d.update(attrs)
            for k, old in contents.items():  # refilled in place: the container may be shared
                box = attrs[k]
                box.clear()
                if isinstance(box, list):
                    box.extend(old)
                else:
                    box.update(old)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and every node it depends on."""
    need, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    return need


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch itself, as 'file:line: code'."""
    where = ""
    for frame in traceback.extract_tb(tb):
        fname = frame.filename.replace("\\", "/")
        if "/torch/" in fname or "/fxprune/" in fname:
            continue
        code = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        where = f"{frame.filename}:{frame.lineno}: {code}"
    return where


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
                   example_inputs: tuple | None = None, careful: bool = False) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the module and line on
    failure. ``example_inputs``, where given, let decompositions learn the shape and dtype
    of a traced value (``_Tracer.example_meta``)."""
    tracer = _Tracer(leaf_modules, example_inputs, careful)
    # the model is left as it was, also without the tensor constants torch.fx puts on it
    # (the GraphModule built here copies them first) and with the parameters, buffers and
    # submodules it had before the forward ran (restored before the GraphModule is built)
    with _state_restored(model) as registered:
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises many exception types; we re-type them here
            stack = tracer._fxp_stack
            in_module = f" in module '{stack[-1][0]}' ({stack[-1][1]})" if stack else ""
            where = _user_frame(sys.exc_info()[2])
            at = f" at {where}" if where else ""
            raise TraceError(
                f"could not trace {type(model).__name__}{in_module}{at}: {type(exc).__name__}: {exc}"
                f"{_assignments_note(registered.changes())}. Fix: {_trace_hint(exc)}."
            ) from exc
        tracer.settle_assignments(graph, registered, type(model).__name__)
        if concrete_args:
            _inline_concrete_args(graph, model, concrete_args)
        gm = _graph_module(tracer.root, graph, type(model).__name__)
        _own_written_buffers(gm, model)
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


def _resolve(root: nn.Module, target: str) -> Any:
    """The object ``target`` names under ``root`` now (``_ABSENT`` if none), read from the
    modules' own dicts: the symbolic trace patches ``nn.Module.__getattr__``."""
    obj: Any = root
    for atom in target.split("."):
        if isinstance(obj, nn.Module):
            d = obj.__dict__
            if atom in d:
                obj = d[atom]
                continue
            for registry in _REGISTRIES:
                if atom in d[registry]:
                    obj = d[registry][atom]
                    break
            else:
                return _ABSENT
        else:
            obj = getattr(obj, atom, _ABSENT)
            if obj is _ABSENT:
                return _ABSENT
    return obj


def _buffer_writes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The in-place copies into an attribute of ``gm`` (a forward's buffer assignment as
    the symbolic trace and torch.export keep it): (the copy, the get_attr node it writes)."""
    out = []
    for n in gm.graph.nodes:
        if (n.op == "call_method" and n.target == "copy_") or \
                (n.op == "call_function" and n.target is torch.ops.aten.copy_.default):
            dst = n.args[0] if n.args else None
            if isinstance(dst, torch.fx.Node) and dst.op == "get_attr":
                out.append((n, dst))
    return out


def _own_written_buffers(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` its own copy of each buffer its graph writes: a GraphModule shares the
    model's tensors (and its called submodules), and running the captured graph (as the
    oracle does) must not write into the user's model."""
    user = {id(m) for m in model.modules()}
    for _, node in _buffer_writes(gm):
        *path, name = node.target.split(".")
        owner: nn.Module = gm
        for atom in path:
            child = owner._modules.get(atom)
            if child is None:
                break
            if id(child) in user:  # the user's module itself: a shallow copy holds the copy
                child = copy.copy(child)
                for registry in (*_REGISTRIES, "_non_persistent_buffers_set"):
                    child.__dict__[registry] = copy.copy(child.__dict__[registry])
                owner._modules[atom] = child
            owner = child
        else:
            if owner._buffers.get(name) is not None:
                owner._buffers[name] = owner._buffers[name].clone()


def _graph_module(root: Any, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is generated when first needed (its forward is
    called or its code read): the analysis and the rewrite only read the graph, so a
    prune does not pay for compiling the captured model's source."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # an older torch: compiled right away
        return torch.fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


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


class _MetaProp(torch.fx.Interpreter):
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
        shape = _module_shape(module, args, kwargs)
        if shape is not None:  # the shape is known from the module's attributes: no kernel
            kind = _COUNTED_MODULES.get(type(module))
            if kind is not None:
                self.skipped(kind, args, shape, module)
            return torch.empty(shape, dtype=args[0].dtype, device="meta")
        got = _recurrent_outputs(module, args, kwargs)
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
        return _to_meta(value) if self.on_meta else value

    def call_function(self, target, args, kwargs):
        if self.on_meta and "device" in kwargs:  # exported graphs name the capture's device
            kwargs = {**kwargs, "device": torch.device("meta")}
        if self.on_meta:
            got = _function_shape(target, args, kwargs)
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
            raise _NodeFailure(n, exc) from exc
        set_meta(n, result)
        return result


def _may_make_tensors(n: torch.fx.Node) -> bool:
    """Whether running ``n`` may create a tensor on the default device: a function or
    method none of whose inputs is a tensor (a module's forward, which may too, is run
    under the meta device by ``_MetaProp.call_module`` where no shortcut applies)."""
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


def _module_shape(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
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


def _recurrent_outputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
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


# shortcut layers whose kernels a FLOP counter counts (see _MetaProp.skipped)
_COUNTED_MODULES = {nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.Linear: "linear"}


_BINARY = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
# elementwise functions of one tensor (the other arguments are flags and constants)
_UNARY = frozenset({F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
                    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, torch.sigmoid, F.tanh,
                    torch.tanh, torch.exp, torch.neg, torch.abs, F.dropout, F.dropout1d, F.dropout2d,
                    F.dropout3d, F.alpha_dropout})


def _function_shape(target: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], torch.dtype] | None:
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
    shadow._parameters = {k: None if v is None else nn.Parameter(_to_meta(v), v.requires_grad)
                          for k, v in module._parameters.items()}
    shadow._buffers = {k: _to_meta(v) for k, v in module._buffers.items()}
    shadow._modules = {k: None if v is None else _meta_shadow(v) for k, v in module._modules.items()}
    return shadow


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return torch.empty_like(value, device="meta")
    return value


class _NodeFailure(Exception):
    def __init__(self, node: torch.fx.Node, exc: BaseException):
        super().__init__(str(exc))
        self.node = node
        self.exc = exc


def _lift_parameter_placeholders(gm: torch.fx.GraphModule, inputs: tuple) -> tuple:
    """Placeholders fed with ``nn.Parameter`` values (a torch.compile graph) become get_attr
    constants of the GraphModule, so they are sliceable like any other parameter."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return inputs
    kept, lifted = [], []
    for i, (node, value) in enumerate(zip(placeholders, inputs)):
        if isinstance(value, nn.Parameter):
            name = f"_lifted_param_{i}"
            gm.register_parameter(name, value)
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(name)
            node.replace_all_uses_with(attr)
            attr.meta.update(node.meta)
            gm.graph.erase_node(node)
            lifted.append(i)
        else:
            kept.append(value)
    gm.recompile()
    gm.meta[LIFTED_KEY] = tuple(lifted)
    return tuple(kept)


def propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple, *, fake: bool = True) -> str:
    """Store the shape of every node of ``gm`` run on ``inputs``; return the mode that
    worked: 'meta' (shapes only), 'fake' (FakeTensorMode) or 'real' (the example inputs)."""
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_ph != len(inputs):
        raise InputError(f"the model takes {n_ph} positional input(s) but {len(inputs)} example "
                         f"input(s) were given; pass a tuple with one example per input")
    modes = ["meta", "fake", "real"] if fake else ["real"]
    last: _NodeFailure | None = None
    for mode in modes:
        try:
            with torch.no_grad():
                if mode == "meta":
                    _MetaProp(gm, on_meta=True).run(*(_to_meta(t) for t in inputs))
                elif mode == "fake":
                    from torch._subclasses.fake_tensor import FakeTensorMode
                    fmode = FakeTensorMode(allow_non_fake_inputs=True)
                    fin = tuple(fmode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
                    with fmode:
                        _MetaProp(gm).run(*fin)
                else:
                    _MetaProp(gm).run(*inputs)
            return mode
        except _NodeFailure as failure:
            last = failure
    assert last is not None
    node = last.node
    raise InputError(
        f"the example inputs do not fit the model: running node {node.format_node()} failed with "
        f"{type(last.exc).__name__}: {last.exc}. Fix: pass example inputs of the shape and dtype "
        f"the model expects (got {[tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in inputs]})"
    ) from last.exc


FRONTENDS = ("auto", "fx", "export")


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable = (),
          concrete_args: dict[str, Any] | None = None, frontend: str = "auto") -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule with shape metadata on every node.

    The front end used is in ``gm.meta["fxprune_frontend"]``: ``"fx"`` (symbolic tracing,
    module calls kept) or ``"export"`` (non-strict ``torch.export``, ATen ops).

    Parameters
    ----------
    model : nn.Module or torch.fx.GraphModule
        The network. A GraphModule is used as it is (copied, never modified);
        placeholders fed with ``nn.Parameter`` values become sliceable constants.
    example_inputs : Tensor or tuple
        Positional example inputs.
    leaf_modules : iterable of module types, qualified names or module objects
        Modules to keep opaque (they are pinned unless a rule knows them).
    concrete_args : dict, optional
        Passed to ``torch.fx.Tracer.trace`` to specialize non-tensor inputs.
    frontend : "auto", "fx" or "export"
        ``"auto"`` traces symbolically and uses ``torch.export`` instead when tracing fails
        (Hugging Face models, Python that branches on sizes) or leaves calls of Python
        functions no rule knows (``torch.fx.wrap``'ed helpers); the others force one.

    Examples
    --------
    >>> import torch
    >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
    >>> from fxprune.meta import tensor_meta
    >>> tensor_meta(list(gm.graph.nodes)[1]).shape
    (1, 4, 6, 6)
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or GraphModule, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise InputError(f"frontend={frontend!r} is not one of {', '.join(FRONTENDS)}")
    inputs = as_tuple(example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(model, _copy_graph(model.graph), type(model).__name__)
        copy_pytree_specs(model, gm)
        inputs = _lift_parameter_placeholders(gm, inputs)
        propagate_shapes(gm, inputs)
        gm.meta[FRONTEND_KEY] = "graph"
        return gm
    with hf.capture_settings(model) as notes:  # a Hugging Face model: use_cache=False, noted
        gm = _trace_module(model, inputs, leaf_modules, concrete_args, frontend)
    if notes:
        gm.meta[hf.NOTES_KEY] = tuple(notes)
    return gm


def _trace_module(model: nn.Module, inputs: tuple, leaf_modules: Iterable, concrete_args: dict[str, Any] | None,
                  frontend: str) -> torch.fx.GraphModule:
    """:func:`trace` of a module that is no GraphModule."""
    if frontend == "export":
        return _export(model, inputs)
    user_concrete = concrete_args
    if concrete_args is None:
        concrete_args = _unpassed_defaults(model, len(inputs)) or None
    try:
        gm = symbolic_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                            example_inputs=inputs)
    except TraceError as fx_error:
        if frontend == "fx" or user_concrete:
            raise
        try:
            return _export(model, inputs)
        except TraceError as export_error:
            _runs_eagerly(model, inputs)  # neither captures: is it the model?
            raise TraceError(f"{fx_error}\nThe torch.export fallback failed too: {export_error}\nA model "
                             f"whose data-dependent part (a detector's box decoding and NMS, a sampling "
                             f"loop) captures in neither can often be pruned in parts: prune a traceable "
                             f"submodule (model.backbone, the heads) and put it back") from fx_error
    try:
        propagate_shapes(gm, inputs)
    except InputError as shape_error:
        # the symbolic trace may have assumed what the inputs do not hold (a decomposition
        # written for batched inputs given an unbatched one): traced again reading ranks on
        # the example inputs, else export runs the model itself; where neither runs, the
        # inputs are what is wrong
        n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        gm = _careful_retrace(model, inputs, leaf_modules, concrete_args)
        if gm is None and (frontend == "fx" or user_concrete or leaf_modules):
            raise InputError(f"{shape_error} (if the model itself runs on these inputs, the symbolic trace "
                             f"assumed what they do not hold: frontend='export' captures by running the "
                             f"model)") from shape_error
        if gm is None:
            try:
                return _export(model, inputs)
            except TraceError:
                if n_placeholders != len(inputs):  # the graph's inputs were not the model's
                    _runs_eagerly(model, inputs)
                raise shape_error from None
    gm.meta[FRONTEND_KEY] = "fx"
    if frontend == "auto" and not user_concrete and not leaf_modules and opaque_calls(gm):
        # tracing kept Python functions as single calls (torch.fx.wrap'ed helpers such as
        # Swin's window attention) that no rule knows; export sees through them
        try:
            return _export(model, inputs)
        except TraceError:
            pass
    return gm


def _runs_eagerly(model: nn.Module, inputs: tuple) -> None:
    """Raise an InputError saying so when ``model`` itself fails on ``inputs`` (the last
    check when no capture ran: then no graph is to blame)."""
    try:
        with torch.no_grad(), _state_restored(model):
            model(*inputs)
    except Exception as exc:
        if isinstance(exc, TypeError) and "argument" in str(exc):
            return  # a call with the wrong arguments: the caller's input-count message says it better
        raise InputError(f"the model itself does not run on the example inputs: {type(exc).__name__}: {exc}. "
                         f"Fix: pass inputs the model accepts (and check its configuration)") from exc


def _careful_retrace(model, inputs, leaf_modules, concrete_args) -> torch.fx.GraphModule | None:
    """The symbolic trace again with ranks read on the example inputs (``_Tracer.careful``),
    shapes propagated; None where that does not run either."""
    try:
        gm = symbolic_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                            example_inputs=inputs, careful=True)
        propagate_shapes(gm, inputs)
    except (TraceError, InputError):
        return None
    return gm


def _unpassed_defaults(model: nn.Module, n_given: int) -> dict[str, Any]:
    """Optional arguments of ``forward`` after the ``n_given`` example inputs
    (``forward(x, attn_mask=None)``): traced at their defaults, as calling the model with
    the example inputs does, instead of becoming graph inputs."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[n_given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            return {}  # a required input was not given: let the input check say so
        out[p.name] = p.default
    return out


def opaque_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Calls of plain Python functions (not torch ops) that no rule knows and that take
    tensors: their channels would be pinned."""
    from .meta import tensor_meta
    from .rules import lookup

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, types.FunctionType):
            continue
        module = getattr(node.target, "__module__", "") or ""
        if module in ("torch", "_operator", "operator") or module.startswith("torch."):
            continue
        if lookup(node, gm) is None and any(tensor_meta(i) is not None for i in node.all_input_nodes):
            found.append(node)
    return found


def _export(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    gm = export_capture(model, inputs)
    gm.meta[FRONTEND_KEY] = "export"
    return gm


def _set_args(node: torch.fx.Node, args: tuple, kwargs: dict) -> torch.fx.Node:
    """Give a node made without arguments its arguments. ``Graph.create_node`` walks every
    argument with pytree to warn about symbolic ints, a third of its cost; captured
    shapes are concrete, so fxprune creates nodes bare and sets the arguments after."""
    if args:
        node.args = args
    if kwargs:
        node.kwargs = kwargs
    return node


def copy_node(graph: torch.fx.Graph, node: torch.fx.Node, arg_transform) -> torch.fx.Node:
    """``graph.node_copy(node, arg_transform)`` without that walk (:func:`_set_args`)."""
    new = graph.create_node(node.op, node.target, (), {}, node.name, node.type)
    new.meta = copy.copy(node.meta)
    return _set_args(new, torch.fx.node.map_arg(node.args, arg_transform),
                     torch.fx.node.map_arg(node.kwargs, arg_transform))


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)  # pytree in/out handling of exported graphs
    return new


# ops of an exported graph that only check things at run time (guards, metadata asserts)
_CHECKS = ("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
           "sym_constrain_range_for_size", "_guards_fn")


def _inline_scopes(root: nn.Module, graph: torch.fx.Graph) -> None:
    """Higher-order ops that run a subgraph under a mode (a ``with torch.autocast(...)``
    or ``with torch.no_grad()`` block inside ``forward``) become the subgraph's ops in
    line, between calls that enter and leave the mode: every op gets its own rule, and the
    pruned model still runs the block under the mode."""
    hop = getattr(torch.ops, "higher_order", None)
    autocast = getattr(hop, "wrap_with_autocast", None)
    grad_mode = getattr(hop, "wrap_with_set_grad_enabled", None)
    scopes = {t for t in (autocast, grad_mode) if t is not None}
    todo = [n for n in graph.nodes if n.op == "call_function" and n.target in scopes]
    while todo:
        node = todo.pop()
        n_mode = 4 if node.target is autocast else 1
        body_node, operands = node.args[n_mode], node.args[n_mode + 1:]
        if body_node.op != "get_attr" or any(
                u.target is not operator.getitem or not isinstance(u.args[1], int) for u in node.users):
            continue
        with graph.inserting_before(node):
            if node.target is autocast:
                enter = graph.call_function(torch.amp.autocast_mode._enter_autocast, node.args[:n_mode])
                set_mode = enter
            else:  # the mode it had, to restore
                enter = graph.call_function(torch.is_grad_enabled)
                enter.meta["val"] = torch.is_grad_enabled()
                set_mode = graph.call_function(torch._C._set_grad_enabled, node.args[:1])
            outs, copied = _inline_body(graph, root.get_submodule(body_node.target), body_node.target, operands)
            leave = graph.call_function(torch.amp.autocast_mode._exit_autocast if node.target is autocast
                                        else torch._C._set_grad_enabled, (enter,))
        set_mode.meta["val"] = leave.meta["val"] = None  # an autocast state, or nothing: no shape
        todo += [n for n in copied if n.op == "call_function" and n.target in scopes]  # a block in the block
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)


def _inline_body(graph: torch.fx.Graph, body: torch.fx.GraphModule, prefix: str,
                 operands: tuple) -> tuple[tuple, list[torch.fx.Node]]:
    """Copy ``body``'s ops into ``graph`` at its insertion point, its placeholders bound to
    ``operands`` and its attributes named under ``prefix``: (its outputs, the new nodes)."""
    env: dict[torch.fx.Node, Any] = {}
    inputs = iter(operands)
    outs: Any = ()
    for n in body.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(inputs)
        elif n.op == "output":
            outs = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
        else:
            new = env[n] = copy_node(graph, n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                new.target = f"{prefix}.{n.target}"
    copied = [v for k, v in env.items() if k.op != "placeholder"]
    return (outs if isinstance(outs, (tuple, list)) else (outs,)), copied


def _dynamic_dims(t: Any) -> dict | None:
    """The dims of an example input that may stay symbolic: the batch dim, and every dim of
    an integer input (token ids: batch and sequence length). Spatial dims of images stay
    static (symbolic image sizes make Swin's export 90x slower)."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return None
    auto = torch.export.Dim.AUTO
    if t.is_floating_point() or t.is_complex():
        return {0: auto}
    return {d: auto for d in range(t.ndim)}


def _export_program(model: nn.Module, inputs: tuple):
    """Non-strict export with the batch dim and token-id dims free to stay symbolic
    (``Dim.AUTO``: a language model's batch and sequence length stay dynamic, so the pruned
    model takes other shapes too; dims the model fixes are specialized); static shapes
    when that fails. Returns the program and the (module, name) of each buffer the
    forward assigned while it ran."""
    dynamic = tuple(_dynamic_dims(t) for t in inputs)
    assigned: list[tuple[nn.Module, str]] = []
    register = getattr(nn.modules.module, "register_module_buffer_registration_hook", None)
    hook = register(lambda m, name, value: assigned.append((m, name))) if register else None
    try:
        with torch.no_grad(), _state_restored(model):
            try:
                return torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False), assigned
            except Exception:  # a model that only exports at the example shapes
                assigned.clear()
                return torch.export.export(model, inputs, strict=False), assigned
    finally:
        if hook is not None:
            hook.remove()


def _check_buffer_assignments(gm: torch.fx.GraphModule, model: nn.Module,
                              assigned: list[tuple[nn.Module, str]]) -> None:
    """Raise a TraceError where torch.export did not keep a buffer assignment of the
    forward faithfully: it keeps those of the model's own buffers as in-place copies at
    the end of the graph (a value of another shape or dtype than the buffer's would be
    broadcast or cast), and drops those of a submodule's buffers. (A buffer the forward
    adds is dropped, as a plain attribute it sets is, under both front ends.)"""
    names = {id(m): n for n, m in model.named_modules()}
    for m, name in assigned:
        prefix = names.get(id(m))
        if prefix and m._buffers.get(name) is not None:  # a submodule's own (restored) buffer
            raise TraceError(f"torch.export could not capture {type(model).__name__} faithfully: its forward "
                             f"assigns buffer '{prefix}.{name}' of a submodule, an assignment torch.export "
                             f"does not keep (it keeps those of the model's own buffers). Fix: use "
                             f"frontend='fx', or compute the value without storing it")
    own = {name for m, name in assigned if m is model}
    for write, dst in _buffer_writes(gm):
        if dst.target not in own:
            continue
        held, got = tensor_meta(dst), tensor_meta(write.args[1]) if len(write.args) > 1 else None
        if held is not None and got != held:
            what = f"a tensor of shape {got.shape} and dtype {got.dtype}" if got is not None else "a value"
            raise TraceError(f"torch.export could not capture {type(model).__name__} faithfully: its forward "
                             f"assigns buffer '{dst.target}' {what}, and the model holds one of shape "
                             f"{held.shape} and dtype {held.dtype}; torch.export keeps the assignment as an "
                             f"in-place copy, which needs both to match. Fix: register the buffer with the "
                             f"shape and dtype the forward gives it, or compute the value without storing it")


def export_capture(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """Capture ``model`` with non-strict ``torch.export``: an ATen-level graph whose
    shapes come from the export itself. Input dims the model does not fix stay symbolic
    (see :func:`_dynamic_dims`; shape ops read them with ``sym_size`` at run time). The
    graph takes and returns what the model does (pytree in/out specs kept); run-time
    checks are dropped."""
    try:
        program, assigned = _export_program(model, inputs)
    except Exception as exc:  # export raises many types; one typed error here
        where = _user_frame(sys.exc_info()[2])
        at = f" at {where}" if where else ""
        raise TraceError(f"torch.export could not capture {type(model).__name__}{at}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                         f"Fix: make the failing code export-friendly or mark it as a leaf module "
                         f"and use frontend='fx'.") from exc
    exported = program.module()
    graph = _copy_graph(exported.graph)
    _inline_scopes(exported, graph)
    for node in reversed(list(graph.nodes)):
        name = node.target if node.op == "call_module" else getattr(node.target, "__name__", "")
        if not node.users and name.split(".")[0] in _CHECKS:
            graph.erase_node(node)
    gm = torch.fx.GraphModule(exported, graph, type(model).__name__)
    copy_pytree_specs(exported, gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            set_meta(node, get_tensor(gm, node.target))
        elif "val" in node.meta:
            set_meta(node, node.meta["val"])
        elif node.op != "output":
            propagate_shapes(gm, inputs)  # a node export left without a value: run the graph
            break
    _check_buffer_assignments(gm, model, assigned)
    _own_written_buffers(gm, model)
    return gm


@register_pass
@dataclass(frozen=True)
class Capture(Pass):
    """Trace ``state.model`` on ``state.example_inputs`` into ``state.gm``."""

    name = "capture"
    requires = ("model",)
    produces = ("gm",)
    leaf_modules: tuple = ()
    concrete_args: Any = None
    frontend: str = "auto"

    def run(self, state: PruneState) -> PruneState:
        gm = trace(state.model, state.example_inputs, leaf_modules=self.leaf_modules,
                   concrete_args=self.concrete_args, frontend=self.frontend)
        return state.replace(gm=gm, frontend=gm.meta[FRONTEND_KEY])
