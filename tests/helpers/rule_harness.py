"""Run one op rule on a three-node graph and read what it decided.

``run_rule(op, x, ...)`` builds ``placeholder(s) -> op -> output`` (one placeholder per
example tensor; other arguments are constants of the call), stores each node's shape
from the example values as capture would, gives every input fresh channel labels
along its channel dim and runs the registered rule of the op node alone, through the
registry lookup the analysis uses. No other rule runs, so a failure points at the
rule of that op. The answer names every channel class by a small integer (in order
of first appearance: the inputs' channels first, then the output's):

    r = run_rule(torch.cat, x, y, kwargs={"dim": 1})
    assert r.output == r.inputs[0] + r.inputs[1]

``op`` is a function (``torch.cat``), a method name (``"view"``) or an ``nn.Module``
(called as a submodule, its parameters aligned by path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from fxprune.labels import CONST, Family, LabelSpace, normalize
from fxprune.meta import set_meta
from fxprune.rules.context import AnalysisContext
from fxprune.rules.registry import lookup

CONSTANT = "C"  # the name of the constants' class (model inputs, padding, pinned values)


@dataclass
class RuleResult:
    """What one rule decided, with classes named by small ints (``CONSTANT`` for the
    constants' class)."""

    rule: str  # the rule's name in the registry
    inputs: list[list[Any]]  # each tensor input's classes along its channel dim
    output: Any  # the output's classes, one list per channel position (nested by dims)
    out_dim: int | None  # the dim the output's classes vary along (None: one class)
    alignments: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # (path, role) -> classes
    pinned: set[Any] = field(default_factory=set)  # classes the rule pinned
    inexact: set[Any] = field(default_factory=set)  # classes whose values the op mixes
    consumed: list[int | str | tuple[int, int]] = field(default_factory=list)  # inputs it sums over
    barriers: list[str] = field(default_factory=list)  # reasons, where the rule refused

    @property
    def output_vector(self) -> list[Any]:
        """The output's classes along its channel dim (``out_dim``)."""
        return self.output if isinstance(self.output, list) else [self.output]


def _placeholders(graph: torch.fx.Graph, args: tuple, kwargs: dict,
                  root: nn.Module) -> tuple[tuple, dict, list]:
    """The call's arguments with every tensor replaced by a new placeholder node, and every
    ``nn.Parameter`` by a ``get_attr`` node of a parameter of ``root`` (``p0``, ``p1``...)."""
    made: list[tuple[torch.fx.Node, torch.Tensor]] = []

    def swap(a: Any) -> Any:
        if isinstance(a, nn.Parameter):
            name = f"p{len(root._parameters)}"
            root.register_parameter(name, a)
            node = graph.get_attr(name)
            set_meta(node, a)
            return node
        if isinstance(a, torch.Tensor):
            node = graph.placeholder(f"x{len(made)}")
            made.append((node, a))
            return node
        if isinstance(a, (list, tuple)):
            return type(a)(swap(v) for v in a)
        return a

    new_args = tuple(swap(a) for a in args)
    new_kwargs = {k: swap(v) for k, v in kwargs.items()}
    return new_args, new_kwargs, made


def _channel_dim(t: torch.Tensor) -> int:
    return 1 if t.ndim >= 3 else t.ndim - 1


def run_rule(op: Any, *args: Any, kwargs: dict | None = None, channel_dims: list[int] | None = None,
             policy: str = "inner") -> RuleResult:
    """Run the rule of ``op(*args, **kwargs)`` on fresh input channels.

    Every tensor in ``args``/``kwargs`` (lists included) becomes a placeholder whose
    positions along its channel dim (``channel_dims[i]``; default 1 for 3 dims or more,
    else the last) are channels of their own; an ``nn.Parameter`` becomes a parameter of
    the graph's module read by ``get_attr`` (a functional layer's weight, aligned by its
    path ``p0``, ``p1``... in the order met). ``op`` is a callable, a method name or a
    module. Raises what the rule raises (``Unsupported`` included: it is not turned into
    a barrier here) and ``LookupError`` when no rule is registered for the op."""
    kwargs = dict(kwargs or {})
    root = nn.Module()
    graph = torch.fx.Graph()
    fx_args, fx_kwargs, made = _placeholders(graph, args, kwargs, root)
    if isinstance(op, nn.Module):
        root.add_module("op", op)
        node = graph.call_module("op", fx_args, fx_kwargs)
        value = op(*args, **kwargs)
    elif isinstance(op, str):
        node = graph.call_method(op, fx_args, fx_kwargs)
        value = getattr(args[0], op)(*args[1:], **kwargs)
    else:
        node = graph.call_function(op, fx_args, fx_kwargs)
        value = op(*args, **kwargs)
    graph.output(node)
    gm = torch.fx.GraphModule(root, graph)
    for ph, t in made:
        set_meta(ph, t)
    set_meta(node, value)
    rule = lookup(node, gm)
    if rule is None:
        raise LookupError(f"no rule is registered for {node.format_node()}")

    space = LabelSpace()
    ctx = AnalysisContext(gm, space, policy)
    in_labels = []
    for i, (ph, t) in enumerate(made):
        ctx.node = ph
        dim = channel_dims[i] if channel_dims is not None else _channel_dim(t)
        labels = ctx.along(space.fresh((t.shape[dim],), Family(f"input {i}", ph.name)), dim, t.ndim) \
            if t.ndim else torch.full((), CONST, dtype=torch.int64)
        ctx.labels_of[ph] = labels
        in_labels.append((labels, dim))
    ctx.node = node
    out = rule.analyze(ctx, node)
    if isinstance(out, torch.Tensor):  # as the analysis stores it: one channel dim, the policy's
        out = normalize(space, out, ctx.policy, ctx.avoid_dims, []) if ctx.splits_channels \
            else normalize(space, out, "auto")

    names: dict[int, Any] = {}

    def name(labels: torch.Tensor) -> Any:
        roots = space.roots(labels)
        for r in roots.reshape(-1).tolist():
            if r not in names:
                names[r] = CONSTANT if r == CONST else len([v for v in names.values() if v != CONSTANT])
        return [names[r] for r in roots.reshape(-1).tolist()]

    def vector(labels: torch.Tensor, dim: int) -> list[Any]:
        index = tuple(slice(None) if d == dim else 0 for d in range(labels.ndim))
        return name(labels[index].reshape(-1)) if labels.ndim else name(labels.reshape(1))

    inputs = [vector(l, d) for l, d in in_labels]
    out_dim = None
    if isinstance(out, torch.Tensor):
        varying = [d for d, n in enumerate(out.shape) if n > 1]
        if len(varying) == 1:
            out_dim = varying[0]
            output: Any = vector(out, out_dim)
        elif not varying:
            output = name(out.reshape(-1))[0]
        else:  # several dims carry labels (a view that splits channels): nested, dim by dim
            roots = name(out.reshape(-1))
            output = torch.tensor([0 if r == CONSTANT else r + 1 for r in roots]).reshape(out.shape)
            output = _unname(output.squeeze().tolist())
    else:
        output = out
    alignments = {}
    for path, labels, role, _ in ctx.alignments:
        varying = [d for d, n in enumerate(labels.shape) if n > 1]
        alignments[(path, role)] = vector(labels, varying[0]) if len(varying) == 1 else name(labels.reshape(-1))
    pinned = {c for labels, _ in space.pinned[1:] for c in name(labels.reshape(-1))}
    inexact = {c for labels, _ in space.inexact for c in name(labels.reshape(-1))}
    return RuleResult(rule=rule.name, inputs=inputs, output=output, out_dim=out_dim, alignments=alignments,
                      pinned=pinned, inexact=inexact, consumed=[c for _, c in ctx.consumers],
                      barriers=list(ctx.barriers))


def _unname(nested: Any) -> Any:
    """Back from the +1 shift used to put names in a tensor (0 was the constants)."""
    if isinstance(nested, list):
        return [_unname(v) for v in nested]
    return CONSTANT if nested == 0 else nested - 1
