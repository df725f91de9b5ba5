"""The symbolic tracer's hookup to :mod:`fxprune.decompose`.

``torch.fx`` keeps ``torch.nn`` modules whole, and the forwards of
``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers are not traceable; the
tracer calls their functional decompositions instead (unless the user asked for the
module to stay a leaf), so their heads are prunable. Calls of the functions
:func:`fxprune.decompose.function_decomposition` knows (``F.multi_head_attention_forward``,
which is what Dynamo's graphs hold of an ``nn.MultiheadAttention``) are traced through
the same way, or recorded whole where the decomposition declines. A decomposition whose ops depend on
the rank or dtype of a traced value (an attention mask) reads them with
:meth:`DecomposingTracer.example_meta`; ``careful`` says whether it may also read ranks
where a cheaper guess usually holds (an attention query is batched).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from ..decompose import NotDecomposable, decomposition, function_decomposition
from ..meta import TensorMeta, tensor_meta


class DecomposingTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` that traces the modules :func:`fxprune.decompose.decomposition`
    knows through their decompositions.

    The attributes :mod:`fxprune.decompose` reads on ``proxy.tracer`` are ``careful`` and
    :meth:`example_meta`. Subclasses provide :meth:`run_to` (the value of a traced node on
    the example inputs), :meth:`is_leaf_user` and :meth:`call_whole_module` (a module call
    kept as one node).
    """

    def __init__(self, example_inputs: tuple | None = None, careful: bool = False):
        super().__init__()
        # decompositions may read ranks on the example inputs where a cheaper guess usually
        # holds (an attention query is batched): a retrace after that guess failed
        self.careful = careful and example_inputs is not None
        self.example_inputs = example_inputs
        self._example_metas: dict[torch.fx.Node, TensorMeta | None] = {}

    def is_leaf_user(self, m: nn.Module, qualname: str) -> bool:
        """Whether the user asked for ``m`` to stay opaque (then it is not decomposed)."""
        return False

    def run_to(self, target: torch.fx.Node) -> TensorMeta | None:
        """Shape and dtype of the traced node ``target`` on the example inputs, None where
        not known."""
        return None

    def example_meta(self, value: Any) -> TensorMeta | None:
        """Shape and dtype of a traced value on the example inputs, or None where they are
        not known (no example inputs, or a value that cannot be computed from them alone).
        A decomposition whose ops depend on them (an attention mask's rank and dtype) asks
        here instead of branching on a Proxy; each node is computed once per trace."""
        if not isinstance(value, torch.fx.Proxy) or self.example_inputs is None:
            return None
        node = value.node
        if node not in self._example_metas:
            self._example_metas[node] = self.run_to(node)
        return self._example_metas[node]

    def call_module(self, m, forward, args, kwargs):
        replacement = decomposition(m, kwargs)
        if replacement is not None and not self.is_leaf_user(m, self.path_of_module(m)):
            return replacement(m, *args, **kwargs)  # traced through, made analyzable
        return self.call_whole_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        replacement = function_decomposition(target) if kind == "call_function" else None
        if replacement is not None:
            try:
                return replacement(*args, **kwargs)  # traced through, made analyzable
            except NotDecomposable:
                pass  # recorded whole: the analysis pins what it cannot see through
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def call_whole_module(self, m, forward, args, kwargs):
        """A call of ``m`` that is not decomposed: ``torch.fx``'s (a leaf module becomes one
        node, any other is traced through)."""
        return super().call_module(m, forward, args, kwargs)


class _GraphTracer(DecomposingTracer):
    """Traces decompositions into an existing graph, at its insertion point; ranks and
    dtypes come from the shapes propagated on the graph's nodes."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(example_inputs=(), careful=True)
        self.graph, self.root = gm.graph, gm

    def run_to(self, target: torch.fx.Node) -> TensorMeta | None:
        return tensor_meta(target)


def decompose_calls(gm: torch.fx.GraphModule) -> int:
    """Replace, in place, the calls in ``gm``'s graph of functions that
    :func:`fxprune.decompose.function_decomposition` knows by their decompositions, where
    the decomposition reproduces the call (a call returning a tuple: where each use of
    its result is an item of it). Needs shapes propagated; returns the number of calls
    replaced (``gm`` is recompiled if any)."""
    graph, done, tracer = gm.graph, 0, _GraphTracer(gm)
    for node in list(graph.nodes):
        replacement = function_decomposition(node.target) if node.op == "call_function" else None
        if replacement is None:
            continue
        before = node.prev  # the decomposition goes between it and the call
        proxies: dict[torch.fx.Node, torch.fx.Proxy] = {}

        def as_proxy(n: torch.fx.Node) -> torch.fx.Proxy:  # one per node: `query is key` holds
            return proxies.setdefault(n, torch.fx.Proxy(n, tracer))

        try:
            with graph.inserting_before(node):
                out = replacement(*torch.fx.node.map_arg(node.args, as_proxy),
                                  **torch.fx.node.map_arg(node.kwargs, as_proxy))
        except NotDecomposable:
            out = None
        added, cur = [], before.next
        while cur is not node:
            added.append(cur)
            cur = cur.next
        if not _substitute(node, out):
            for n in reversed(added):  # declined: the call stays whole
                graph.erase_node(n)
            continue
        for n in reversed(added):  # what the call's users did not need (the weights not asked for)
            if not n.users and not n.is_impure():
                graph.erase_node(n)
        done += 1
    if done:
        gm.recompile()
    return done


def _substitute(node: torch.fx.Node, out: Any) -> bool:
    """Make the users of ``node`` use ``out`` (a Proxy, or a tuple of Proxies or None) and
    erase ``node``; False, changing nothing, where ``out`` cannot stand for it."""
    graph = node.graph
    if isinstance(out, torch.fx.Proxy):
        node.replace_all_uses_with(out.node)
        graph.erase_node(node)
        return True
    if not isinstance(out, tuple):
        return False
    users = list(node.users)
    for u in users:
        if u.target is not operator.getitem or not isinstance(u.args[1], int) or u.args[1] >= len(out) \
                or out[u.args[1]] is None and u.users:
            return False
    for u in users:
        item = out[u.args[1]]
        if item is not None:
            u.replace_all_uses_with(item.node)
        graph.erase_node(u)
    graph.erase_node(node)
    return True
