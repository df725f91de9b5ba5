"""The torch.export front end: non-strict ``torch.export`` as an ATen-level graph.

Shapes come from the export itself; run-time guards and metadata asserts are dropped;
the pytree input/output handling is kept, so the graph takes and returns what the model
does. Higher-order ops that run a subgraph under a mode (autocast, grad mode) are
inlined between calls that enter and leave the mode.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from ..meta import copy_pytree_specs, set_meta, tensor_meta
from ..rules.context import get_tensor
from . import repeated
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


def _clean_graph(exported: torch.fx.GraphModule) -> torch.fx.Graph:
    """A copy of an exported module's graph with mode scopes inlined and run-time checks
    dropped."""
    graph = copy_graph(exported.graph)
    _inline_scopes(exported, graph)
    for node in reversed(list(graph.nodes)):
        name = node.target if node.op == "call_module" else getattr(node.target, "__name__", "")
        if not node.users and name.split(".")[0] in _CHECKS:
            graph.erase_node(node)
    return graph


def _finish(gm: torch.fx.GraphModule, model: nn.Module, inputs: tuple, assigned: list) -> torch.fx.GraphModule:
    """Shape metadata from the export's values, buffer assignments checked and owned."""
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


def _export_failed(model: nn.Module, exc: BaseException) -> TraceError:
    where = user_frame(exc.__traceback__)
    at = f" at {where}" if where else ""
    return TraceError(f"torch.export could not capture {type(model).__name__}{at}: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                      f"Fix: make the failing code export-friendly or mark it as a leaf module "
                      f"and use frontend='fx'.")


def export_capture(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """Capture ``model`` with non-strict ``torch.export``: an ATen-level graph whose
    shapes come from the export itself. Input dims the model does not fix stay symbolic
    (see :func:`_dynamic_dims`; shape ops read them with ``sym_size`` at run time). The
    graph takes and returns what the model does (pytree in/out specs kept); run-time
    checks are dropped. A run of identical blocks (a transformer's layers) is exported
    once and spliced in for every block (:mod:`.repeated`)."""
    runs = repeated.find_runs(model)
    why = ""
    if runs:
        try:
            gm, why = _capture_repeated(model, inputs, runs)
        except Exception as exc:  # noqa: BLE001 (the whole model is exported instead; the reason kept)
            gm, why = None, f"{type(exc).__name__}: {exc}"
        if gm is not None:
            return gm
    try:
        program, assigned = _export_program(model, inputs)
    except Exception as exc:  # export raises many types; one typed error here
        raise _export_failed(model, exc) from exc
    exported = program.module()
    gm = graph_module(exported, _clean_graph(exported), type(model).__name__)  # code generated when first run
    copy_pytree_specs(exported, gm)
    if runs:
        gm.meta[repeated.REPEATED_KEY] = f"not used: {why}"
    return _finish(gm, model, inputs, assigned)


def _capture_repeated(model: nn.Module, inputs: tuple,
                      runs: list) -> tuple[torch.fx.GraphModule | None, str]:
    """:func:`export_capture` with each run of identical blocks exported once
    (:mod:`.repeated`): the GraphModule, or None and why not."""
    with repeated.Stubs(runs) as stubs:
        program, assigned = _export_program(model, inputs)
    exported = program.module()
    graph = _clean_graph(exported)
    stub_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target is _BLOCK_OP]
    if not stub_nodes:
        return None, "no block of a run was called with tensors and plain values only"
    bodies = {key: _block_graph(model, call) for key, call in stubs.calls.items()}
    for key, (body, why_not) in bodies.items():
        if body is None:
            return None, f"block '{stubs.calls[key].path}' alone: {why_not}"
    attach: dict[str, tuple[torch.Tensor, bool]] = {}
    for stub in stub_nodes:
        key = stub.args[0]
        call = stubs.calls[key]
        path = _stub_owner(stub, call)
        if path is None:
            return None, f"a call of fxprune::block ({stub.name}) names no block of the model"
        block = model.get_submodule(path)
        body_gm, body_graph = bodies[key]
        _splice(graph, stub, body_gm, body_graph, path, block, key, call, attach)
    for target, (value, persistent) in attach.items():
        _attach(exported, target, value, persistent)
    gm = graph_module(exported, graph, type(model).__name__)
    copy_pytree_specs(exported, gm)
    _finish(gm, model, inputs, assigned)
    if not any(p.device.type == "meta" for p in itertools.chain(model.parameters(), model.buffers())):
        mismatch = _differs_from_model(gm, model, inputs)
        if mismatch:
            return None, f"the spliced graph does not compute what the model does ({mismatch})"
    n_blocks = len(stub_nodes)
    gm.meta[repeated.REPEATED_KEY] = (f"{n_blocks} blocks in {len(runs)} run(s) spliced from "
                                      f"{len(bodies)} exported block graph(s)")
    return gm, ""


_BLOCK_OP = torch.ops.fxprune.block.default


def _stub_owner(stub: torch.fx.Node, call: Any) -> str | None:
    """The qualified name of the block whose forward made ``stub``: the innermost module
    on its module stack that is a block of the call's run."""
    stack = stub.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        path = path.removeprefix("L['self'].")
        if path in call.run_paths:
            return path
    return None


def _block_graph(model: nn.Module, call: Any) -> tuple[torch.fx.GraphModule | None, Any]:
    """``call``'s block exported alone on zeros of its inputs' example shapes: (the
    exported module, its cleaned graph), or (None, why not)."""
    wrapper = repeated.Wrapper(call.block, call)
    examples, dims = repeated.example_tensors(call)
    try:
        with torch.no_grad(), state_restored(model):
            program = torch.export.export(wrapper, (examples,), dynamic_shapes=(dims,), strict=False)
    except Exception as exc:  # noqa: BLE001 (reported as the reason)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    body = program.module()
    graph = _clean_graph(body)
    if buffer_writes(graph_module(body, graph, "Block")):
        return None, "the block assigns a buffer"
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable and any(
                isinstance(a, torch.fx.Node) and a.op == "placeholder" for a in node.args):
            return None, f"the block writes into its input in place ({node.format_node()})"
    return body, graph


def _splice(graph: torch.fx.Graph, stub: torch.fx.Node, body: torch.fx.GraphModule, body_graph: torch.fx.Graph,
            path: str, block: nn.Module, key: int, call: Any, attach: dict) -> None:
    """Replace ``stub`` by a copy of ``body_graph`` reading block ``path``'s attributes."""
    outer_stack = dict(stub.meta.get("nn_module_stack") or {})
    placeholders = [n for n in body_graph.nodes if n.op == "placeholder"]
    tensors = list(stub.args[1])
    if len(placeholders) != len(tensors):
        raise TraceError(f"block '{path}': {len(placeholders)} inputs exported, {len(tensors)} passed")
    env: dict[torch.fx.Node, Any] = dict(zip(placeholders, tensors))
    outs: Any = ()
    with graph.inserting_before(stub):
        for n in body_graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outs = torch.fx.node.map_arg(n.args[0], env.__getitem__)
                break
            new = env[n] = copy_node(graph, n, env.__getitem__)
            if n.op == "get_attr":
                new.target = _attach_target(body, n.target, path, block, key, attach)
            stack = dict(outer_stack)
            for k, (p, cls) in (n.meta.get("nn_module_stack") or {}).items():
                p = p.removeprefix("L['self'].")
                if p == "block" or p.startswith("block."):
                    full = path + p[len("block"):]
                    stack[full] = (full, cls)
            new.meta["nn_module_stack"] = stack
    flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    tensor_outs = [v for v, is_t in zip(flat, call.out_is_tensor) if is_t]
    for user in list(stub.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise TraceError(f"block '{path}': its outputs are used other than by index ({user.format_node()})")
        user.replace_all_uses_with(tensor_outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(stub)


def _attach_target(body: torch.fx.GraphModule, target: str, path: str, block: nn.Module, key: int,
                   attach: dict) -> str:
    """The name, in the spliced graph, of attribute ``target`` of the exported block: the
    called block's own parameter or buffer, or a constant of the export (shared by every
    copy of one call)."""
    if target.startswith("block."):
        rel = target[len("block."):]
        *owner_path, name = rel.split(".")
        owner = block.get_submodule(".".join(owner_path))
        value = owner._parameters.get(name)
        if value is None:
            value = owner._buffers.get(name)
        if value is None:
            raise TraceError(f"block '{path}': the exported block reads '{rel}', which the block does not hold")
        full = f"{path}.{rel}"
        attach.setdefault(full, (value, name not in owner._non_persistent_buffers_set))
        return full
    full = f"_fxprune_block{key}_{target.replace('.', '_')}"
    attach.setdefault(full, (get_tensor(body, target), True))
    return full


def _attach(root: nn.Module, target: str, value: torch.Tensor, persistent: bool) -> None:
    *path, name = target.split(".")
    owner = root
    for atom in path:
        child = owner._modules.get(atom)
        if child is None:
            child = nn.Module()
            owner.add_module(atom, child)
        owner = child
    if name in owner._parameters or name in owner._buffers:
        return
    if isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value, persistent=persistent)


def _differs_from_model(gm: torch.fx.GraphModule, model: nn.Module, inputs: tuple) -> str:
    """'' when ``gm`` and ``model`` give the same outputs on ``inputs``, else what differs."""
    try:
        with torch.no_grad(), state_restored(model):
            want = pytree.tree_leaves(model(*inputs))
        with torch.no_grad():
            got = pytree.tree_leaves(gm(*inputs))
    except Exception as exc:  # noqa: BLE001 (reported as the reason)
        return f"{type(exc).__name__}: {exc}"
    want = [w for w in want if isinstance(w, torch.Tensor)]
    got = [g for g in got if isinstance(g, torch.Tensor)]
    if len(want) != len(got):
        return f"{len(got)} tensor outputs instead of {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w.shape != g.shape or w.dtype != g.dtype:
            return f"output {i}: {tuple(g.shape)} {g.dtype} instead of {tuple(w.shape)} {w.dtype}"
        if w.is_floating_point():
            scale = float(w.abs().max()) if w.numel() else 0.0
            err = float((w - g).abs().max()) if w.numel() else 0.0
            if not err <= max(1e-4, 64 * torch.finfo(w.dtype).eps) * max(scale, 1.0):
                return f"output {i}: largest difference {err:.3g} (values up to {scale:.3g})"
        elif not torch.equal(w, g):
            return f"output {i}: different values"
    return ""
