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


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and every node it depends on."""
    need, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    return need

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
