"""Graph-building helpers shared by the front ends.

Captured shapes are concrete, so nodes are created bare and given their arguments
afterwards (:func:`set_args`), skipping the pytree walk ``torch.fx`` does per node to warn
about symbolic ints. GraphModules built here compile their Python source lazily.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx

from ..meta import set_meta


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and every node it depends on."""
    need, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    return need

@torch.fx.node.has_side_effect
def expect_none(value: Any, name: str) -> None:
    """The check a captured graph makes on an input that was None in the example inputs:
    the graph was traced without it (its branches not taken), so a value there would be
    ignored; it is an error instead. Traced again (a GraphModule traced by torch.fx), it
    records itself."""
    if isinstance(value, torch.fx.Proxy):
        value.tracer.create_proxy("call_function", expect_none, (value, name), {})
        return None
    if value is not None:
        from ..errors import InputError

        raise InputError(f"input '{name}' was None in the example inputs the model was captured with, so the "
                         f"captured graph does not use it and got a {type(value).__name__}. Fix: capture (prune) "
                         f"with an example value for '{name}', or pass None")


# what a saved folder's module.py holds for expect_none (it imports nothing of fxprune)
expect_none.__fxprune_source__ = """\
def {name}(value, name):
    if value is not None and not isinstance(value, torch.fx.Proxy):
        raise ValueError(f"input '{{name}}' was None in the example inputs the model was captured with, so the "
                         f"captured graph does not use it and got a {{type(value).__name__}}; pass None")
"""  # type: ignore[attr-defined]


def guard_none_inputs(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    """Insert :func:`expect_none` on each placeholder whose example input is None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs) or all(x is not None for x in inputs):
        return
    with gm.graph.inserting_after(placeholders[-1]):
        for node, x in reversed(list(zip(placeholders, inputs))):
            if x is None and not any(u.target is expect_none for u in node.users):
                set_meta(gm.graph.call_function(expect_none, (node, str(node.target))), None)
    gm.recompile()


def graph_module(root: Any, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is generated when first needed (its forward is
    called or its code read): the analysis and the rewrite only read the graph, so a
    prune does not pay for compiling the captured model's source."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # an older torch: compiled right away
        return torch.fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)

def set_args(node: torch.fx.Node, args: tuple, kwargs: dict) -> torch.fx.Node:
    """Give a node made without arguments its arguments. ``Graph.create_node`` walks every
    argument with pytree to warn about symbolic ints, a third of its cost; captured
    shapes are concrete, so fxprune creates nodes bare and sets the arguments after."""
    if args:
        node.args = args
    if kwargs:
        node.kwargs = kwargs
    return node


def copy_node(graph: torch.fx.Graph, node: torch.fx.Node, arg_transform) -> torch.fx.Node:
    """``graph.node_copy(node, arg_transform)`` without that walk (:func:`set_args`)."""
    new = graph.create_node(node.op, node.target, (), {}, node.name, node.type)
    new.meta = copy.copy(node.meta)
    return set_args(new, torch.fx.node.map_arg(node.args, arg_transform),
                     torch.fx.node.map_arg(node.kwargs, arg_transform))


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)  # pytree in/out handling of exported graphs
    return new
