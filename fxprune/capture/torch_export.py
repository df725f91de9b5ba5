"""The torch.export front end: non-strict ``torch.export`` as an ATen-level graph.

Shapes come from the export itself; run-time guards and metadata asserts are dropped;
the pytree input/output handling is kept, so the graph takes and returns what the model
does. Higher-order ops that run a subgraph under a mode (autocast, grad mode) are
inlined between calls that enter and leave the mode.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from ..meta import copy_pytree_specs, set_meta, tensor_meta
from ..rules.context import get_tensor
from .graphs import copy_graph, copy_node, graph_module
from .shapes import propagate_shapes
from .source import user_frame
from .state import buffer_writes, own_written_buffers, state_restored


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
        with torch.no_grad(), state_restored(model):
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
    for write, dst in buffer_writes(gm):
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
        where = user_frame(sys.exc_info()[2])
        at = f" at {where}" if where else ""
        raise TraceError(f"torch.export could not capture {type(model).__name__}{at}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                         f"Fix: make the failing code export-friendly or mark it as a leaf module "
                         f"and use frontend='fx'.") from exc
    exported = program.module()
    graph = copy_graph(exported.graph)
    _inline_scopes(exported, graph)
    for node in reversed(list(graph.nodes)):
        name = node.target if node.op == "call_module" else getattr(node.target, "__name__", "")
        if not node.users and name.split(".")[0] in _CHECKS:
            graph.erase_node(node)
    gm = graph_module(exported, graph, type(model).__name__)  # code generated when first run
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
    own_written_buffers(gm, model)
    return gm
