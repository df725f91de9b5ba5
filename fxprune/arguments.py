"""A call node's arguments by parameter name.

A graph spells one call in several layouts: by position or by keyword, as a
torch function, a ``torch.nn`` layer, a tensor method or an ATen op (whose first
parameter is ``self``). :func:`bind_args` names the arguments of any of them the
same way, and :func:`replace_arg` changes one where the call passed it, so code
that reads or rewrites an op's arguments never counts positions.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx
from torch.fx.operator_schemas import ArgsKwargsPair, get_signature_for_torch_op, normalize_function

from .errors import AnalysisError

__all__ = ["CallArgs", "bind_args", "replace_arg"]


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature | None:
    """The signature of ``cls.forward`` (self included) where torch.fx's
    ``normalize_module`` would bind it: a layer of ``torch.nn`` whose forward takes
    neither ``*args`` nor ``**kwargs``. Cached: a rule reads the arguments of every
    norm layer of a model, and ``inspect.signature`` is most of that cost."""
    if getattr(torch.nn, cls.__name__, None) is not cls:
        return None
    sig = inspect.signature(inspect.unwrap(cls.forward))
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    return None if any(p.kind in kinds for p in sig.parameters.values()) else sig


def _bind_forward(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ArgsKwargsPair | None:
    """``normalize_module(..., normalize_to_only_use_kwargs=True)`` for a module of type
    ``cls``, with its signature cached."""
    sig = _forward_signature(cls)
    if sig is None:
        return None
    bound = sig.bind(None, *args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.pop(next(iter(sig.parameters)))  # self
    return ArgsKwargsPair((), named)


def _bind_overloads(node: torch.fx.Node) -> ArgsKwargsPair | None:
    """The call bound to the overloads of a torch builtin that torch.fx would not choose
    between without argument types (``F.conv2d``'s ``padding`` is an int list or a
    string): when every overload the call fits names its parameters alike, the
    arguments by those names, defaults left out (they may differ between overloads)."""
    sigs = get_signature_for_torch_op(cast(Callable[..., Any], node.target))
    if not sigs:
        return None
    fits = []
    for sig in sigs:
        try:
            fits.append((tuple(sig.parameters), sig.bind(*node.args, **node.kwargs)))
        except TypeError:
            continue
    if not fits or any(order != fits[0][0] for order, _ in fits):
        return None
    order, bound = fits[0]
    return ArgsKwargsPair((), {k: bound.arguments[k] for k in order if k in bound.arguments})


@dataclasses.dataclass(frozen=True)
class CallArgs:
    """One call's arguments by parameter name (:func:`bind_args`)."""

    values: dict[str, Any]  # name -> argument, defaults included where a signature is known
    order: tuple[str, ...]  # the parameters in order: positional argument i binds order[i]
    keyword: dict[str, str]  # a name that differs from the callee's keyword -> that keyword

    def slot(self, name: str, n_positional: int) -> tuple[int | None, str]:
        """Where a call with ``n_positional`` positional arguments passes ``name``: (its
        position, or None when it is not among them; the keyword it would take)."""
        pos = self.order.index(name) if name in self.order else n_positional
        return (pos if pos < n_positional else None), self.keyword.get(name, name)


def bind_args(node: torch.fx.Node, names: Sequence[str] = (), module: type | None = None,
              where: str | None = None) -> CallArgs:
    """The arguments of call ``node`` by parameter name.

    Where torch.fx can bind the call to the target's signature or ATen schema
    (``torch.fx.operator_schemas.normalize_function`` with
    ``normalize_to_only_use_kwargs=True``; for a ``torch.nn`` layer ``module``, what
    ``normalize_module`` does, its signature cached), every parameter is there, defaults
    included; ATen's ``self`` and the first parameter of a module's ``forward`` (``x`` in
    ``nn.RMSNorm``) are called ``input``, as in the functional twins. Otherwise (a method
    call, a builtin whose overloads the arguments do not decide) the positional arguments
    are named by ``names`` in order, then the keywords are added: optional ones are read
    with ``.get(name, default)``. Too few ``names`` for the positional arguments is an
    :class:`AnalysisError` naming the node."""
    bound = None
    try:
        if node.op == "call_function":
            try:
                bound = normalize_function(cast(Callable[..., Any], node.target), node.args, node.kwargs,
                                           normalize_to_only_use_kwargs=True)
            except RuntimeError:  # "the schema match was ambiguous"
                bound = None
            if bound is None:
                bound = _bind_overloads(node)
        elif node.op == "call_module" and module is not None:
            bound = _bind_forward(module, node.args, node.kwargs)
    except Exception:  # no signature to bind to: the fallback below names them
        bound = None
    if bound is not None:
        first = next(iter(bound.kwargs), None) if node.op == "call_module" else "self"
        values = {("input" if k == first else k): v for k, v in bound.kwargs.items()}
        keyword = {"input": first} if first is not None and first in bound.kwargs and first != "input" else {}
        return CallArgs(values, tuple(values), keyword)
    if len(node.args) > len(names):
        raise AnalysisError(f"{where or node.format_node()}: {len(node.args)} positional arguments but the "
                            f"rule names only {len(names)} ({', '.join(names)}); pass their names to named_args")
    return CallArgs({**dict(zip(names, node.args)), **node.kwargs}, tuple(names), {})


def replace_arg(node: torch.fx.Node, call: CallArgs, name: str, value: Any) -> None:
    """Set argument ``name`` of ``node`` (bound as ``call``) to ``value``: where the call
    passed it, by position or by keyword; as a keyword when it was left to its default."""
    pos, keyword = call.slot(name, len(node.args))
    if pos is not None and keyword not in node.kwargs:
        node.args = (*node.args[:pos], value, *node.args[pos + 1:])
    else:
        node.kwargs = {**node.kwargs, keyword: value}
