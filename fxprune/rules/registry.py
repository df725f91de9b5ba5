"""The op-rule registry: op semantics as data, one op spec per op.

An :class:`OpSpec` holds everything fxprune knows about an op: its analysis rule,
its rewrite hook, its shape shortcut and FLOP count (used by capture's shape
propagation, ``fxprune.capture.shapes``, and the MAC count, ``fxprune.budget``), and
the keys it is registered under. A family file under ``fxprune/rules/`` declares it
with one call::

    register(nn.Conv2d, F.conv2d, *aten_ops("conv2d"), rewrite=rewrite_conv,
             shape=conv_shape, flops=conv_flops)(conv)

A spec is keyed by what a node calls: a ``call_function`` target (a Python
callable or an ATen ``OpOverload``/``OpOverloadPacket``, so a ``torch.export``
graph uses the same table), a module type for ``call_module`` (exact type: a
subclass with its own ``forward`` is not guessed at), or a method name for
``call_method``. Registering a key twice is an error. A node with no rule gets
the conservative barrier in the analysis (its channels are pinned, the reason
recorded).

ATen ops can also be described by what their schema's tags say: a rule registered
for a ``torch.Tag`` (``register_tag``) serves every overload that carries the tag
and has no rule of its own (``Tag.pointwise``: elementwise with broadcasting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx

from .context import attr_target, get_module


ShapeFn = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
"""A shape shortcut: ``shape(op, args, kwargs)`` with ``op`` the module (a
``call_module`` node) or the target (a ``call_function`` node) and the arguments as
meta tensors; returns the output as meta tensors (the op's kernel is not run), or
None where anything is unusual (the kernel then runs and raises its own error)."""

FlopsFn = Callable[[Any, tuple[Any, ...], Any], int]
"""A FLOP count: ``flops(op, args, out)``, what ``torch.utils.flop_counter`` would have
counted for the kernels a shape shortcut skipped (``out``: what the shortcut returned)."""


@dataclass(frozen=True)
class OpSpec:
    """Everything fxprune knows about one op, declared in its family file:

    - ``analyze(ctx, node)``: how the op relates channel labels (the rule);
    - ``rewrite(r, old, new)``: how its copied node or module is updated once channels
      are removed (ops carrying sizes that pruning changes), or None;
    - ``shape``: a shape shortcut (:data:`ShapeFn`), or None: the kernel runs on meta;
    - ``flops``: what the kernels skipped by ``shape`` would have counted
      (:data:`FlopsFn`), or None: nothing the FLOP counter counts was skipped;
    - ``keys``: every key it is registered under (functions, ATen packets, module types,
      method names, tags, custom ops' qualified names)."""

    name: str
    analyze: Callable[..., Any]
    rewrite: Callable[..., None] | None = None
    shape: ShapeFn | None = None
    flops: FlopsFn | None = None
    keys: tuple[Any, ...] = ()


Rule = OpSpec  # the name the analysis and the rewrite use for a registry entry


_FUNCTIONS: dict[Any, OpSpec] = {}
_MODULES: dict[type, OpSpec] = {}
_METHODS: dict[str, OpSpec] = {}
_TAGS: dict[Any, OpSpec] = {}
_OP_NAMES: dict[str, OpSpec] = {}  # custom ops by qualified name ("transformers::grouped_mm_fallback")

_F = TypeVar("_F", bound=Callable[..., Any])


def _table_for(key: Any) -> dict[Any, OpSpec]:
    if isinstance(key, str):
        return _METHODS
    if isinstance(key, type) and issubclass(key, torch.nn.Module):
        return _MODULES
    if callable(key) or isinstance(key, torch._ops.OpOverloadPacket):
        return _FUNCTIONS
    raise TypeError(f"cannot register a rule for {key!r}: not a method name, module type or callable")


def _registrar(keys: tuple[Any, ...], table_of: Callable[[Any], dict[Any, OpSpec]],
               rewrite: Callable[..., None] | None = None, shape: ShapeFn | None = None,
               flops: FlopsFn | None = None) -> Callable[[_F], _F]:
    """A decorator that enters the spec of ``fn`` under each key (skipping ``None``) in
    the table ``table_of(key)``; a key registered twice is an error."""
    if flops is not None and shape is None:
        raise ValueError("flops= counts what a shape shortcut skips: pass shape= too")

    def deco(fn: _F) -> _F:
        present = tuple(k for k in keys if k is not None)
        spec = OpSpec(fn.__name__, fn, rewrite, shape, flops, present)
        for key in present:
            table = table_of(key)
            if key in table:
                raise ValueError(f"a rule for {key!r} is already registered ({table[key].name}); "
                                 f"each op has exactly one rule")
            table[key] = spec
        return fn

    return deco


def register(*keys: Any, rewrite: Callable[..., None] | None = None, shape: ShapeFn | None = None,
             flops: FlopsFn | None = None) -> Callable[[_F], _F]:
    """Decorator: declare the op spec of ``fn`` (the analysis rule) under each key, with
    its rewrite hook, shape shortcut and FLOP count (see :class:`OpSpec`).

    Keys are functions, ATen packets (:func:`aten_ops`), module types and method names;
    keys that do not exist in this torch build (``None``) are skipped.
    """
    return _registrar(keys, _table_for, rewrite, shape, flops)


def one_float_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The input of a layer called with one floating-point tensor and nothing else (what
    most module shape shortcuts accept), else None."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    return args[0]


def meta_empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` on the meta device (a shortcut's output)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def aten_ops(*names: str) -> list[Any]:
    """The ATen packets of ``names`` that exist in this torch build (keys for
    :func:`register`: a ``torch.export`` graph calls them)."""
    return [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]


def register_op_name(*names: str) -> Callable[[_F], _F]:
    """Decorator: ``fn`` is the rule of the custom ops with these qualified names, which
    exist only once the library defining them is imported (after fxprune may be)."""
    return _registrar(names, lambda _: _OP_NAMES)


def register_tag(*tags: Any) -> Callable[[_F], _F]:
    """Decorator: ``fn`` is the rule of every ATen overload tagged with one of ``tags``
    that has no rule of its own."""
    return _registrar(tags, lambda _: _TAGS)


def module_spec(cls: type) -> OpSpec | None:
    """The spec registered for exactly the module type ``cls`` (shape shortcuts: a
    subclass may have a forward of its own)."""
    return _MODULES.get(cls)


def function_spec(target: Any) -> OpSpec | None:
    """The spec registered for exactly the ``call_function`` target ``target``."""
    return _FUNCTIONS.get(target)


def lookup(node: torch.fx.Node, root: torch.nn.Module) -> Rule | None:
    """The rule for ``node`` or None (placeholders, get_attr and output are the engine's)."""
    if node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            rule = _aten_rule(node.target)
        elif rule is None and getattr(node.target, "__module__", None) in _TORCH_NAMESPACES:
            rule = _pointwise_twin(getattr(node.target, "__name__", ""))
        elif rule is None and getattr(node.target, "__module__", None) in _BINDING_NAMESPACES:
            rule = _binding_rule(getattr(node.target, "__name__", ""))
        return rule
    if node.op == "call_method":
        method = attr_target(node)  # a method name
        return _METHODS.get(method) or _pointwise_twin(method)
    if node.op == "call_module":
        module = get_module(root, attr_target(node))
        cls = type(module)
        if "parametrizations" in module._modules and torch.nn.utils.parametrize.is_parametrized(module) \
                and "forward" not in vars(cls):
            # torch.nn.utils.parametrize subclasses the layer (same forward); which
            # parametrizations the analysis understands is decided before any rule runs
            cls = cls.__bases__[0]
        return _MODULES.get(cls)
    return None


# where torch's Python functions of ATen ops live (torch.frac, torch.special.erfcx)
_TORCH_NAMESPACES = frozenset({"torch", "torch._C._VariableFunctions", "torch._C._special", "torch.special"})


# where torch keeps the Python bindings of ATen ops that torch.nn.functional and
# torch.fft/linalg wrap (torch._C._nn.pad): Dynamo's graphs call them directly
_BINDING_NAMESPACES = frozenset({"torch._C._nn", "torch._C._fft", "torch._C._linalg"})


def _binding_rule(name: str) -> Rule | None:
    """The rule of a binding of an ATen op (``torch._C._nn.pad``): its op's, the binding
    taking the arguments of the op's schema."""
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("_") else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    names = packet.overloads()  # type: ignore[no-untyped-call]
    overload = getattr(packet, "default" if "default" in names else names[0], None) if names else None
    return _aten_rule(overload) if isinstance(overload, torch._ops.OpOverload) else None


# ATen's aliases of elementwise ops, which carry no tags of their own
_ALIASES = {"multiply": "mul", "divide": "div", "true_divide": "div", "subtract": "sub", "negative": "neg",
            "absolute": "abs", "greater": "gt", "greater_equal": "ge", "less": "lt", "less_equal": "le",
            "not_equal": "ne", "arccos": "acos", "arcsin": "asin", "arctan": "atan", "arctan2": "atan2",
            "arccosh": "acosh", "arcsinh": "asinh", "arctanh": "atanh", "clip": "clamp", "fix": "trunc",
            "special_expit": "sigmoid", "special_exp2": "exp2", "special_expm1": "expm1",
            "special_log1p": "log1p", "special_round": "round", "special_sinc": "sinc", "special_logit": "logit",
            "special_psi": "digamma", "special_digamma": "digamma", "special_erf": "erf", "special_erfc": "erfc",
            "special_erfinv": "erfinv"}


def _pointwise_twin(name: str) -> Rule | None:
    """The rule of a torch function or tensor method with no rule of its own whose ATen op
    of the same name is tagged pointwise (``torch.frac``, ``x.sinc()``,
    ``torch.special.erfcx``: elementwise with broadcasting, like every such op)."""
    name = _ALIASES.get(name, name)
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("_") else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    overloads = [getattr(packet, o, None) for o in packet.overloads()]  # type: ignore[no-untyped-call]
    if not any(o is not None and torch.Tag.pointwise in o.tags for o in overloads):
        return None
    return _TAGS.get(torch.Tag.pointwise)


def _aten_rule(op: torch._ops.OpOverload) -> Rule | None:
    """An ATen overload's rule: its packet's, its tags', or (an in-place ``relu_``) that of
    the out-of-place op it mutates its input into."""
    rule = _FUNCTIONS.get(op.overloadpacket) or _OP_NAMES.get(op._schema.name)
    for tag in op.tags if rule is None else ():
        rule = _TAGS.get(tag)
        if rule is not None:
            break
    name = op.overloadpacket.__name__
    canonical = _ALIASES.get(name)
    if rule is None and canonical is not None:  # aten.multiply: aten.mul's rule
        overload = getattr(getattr(torch.ops.aten, canonical, None), op._overloadname, None)
        if overload is not None:
            return _aten_rule(overload)
    if rule is None and name.endswith("_") and not name.startswith("_"):
        base = getattr(torch.ops.aten, name[:-1], None)
        overload = getattr(base, op._overloadname, None) if base is not None else None
        if overload is not None:
            return _aten_rule(overload)
    return rule


def describe_target(node: torch.fx.Node, root: torch.nn.Module) -> str:
    """A short human name for what ``node`` calls."""
    if node.op == "call_module":
        return f"module {type(root.get_submodule(attr_target(node))).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    mod = getattr(target, "__module__", None)
    return f"{mod}.{name}" if mod and not str(name).startswith(mod) else str(name)


def known_keys() -> int:
    return len(_FUNCTIONS) + len(_MODULES) + len(_METHODS) + len(_TAGS) + len(_OP_NAMES)


def entries() -> Iterator[tuple[str, Any, OpSpec]]:
    """Every registration as (table, key, rule), table one of ``"function"`` (a callable
    or ATen packet), ``"module"`` (a module type), ``"method"`` (a method name), ``"tag"``
    (a ``torch.Tag``) and ``"op_name"`` (a custom op's qualified name)."""
    for table, entries_ in (("function", _FUNCTIONS), ("module", _MODULES), ("method", _METHODS),
                            ("tag", _TAGS), ("op_name", _OP_NAMES)):
        for key, rule in entries_.items():
            yield table, key, rule
