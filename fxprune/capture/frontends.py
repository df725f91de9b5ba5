"""The front-end fallback order: :func:`trace` and the ``capture`` pass.

``frontend="auto"`` traces symbolically (:mod:`.tracer`) and falls back to torch.export
(:mod:`.torch_export`) when the trace fails, when the traced graph does not run on the
example inputs (after one careful retrace), or when it leaves calls of Python functions
no rule knows. A GraphModule is copied and used as it is. A Hugging Face model is
captured with ``use_cache=False`` (:func:`fxprune.hf.capture_settings`).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from .. import hf
from .._util import as_tuple
from ..errors import InputError, TraceError
from ..meta import FRONTEND_KEY, LIFTED_KEY, copy_pytree_specs, has_meta
from ..passes_base import Pass, PruneState, register_pass
from .decompositions import decompose_calls
from .graphs import copy_graph, guard_none_inputs
from .shapes import propagate_shapes
from .state import state_restored
from .torch_export import export_capture
from .tracer import symbolic_trace


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
        gm = torch.fx.GraphModule(model, copy_graph(model.graph), type(model).__name__)
        copy_pytree_specs(model, gm)
        inputs = _lift_parameter_placeholders(gm, inputs)
        propagate_shapes(gm, inputs)
        if decompose_calls(gm):  # F.multi_head_attention_forward in a graph from Dynamo
            propagate_shapes(gm, inputs)
        gm.meta[FRONTEND_KEY] = "graph"
        return gm
    with hf.capture_settings(model) as notes:  # a Hugging Face model: use_cache=False, noted
        gm = _trace_module(model, inputs, leaf_modules, concrete_args, frontend)
    guard_none_inputs(gm, inputs)
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
        followed = _follow(model, inputs, leaf_modules) if hf.is_hf_model(model) and not user_concrete else None
        if followed is not None:
            return followed
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


def _follow(model: nn.Module, inputs: tuple, leaf_modules: Iterable) -> torch.fx.GraphModule | None:
    """The symbolic trace following the example values (``Tracer.follow``: Python that
    needs a size reads it on the example inputs, as torch.export specializes it), shapes
    propagated; None where that does not capture the model either."""
    try:
        gm = symbolic_trace(model, leaf_modules=leaf_modules, example_inputs=inputs, follow=True)
        if not all(has_meta(n) for n in gm.graph.nodes if n.op != "output"):
            propagate_shapes(gm, inputs)  # a value the trace could not follow: shapes computed apart
    except (TraceError, InputError):
        return None
    gm.meta[FRONTEND_KEY] = "fx"
    if opaque_calls(gm):
        return None
    return gm


def _runs_eagerly(model: nn.Module, inputs: tuple) -> None:
    """Raise an InputError saying so when ``model`` itself fails on ``inputs`` (the last
    check when no capture ran: then no graph is to blame)."""
    try:
        with torch.no_grad(), state_restored(model):
            model(*inputs)
    except Exception as exc:
        if isinstance(exc, TypeError) and "argument" in str(exc):
            return  # a call with the wrong arguments: the caller's input-count message says it better
        raise InputError(f"the model itself does not run on the example inputs: {type(exc).__name__}: {exc}. "
                         f"Fix: pass inputs the model accepts (and check its configuration)") from exc


def _careful_retrace(model, inputs, leaf_modules, concrete_args) -> torch.fx.GraphModule | None:
    """The symbolic trace again with ranks read on the example inputs (``Tracer.careful``),
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
    from ..meta import tensor_meta
    from ..rules import lookup

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
