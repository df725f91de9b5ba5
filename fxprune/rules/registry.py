"""The op-rule registry: op semantics as data.

A rule is keyed by what a node calls: a ``call_function`` target (a Python
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


@dataclass(frozen=True)
class Rule:
    """How one op relates channel labels (``analyze``) and, optionally, how its
    copied node or module is updated once channels are removed (``rewrite``)."""

    name: str
    analyze: Callable[..., Any]
    rewrite: Callable[..., None] | None = None


_FUNCTIONS: dict[Any, Rule] = {}
_MODULES: dict[type, Rule] = {}
_METHODS: dict[str, Rule] = {}
_TAGS: dict[Any, Rule] = {}
_OP_NAMES: dict[str, Rule] = {}  # custom ops by qualified name ("transformers::grouped_mm_fallback")

_F = TypeVar("_F", bound=Callable[..., Any])


def _table_for(key: Any) -> dict[Any, Rule]:
    if isinstance(key, str):
        return _METHODS
    if isinstance(key, type) and issubclass(key, torch.nn.Module):
        return _MODULES
    if callable(key) or isinstance(key, torch._ops.OpOverloadPacket):
        return _FUNCTIONS
    raise TypeError(f"cannot register a rule for {key!r}: not a method name, module type or callable")


def _registrar(keys: tuple[Any, ...], table_of: Callable[[Any], dict[Any, Rule]],
               rewrite: Callable[..., None] | None = None) -> Callable[[_F], _F]:
    """A decorator that enters ``fn``'s rule under each key (skipping ``None``) in the
    table ``table_of(key)``; a key registered twice is an error."""

    def deco(fn: _F) -> _F:
        rule = Rule(fn.__name__, fn, rewrite)
        for key in keys:
            if key is None:
                continue
            table = table_of(key)
            if key in table:
                raise ValueError(f"a rule for {key!r} is already registered ({table[key].name}); "
                                 f"each op has exactly one rule")
            table[key] = rule
        return fn

    return deco


def register(*keys: Any, rewrite: Callable[..., None] | None = None) -> Callable[[_F], _F]:
    """Decorator: register ``fn`` as the analysis rule for each key.

    Keys that do not exist in this torch build (``None``) are skipped.
    """
    return _registrar(keys, _table_for, rewrite)


def register_op_name(*names: str) -> Callable[[_F], _F]:
    """Decorator: ``fn`` is the rule of the custom ops with these qualified names, which
    exist only once the library defining them is imported (after fxprune may be)."""
    return _registrar(names, lambda _: _OP_NAMES)


def register_tag(*tags: Any) -> Callable[[_F], _F]:
    """Decorator: ``fn`` is the rule of every ATen overload tagged with one of ``tags``
    that has no rule of its own."""
    return _registrar(tags, lambda _: _TAGS)


def lookup(node: torch.fx.Node, root: torch.nn.Module) -> Rule | None:
    """The rule for ``node`` or None (placeholders, get_attr and output are the engine's)."""
    if node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            rule = _aten_rule(node.target)
        elif rule is None and getattr(node.target, "__module__", None) in _TORCH_NAMESPACES:
            rule = _pointwise_twin(getattr(node.target, "__name__", ""))
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


def entries() -> Iterator[tuple[str, Any, Rule]]:
    """Every registration as (table, key, rule), table one of ``"function"`` (a callable
    or ATen packet), ``"module"`` (a module type), ``"method"`` (a method name), ``"tag"``
    (a ``torch.Tag``) and ``"op_name"`` (a custom op's qualified name)."""
    for table, entries_ in (("function", _FUNCTIONS), ("module", _MODULES), ("method", _METHODS),
                            ("tag", _TAGS), ("op_name", _OP_NAMES)):
        for key, rule in entries_.items():
            yield table, key, rule
