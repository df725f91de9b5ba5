"""fxprune in other tools' pipelines: torch.fx's pass manager and torch.export.

**Passes.** :func:`as_fx_pass` makes a ``torch.fx.passes.infra.pass_base.PassBase``
of fxprune: a whole prune (``as_fx_pass(None, x, ratio=0.5)``), a pipeline (text
or :class:`fxprune.Pipeline`) or a single pass. It takes a GraphModule and returns a
``PassResult``: the pruned GraphModule with ``modified=True`` when channels were
removed, else the GraphModule it was given with ``modified=False``. The input is
never modified. :func:`fx_passes` gives one ``PassBase`` per pass of a pipeline, so
a ``PassManager`` runs (and times, and checks) fxprune pass by pass::

    from torch.fx.passes.infra.pass_manager import PassManager
    pm = PassManager(fx_passes("channel-deps,score-magnitude,select{ratio=0.5},rewrite", x))
    pruned = pm(gm).graph_module

Analysis passes return the GraphModule unchanged; what they computed (the
:class:`fxprune.PruneState`) is held for that GraphModule (weakly, and only while
its graph is unchanged), and the next fxprune pass run on it picks it up, so
``channel-deps``, a scoring pass, ``select`` and ``rewrite`` can be separate entries
of the pass manager, with other passes before or after them. ``adapter.result``
is the :class:`fxprune.PruneResult` of the last rewrite, for ``fxprune.verify``.

**Export.** :func:`prune_exported` prunes a ``torch.export.ExportedProgram`` and
returns a new, valid one (state dict, graph signature and range constraints those
of the pruned model; ``torch.export.save``/``load``, AOTInductor and
``torch.onnx.export`` take it): ``ep.module()`` is pruned with :func:`fxprune.prune`
and the pruned GraphModule is exported again on the same example inputs, with the
dynamic dims (and their ranges) of the original program.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ._util import as_tuple
from .errors import ConfigError, FxpruneError, InputError, VerificationError
from .passes_base import Pass, Pipeline, PruneState, parse_pipeline

__all__ = ["FxprunePass", "as_fx_pass", "fx_passes", "prune_exported"]

# what analysis passes computed, per GraphModule: (fingerprint of its graph, state)
_STATES: "weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple[int, PruneState]]" = weakref.WeakKeyDictionary()
# the inputs a GraphModule an adapter made takes (its lifted parameters are constants now)
_INPUTS: "weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple]" = weakref.WeakKeyDictionary()

_CAPTURE_OPTIONS = ("leaf_modules", "concrete_args", "frontend")
_PIPELINE_OPTIONS = _CAPTURE_OPTIONS + ("data", "loss_fn", "report")


def _fingerprint(gm: torch.fx.GraphModule) -> int:
    return hash(str(gm.graph))


class FxprunePass(PassBase):
    """fxprune as a ``torch.fx`` ``PassBase``; build it with :func:`as_fx_pass`.

    ``passes`` None: :func:`fxprune.prune` with ``options``. Otherwise a
    :class:`~fxprune.Pipeline`, pipeline text or pass (or a sequence of passes), run
    on the state an earlier fxprune pass left for the GraphModule, or on a fresh
    capture of it (``options``: ``frontend``, ``leaf_modules``, ``concrete_args``,
    ``data``, ``loss_fn``, ``report``)."""

    def __init__(self, passes: Pass | Pipeline | str | Sequence[Pass] | None, example_inputs: Any, **options: Any):
        super().__init__()
        self.example_inputs = as_tuple(example_inputs)
        self.options = dict(options)
        self.result = None
        if passes is None:
            self.pipeline = None
            from .api import prune
            import inspect

            known = set(inspect.signature(prune).parameters) - {"model", "example_inputs"}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ConfigError(f"as_fx_pass: {', '.join(unknown)} are not options of fxprune.prune; "
                                  f"its options are {', '.join(sorted(known))}")
            return
        if isinstance(passes, str):
            self.pipeline = parse_pipeline(passes)
        elif isinstance(passes, Pipeline):
            self.pipeline = passes
        elif isinstance(passes, Pass):
            self.pipeline = Pipeline((passes,))
        elif isinstance(passes, Sequence) and all(isinstance(p, Pass) for p in passes):
            self.pipeline = Pipeline(tuple(passes))
        else:
            raise ConfigError(f"as_fx_pass: passes must be None (a whole prune), pipeline text, a Pipeline or "
                              f"fxprune passes, got {type(passes).__name__}")
        unknown = sorted(set(options) - set(_PIPELINE_OPTIONS))
        if unknown:
            raise ConfigError(f"as_fx_pass: {', '.join(unknown)} cannot be given with a pipeline (options: "
                              f"{', '.join(_PIPELINE_OPTIONS)}); write pass options into the pipeline "
                              f"(select{{ratio=0.5}}), or pass passes=None for fxprune.prune's options")

    @property
    def name(self) -> str:
        return f"fxprune[{self.pipeline}]" if self.pipeline is not None else "fxprune[prune]"

    def __repr__(self) -> str:
        return f"FxprunePass({self.pipeline if self.pipeline is not None else 'prune'!s})"

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise ConfigError(f"{self.name}: a pass takes a torch.fx.GraphModule, got "
                              f"{type(graph_module).__name__}; trace the model first (fxprune.trace)")

    def inputs_for(self, gm: torch.fx.GraphModule) -> tuple:
        """The example inputs of ``gm``: those given, or, for a GraphModule an fxprune pass
        made, those it takes."""
        return _INPUTS.get(gm, self.example_inputs)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        inputs = self.inputs_for(graph_module)
        if self.pipeline is None:
            from .api import prune

            result = prune(graph_module, inputs, **self.options)
            return self._done(graph_module, result, inputs)
        state = self._state(graph_module, inputs)
        passes = self.pipeline.passes
        if state.gm is None and not any(p.name == "capture" for p in passes):
            from .capture import Capture

            capture = Capture(tuple(self.options.get("leaf_modules", ())), self.options.get("concrete_args"),
                              self.options.get("frontend", "auto"))
            passes = (capture, *passes)
        passes = tuple(self._with_data(p) for p in passes)
        rewrites = any("module" in getattr(p, "produces", ()) for p in passes)
        if rewrites:
            state = state.replace(module=None)
        state = Pipeline(passes).run(state)
        if not rewrites:
            _STATES[graph_module] = (_fingerprint(graph_module), state)
            return PassResult(graph_module, False)
        result = self._result(graph_module, state, inputs)
        _STATES.pop(graph_module, None)
        return self._done(graph_module, result, inputs)

    def _with_data(self, p: Pass) -> Pass:
        import dataclasses

        extra = {k: self.options[k] for k in ("data", "loss_fn") if self.options.get(k) is not None}
        fields = {f.name for f in dataclasses.fields(p)}
        take = {k: v for k, v in extra.items() if k in fields}
        return dataclasses.replace(p, **take) if take else p

    def _state(self, gm: torch.fx.GraphModule, inputs: tuple) -> PruneState:
        held = _STATES.get(gm)
        if held is not None and held[0] == _fingerprint(gm):
            return held[1]
        return PruneState(model=gm, example_inputs=inputs)

    def _result(self, gm: torch.fx.GraphModule, state: PruneState, inputs: tuple):
        from .api import PruneResult, prune_report

        if state.plan is None or state.groups is None:
            raise ConfigError(f"{self.name}: the pipeline rewrote no plan; run channel-deps, a scoring pass "
                              f"and select before rewrite")
        rep = prune_report(gm, state, inputs) if self.options.get("report", True) else None
        return PruneResult(state.module, rep, state.groups, state.plan, state.scores, state.timings,
                           str(Pipeline(tuple(p for p in self.pipeline.passes))), state.frontend)

    def _done(self, gm: torch.fx.GraphModule, result: Any, inputs: tuple) -> PassResult:
        from .meta import graph_inputs

        self.result = result
        modified = result.plan.n_removed > 0
        if not modified:
            return PassResult(gm, False)
        groups_gm = result.stages[0].groups.gm if getattr(result, "stages", ()) else result.groups.gm
        _INPUTS[result.module] = graph_inputs(groups_gm, inputs)
        return PassResult(result.module, True)


def as_fx_pass(passes: Pass | Pipeline | str | Sequence[Pass] | None, example_inputs: Any,
               **options: Any) -> FxprunePass:
    """fxprune as a ``torch.fx.passes.infra.pass_base.PassBase`` (see the module doc).

    Examples
    --------
    >>> import torch, fxprune
    >>> from fxprune.interop import as_fx_pass
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm, x = torch.fx.symbolic_trace(net), torch.randn(3, 4)
    >>> res = as_fx_pass(None, x, ratio=0.5)(gm)
    >>> res.modified, res.graph_module.get_submodule("0").out_features
    (True, 4)
    >>> as_fx_pass("channel-deps", x)(gm).modified
    False
    """
    return FxprunePass(passes, example_inputs, **options)


def fx_passes(pipeline: str | Pipeline, example_inputs: Any, **options: Any) -> list[FxprunePass]:
    """One ``PassBase`` per pass of ``pipeline``, for a ``torch.fx`` ``PassManager``."""
    pipe = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    if not isinstance(pipe, Pipeline):
        raise ConfigError(f"fx_passes: pipeline must be text or a Pipeline, got {type(pipeline).__name__}")
    return [FxprunePass(p, example_inputs, **options) for p in pipe.passes]


# -- torch.export ---------------------------------------------------------------------
def _dynamic_shapes(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> Any:
    """The ``dynamic_shapes`` of ``ep``'s user inputs: a ``Dim`` (its range from the range
    constraints) for each dim that is a plain symbol, ``Dim.AUTO`` for one computed from
    symbols; None when every size is static."""
    from torch.export import Dim

    names = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if len(vals) != len(leaves):
        return None
    dims: dict[str, Any] = {}
    out, dynamic = [], False
    for val in vals:
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        leaf: dict[int, Any] = {}
        for i, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            dynamic = True
            expr = size.node.expr
            if not expr.is_Symbol:
                leaf[i] = Dim.AUTO
                continue
            name = str(expr)
            if name not in dims:
                rng = ep.range_constraints.get(expr)
                lower, upper = (None, None) if rng is None else (rng.lower, rng.upper)
                bounds = {}
                try:
                    bounds["min"] = int(lower)
                except (TypeError, ValueError, OverflowError):
                    pass
                try:
                    bounds["max"] = int(upper)
                except (TypeError, ValueError, OverflowError):
                    pass
                dims[name] = Dim(f"d_{name}", **bounds)
            leaf[i] = dims[name]
        out.append(leaf or None)
    if not dynamic:
        return None
    shapes_args, shapes_kwargs = pytree.tree_unflatten(out, spec)
    return shapes_args if not kwargs else {**dict(zip(range(len(args)), shapes_args)), **shapes_kwargs}


def prune_exported(ep: torch.export.ExportedProgram, example_inputs: Any = None, *, dynamic_shapes: Any = "keep",
                   strict: bool = False, return_result: bool = False, **prune_options: Any):
    """Prune an ``ExportedProgram``; return a new ``ExportedProgram`` of the pruned model.

    Parameters
    ----------
    ep : the program; not modified.
    example_inputs : positional example inputs (default: those ``ep`` was exported with,
        ``ep.example_inputs``).
    dynamic_shapes : ``"keep"`` (default): the dynamic dims of ``ep`` with their ranges;
        None: all static; or a ``dynamic_shapes`` spec for ``torch.export.export``.
    strict : passed to ``torch.export.export`` for the re-export.
    return_result : also return the :class:`fxprune.PruneResult` (``(program, result)``),
        for ``fxprune.verify(ep.module(), result, x)``.
    prune_options : :func:`fxprune.prune`'s options (``ratio``, ``importance``, ...).

    Examples
    --------
    >>> import torch, fxprune
    >>> from fxprune.interop import prune_exported
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    >>> ep = torch.export.export(net, (torch.randn(3, 4),))
    >>> small = prune_exported(ep, ratio=0.5)
    >>> small.state_dict["0.weight"].shape
    torch.Size([4, 4])
    """
    from .api import prune

    if not isinstance(ep, torch.export.ExportedProgram):
        raise ConfigError(f"prune_exported: ep must be a torch.export.ExportedProgram, got {type(ep).__name__}; "
                          f"prune a module with fxprune.prune")
    kwargs: dict = {}
    if example_inputs is None:
        if ep.example_inputs is None:
            raise InputError("prune_exported: this ExportedProgram holds no example inputs (a loaded one may "
                             "not); pass example_inputs=(...) as given to torch.export.export")
        args, kwargs = ep.example_inputs
    else:
        args = as_tuple(example_inputs)
    if kwargs:
        raise InputError(f"prune_exported: the program was exported with keyword inputs ({', '.join(kwargs)}); "
                         f"fxprune takes positional inputs: export with them positional, or pass "
                         f"example_inputs=(...) that the program takes positionally")
    args = tuple(args)
    if dynamic_shapes == "keep":
        dynamic_shapes = _dynamic_shapes(ep, args, {})
    module = ep.module()
    result = prune(module, args, **prune_options)
    pruned = result.module
    try:
        new_ep = torch.export.export(pruned, args, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # noqa: BLE001 (torch.export raises many kinds)
        raise FxpruneError(f"prune_exported: the pruned model did not export again ({type(exc).__name__}: "
                           f"{str(exc)[:500]}); pass dynamic_shapes=None (static) or a spec of your own, or "
                           f"export fxprune.prune(ep.module(), x).module yourself") from exc
    with torch.no_grad():
        want, got = pruned(*args), new_ep.module()(*args)
    for a, b in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)):
        if isinstance(a, torch.Tensor) and not (a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)):
            raise VerificationError("prune_exported: the exported pruned program computes other outputs than the "
                                    "pruned module; this is a bug, please report it with the model")
    return (new_ep, result) if return_result else new_ep
