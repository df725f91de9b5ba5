"""fxprune as a ``torch.compile`` backend.

``torch.compile(model, backend="fxprune")`` (registered through the
``torch_dynamo_backends`` entry point: no import of fxprune needed) prunes every
graph Dynamo hands over and passes the smaller graph on to another backend
(``then``, default ``"inductor"``)::

    compiled = torch.compile(model, backend="fxprune")                         # lossless
    compiled = torch.compile(model, backend="fxprune", options={"ratio": 0.5})  # prune half
    compiled = torch.compile(model, backend=fxprune.backend(ratio=0.5, importance="l1", then="eager"))

Default mode: lossless dead-channel elimination (``fxprune.dead_channels``), the
outputs unchanged. Pruning mode (``ratio=``, ``target_macs=``, ``target_params=``
or ``pipeline=``): :func:`fxprune.prune` with those options.

Dynamo gives the backend each graph with the module's parameters and buffers as
placeholders (inlined ``nn`` modules) and real example inputs. The backend treats
them as frozen constants, for inference: they become constants of a new
GraphModule, which is pruned; the callable returned takes the same arguments as
Dynamo's graph, passes the model's inputs on and leaves the parameter arguments
aside (the pruned constants are closed over). When those parameters change after
the compile (an optimizer step, ``load_state_dict``), the callable notices (their
identity and version counters) and runs the original graph instead, with a
warning: compile again (``torch.compiler.reset()``) to prune the new weights.

Each graph of a model with graph breaks is pruned on its own; its inputs and
outputs (the values that cross a break) keep their channels, as fxprune keeps a
model's inputs and outputs. The same graph and weights always give the same plan.

A graph the backend does not prune (gradients required, training mode, a buffer
updated in place, dynamic shapes, nothing to remove, a check that fails) is logged
(logger ``fxprune.backend``) and handed to ``then`` unpruned, never run pruned with a
different result; ``strict=True`` raises instead.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, FxpruneError, VerificationError

logger = logging.getLogger("fxprune.backend")

__all__ = ["CompiledGraph", "FxpruneBackend", "backend", "fxprune_backend", "BACKEND_OPTIONS"]

# options forwarded to fxprune.prune in pruning mode
PRUNE_OPTIONS = ("ratio", "importance", "global_ranking", "max_ratio", "isomorphic", "round_to",
                 "target_macs", "target_params", "policy", "gqa", "pipeline")
# options that select pruning mode (the others only tune it)
_PRUNING_MODE = ("ratio", "target_macs", "target_params", "pipeline")
BACKEND_OPTIONS = PRUNE_OPTIONS + ("then", "then_options", "verify", "strict", "check_weights", "rtol",
                                   "lossless_options")


class _Refused(Exception):
    """Why a graph is compiled unpruned (logged, or raised with ``strict=True``)."""


@dataclass(eq=False)
class CompiledGraph:
    """What the backend did with one graph Dynamo handed it.

    ``graph`` is Dynamo's graph with the parameters and buffers made constants
    (``None`` when the graph was refused before that), ``example_inputs`` the inputs
    it takes (Dynamo's example inputs less the parameters), ``result`` the
    :class:`fxprune.PruneResult` (lossless or pruning mode), ``module`` the GraphModule
    handed to ``then`` (the pruned one, or Dynamo's own graph when ``reason`` says why
    it was not pruned), ``verify`` the oracle's :class:`fxprune.VerifyResult`.
    ``params_before``/``params_after`` count the elements of the constants (parameters
    and buffers) of ``graph`` and of the module handed on."""

    index: int
    mode: str
    graph: torch.fx.GraphModule | None = None
    example_inputs: tuple = ()
    result: Any = None
    module: torch.nn.Module | None = None
    reason: str | None = None
    verify: Any = None
    params_before: int = 0
    params_after: int = 0

    @property
    def pruned(self) -> bool:
        """Whether a smaller graph was handed on."""
        return self.reason is None and self.params_after < self.params_before

    def __repr__(self) -> str:
        what = (f"pruned, {self.params_before} -> {self.params_after} constant elements" if self.pruned
                else f"unpruned ({self.reason})")
        return f"CompiledGraph({self.index}, {self.mode}: {what})"


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(f"fxprune backend: unknown option(s) {', '.join(map(repr, unknown))}; the options "
                          f"are {', '.join(BACKEND_OPTIONS)} (torch.compile(..., backend='fxprune', "
                          f"options={{'ratio': 0.5}}) or fxprune.backend(ratio=0.5))")
    opts = dict(options)
    if "ratio" in opts and opts["ratio"] is not None:
        from .plan import check_ratio
        check_ratio(opts["ratio"])
    pruning = any(opts.get(k) is not None for k in _PRUNING_MODE)
    if not pruning:
        tuning = sorted(k for k in PRUNE_OPTIONS if opts.get(k) is not None)
        if tuning:
            raise ConfigError(f"fxprune backend: {', '.join(tuning)} tune pruning mode, which needs ratio= "
                              f"(or target_macs=, target_params=, pipeline=); without one the backend "
                              f"runs lossless dead-channel elimination only. Fix: add ratio=0.5, say")
    elif opts.get("lossless_options"):
        raise ConfigError("fxprune backend: lossless_options are for the default (lossless) mode; "
                          "drop them or drop ratio/target_macs/target_params/pipeline")
    for key in ("verify", "strict", "check_weights"):
        if key in opts and not isinstance(opts[key], bool):
            raise ConfigError(f"fxprune backend: {key} must be True or False, got {opts[key]!r}")
    for key in ("then_options", "lossless_options"):
        if opts.get(key) is not None and not isinstance(opts[key], Mapping):
            raise ConfigError(f"fxprune backend: {key} must be a dict, got {type(opts[key]).__name__}")
    rtol = opts.get("rtol", 1e-4)
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not 0 < rtol < 1:
        raise ConfigError(f"fxprune backend: rtol must be a number in (0, 1), got {rtol!r} (the largest "
                          f"error allowed between pruned and original outputs, relative to their scale)")
    _then_compiler(opts.get("then", "inductor"), opts.get("then_options"), None)  # fails early if unknown
    return opts


def _then_compiler(then: Any, then_options: Mapping | None, mode: str | None) -> Callable:
    """The backend the pruned graph is handed to: a registered name or a callable."""
    if callable(then) and not isinstance(then, str):
        return functools.partial(then, **dict(then_options)) if then_options else then
    if not isinstance(then, str):
        raise ConfigError(f"fxprune backend: then must be a backend name ('inductor', 'eager', ...) or a "
                          f"callable, got {type(then).__name__}")
    if then == "fxprune":
        raise ConfigError("fxprune backend: then='fxprune' would prune forever; name the backend that "
                          "compiles the pruned graph ('inductor', 'eager', ...)")
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    if then == "inductor" and (then_options or mode):
        return torch._TorchCompileInductorWrapper(mode, dict(then_options or {}), None)
    try:
        fn = lookup_backend(then)
    except Exception as exc:  # torch._dynamo.exc.InvalidBackend
        raise ConfigError(f"fxprune backend: then={then!r} is not a torch.compile backend; registered "
                          f"ones: {', '.join(list_backends(exclude_tags=()))}") from exc
    return functools.partial(fn, options=dict(then_options)) if then_options else fn


# -- parameters and buffers of Dynamo's graph -------------------------------------
def _state_source(node: torch.fx.Node) -> str | None:
    """The module attribute path of a placeholder Dynamo fed with a parameter or buffer
    (``layer1.0.conv1.weight``), or None for a model input."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    names, is_state = [], False
    while source is not None:
        member = getattr(source, "member", None)
        index = getattr(source, "index", None)
        if member in ("_parameters", "_buffers") or type(source).__name__ == "ParamBufferSource":
            is_state = True
            if type(source).__name__ == "ParamBufferSource" and isinstance(member, str):
                names.append(member)
        elif isinstance(index, str):
            names.append(index)
        elif isinstance(member, str) and member != "_modules":
            names.append(member)
        source = getattr(source, "base", None)
    if not is_state:
        return None
    return ".".join(reversed(names)) or node.name


def _attr_path(path: str, taken: set[str]) -> str:
    """``path`` as a get_attr target (its segments identifiers or digits), made unique:
    no name in ``taken`` is it, or a module path above it, or below it."""
    parts = [re.sub(r"\W", "_", p) or "_" for p in path.split(".")]

    def clashes(name: str) -> bool:
        segs = name.split(".")
        above = (".".join(segs[:k]) for k in range(1, len(segs)))
        return name in taken or ("." + name) in taken or any(a in taken for a in above)

    name, i = ".".join(parts), 1
    while clashes(name):
        name, i = ".".join(parts[:-1] + [f"{parts[-1]}_{i}"]), i + 1
    taken.add(name)
    segs = name.split(".")
    taken.update("." + ".".join(segs[:k]) for k in range(1, len(segs)))  # module paths, marked with "."
    return name


def freeze(gm: torch.fx.GraphModule, example_inputs: tuple) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """Dynamo's graph with the placeholders fed with parameters and buffers made constants.

    Returns the new GraphModule (it holds the same tensors: nothing is copied, and
    neither ``gm`` nor the tensors are modified) and the positions of the arguments it
    still takes (the model's inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Refused(f"Dynamo gave {len(example_inputs)} example inputs for {len(placeholders)} placeholders")
    root, graph, env = nn.Module(), torch.fx.Graph(), {}
    taken: set[str] = set()
    kept: list[int] = []
    values = dict(zip(placeholders, example_inputs))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = values[node]
            path = _state_source(node)
            if path is None and isinstance(value, nn.Parameter):
                path = node.name
            if path is not None and isinstance(value, torch.Tensor):
                name = _attr_path(path, taken)  # the model's own names: layer1.0.bn1.weight
                _set_attr(root, name, value)
                env[node] = graph.get_attr(name)
            else:
                kept.append(placeholders.index(node))
                env[node] = graph.placeholder(node.name)
            env[node].meta = {k: v for k, v in node.meta.items() if k != "grapharg"}
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    for name, sub in gm.named_children():  # modules Dynamo did not inline
        if hasattr(root, name):
            raise _Refused(f"the graph's module {name!r} has the name of a parameter path")
        root.add_module(name, sub)
    for name, value in vars(gm).items():  # tensor constants Dynamo made get_attrs of
        if name.startswith("_tensor_constant") and isinstance(value, torch.Tensor):
            setattr(root, name, value)
    for node in graph.nodes:  # get_attr targets of gm (non-inlined modules, constants)
        if node.op == "get_attr" and not _has_attr(root, node.target):
            _set_attr(root, node.target, _get_attr(gm, node.target))
    frozen = torch.fx.GraphModule(root, graph, "FrozenGraph")
    return frozen, tuple(kept)


def _get_attr(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_attr(obj: Any, target: str) -> bool:
    try:
        _get_attr(obj, target)
    except AttributeError:
        return False
    return True


def _set_attr(root: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(last, value)
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        mod.register_buffer(last, value)
    else:
        setattr(mod, last, value)


# -- what the backend refuses -------------------------------------------------------
_TRAINING_ARG = {"batch_norm": "training", "dropout": "training", "dropout1d": "training",
                 "dropout2d": "training", "dropout3d": "training", "alpha_dropout": "training",
                 "feature_alpha_dropout": "training", "rrelu": "training"}


def _training_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """A node that runs in training mode (dropout, batch statistics that update running
    ones), if any."""
    from torch.fx.operator_schemas import normalize_function

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if name not in _TRAINING_ARG and name != "native_dropout" and not name.startswith(("bernoulli", "rand")):
            continue
        if name.startswith(("bernoulli", "rand")) or name == "native_dropout":
            return node
        try:
            norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 (a signature torch cannot match: judge it by its defaults)
            norm = None
        kwargs = norm.kwargs if norm is not None else node.kwargs
        training = kwargs.get(_TRAINING_ARG[name], kwargs.get("train", False))
        if name == "batch_norm" and norm is not None and kwargs.get("running_mean") is None \
                and kwargs.get("running_var") is None:
            continue  # no statistics to update: a normalization by the batch's own (weight standardization)
        if training is not False:
            return node
    return None


def _mutated_constant(frozen: torch.fx.GraphModule) -> torch.fx.Node | None:
    """A node that writes into a parameter or buffer (an in-place op on it)."""
    for const in frozen.graph.nodes:
        if const.op != "get_attr":
            continue
        for user in const.users:
            name = (user.target if user.op == "call_method" else getattr(user.target, "__name__", ""))
            inplace = isinstance(name, str) and name.endswith("_") and not name.endswith("__")
            if (inplace and user.args and user.args[0] is const) or user.kwargs.get("out") is const:
                return user
            if getattr(user.target, "__name__", "") in ("setitem", "copy_") and user.args and user.args[0] is const:
                return user
    return None


def _symbolic(example_inputs: tuple) -> bool:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    for v in example_inputs:
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(v, torch.Tensor) and not all(is_concrete_int(s) for s in v.shape):
            return True
    return False


def _placeholder_dynamic(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced ``gm`` with symbolic sizes (a recompile after a size changed)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape):
            return True
    return False


def _constant_elements(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _flat_tensors(out: Any) -> list:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(reference: Any, got: Any, rtol: float, *, values: bool) -> str | None:
    """Why ``got`` cannot stand in for ``reference`` (None when it can): the same
    structure, shapes and dtypes, and, with ``values``, the same values to ``rtol`` of
    their scale."""
    ref, out = _flat_tensors(reference), _flat_tensors(got)
    if len(ref) != len(out):
        return f"the pruned graph returns {len(out)} tensors, the original {len(ref)}"
    for i, (a, b) in enumerate(zip(ref, out)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return (f"output {i} is {tuple(b.shape)} {b.dtype} after pruning, {tuple(a.shape)} {a.dtype} "
                    f"before: a channel that crosses the graph's boundary was removed")
        if values and a.is_floating_point() and a.numel():
            scale = float(a.detach().double().abs().max())
            err = float((a.detach().double() - b.detach().double()).abs().max())
            if not math.isfinite(err) or err > rtol * max(scale, 1e-12):
                return f"output {i} differs by {err:.3g} (scale {scale:.3g}) from the original graph's"
        elif values and not a.is_floating_point() and not torch.equal(a, b):
            return f"output {i} ({a.dtype}) differs from the original graph's"
    return None


# -- the backend ----------------------------------------------------------------------
class FxpruneBackend:
    """A ``torch.compile`` backend that prunes each graph, then compiles it with ``then``.

    Build it with :func:`fxprune.backend`. ``records`` holds a :class:`CompiledGraph`
    per graph compiled; ``reset()`` clears it, and ``torch.compiler.reset()`` calls
    ``reset()`` of the backends Dynamo holds."""

    def __init__(self, **options: Any):
        self.options = _check_options(options)
        self.records: list[CompiledGraph] = []

    @property
    def mode(self) -> str:
        return "prune" if any(self.options.get(k) is not None for k in _PRUNING_MODE) else "lossless"

    def reset(self) -> None:
        self.records.clear()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"fxprune.backend({opts})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, *, options: Mapping | None = None,
                 mode: str | None = None, **unknown: Any) -> Callable:
        if unknown:
            raise ConfigError(f"fxprune backend: torch.compile passed {', '.join(unknown)}, which this backend "
                              f"does not take; pass fxprune's options as options={{...}}")
        if options:  # torch.compile(..., backend=fxprune.backend(...), options={...}): those win
            return FxpruneBackend(**{**self.options, **options})._compile(gm, example_inputs, mode, self.records)
        return self._compile(gm, example_inputs, mode, self.records)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list, torch_mode: str | None,
                 records: list) -> Callable:
        opts = self.options
        then = _then_compiler(opts.get("then", "inductor"), opts.get("then_options"), torch_mode)
        inputs = tuple(example_inputs)
        record = CompiledGraph(index=len(records), mode=self.mode)
        records.append(record)
        try:
            frozen, kept = self._prepare(gm, inputs)
            record.graph, record.example_inputs = frozen, tuple(inputs[i] for i in kept)
            module = self._prune(frozen, record)
        except _Refused as why:
            return self._unpruned(gm, inputs, then, record, str(why))
        except Exception as exc:  # a bug or an unsupported graph: never a wrong result
            if opts.get("strict", False):
                raise
            kind = "" if isinstance(exc, FxpruneError) else " (please report it)"
            return self._unpruned(gm, inputs, then, record, f"{type(exc).__name__}: {exc}{kind}")
        record.module = module
        record.params_before = _constant_elements(frozen)
        record.params_after = _constant_elements(module)
        logger.info("fxprune backend: graph %d (%s) pruned: %d -> %d constant elements; compiling it with %s",
                    record.index, record.mode, record.params_before, record.params_after,
                    getattr(then, "__name__", then))
        compiled = then(module, list(record.example_inputs))
        return _PrunedCall(compiled, gm, kept, inputs if opts.get("check_weights", True) else None)

    def _prepare(self, gm: torch.fx.GraphModule, inputs: tuple) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
        if _symbolic(inputs) or _placeholder_dynamic(gm):
            raise _Refused("Dynamo traced this graph with dynamic shapes (a recompile after an input size "
                           "changed); compile with torch.compile(..., dynamic=False) to prune every size")
        node = _training_node(gm)
        if node is not None:
            raise _Refused(f"the graph runs in training mode (node {node.format_node()}); call model.eval() "
                           f"before compiling: the backend prunes for inference")
        frozen, kept = freeze(gm, inputs)
        state = [inputs[i] for i in range(len(inputs)) if i not in kept]
        if torch.is_grad_enabled() and any(t.requires_grad for t in state):
            raise _Refused("gradients are required (grad mode is on and the parameters require grad); the "
                           "backend prunes for inference: run under torch.no_grad() or torch.inference_mode(), "
                           "or call model.requires_grad_(False)")
        node = _mutated_constant(frozen)
        if node is not None:
            raise _Refused(f"the graph writes into a parameter or buffer (node {node.format_node()}); the "
                           f"backend freezes them")
        return frozen, kept

    def _prune(self, frozen: torch.fx.GraphModule, record: CompiledGraph) -> torch.fx.GraphModule:
        opts, inputs = self.options, record.example_inputs
        with torch.no_grad():
            if self.mode == "prune":
                from .api import prune

                kwargs = {k: opts[k] for k in PRUNE_OPTIONS if opts.get(k) is not None}
                result = prune(frozen, inputs, report=False, **kwargs)
            else:
                try:
                    from .dead_channels import eliminate_dead_channels
                except ImportError as exc:
                    raise _Refused("lossless mode needs fxprune.dead_channels, which this installation "
                                   "lacks; pass ratio= for pruning mode") from exc
                result = eliminate_dead_channels(frozen, inputs, **dict(opts.get("lossless_options") or {}))
        record.result = result
        if result.plan.n_removed == 0:
            raise _Refused("nothing to remove: no channel of this graph is "
                           + ("dead" if self.mode == "lossless" else "prunable (all are pinned or kept)"))
        module = result.module
        with torch.no_grad():
            reference = frozen(*inputs)
            got = module(*inputs)
        why = _compare(reference, got, opts.get("rtol", 1e-4), values=self.mode == "lossless")
        if why is not None:
            raise _Refused(why)
        if opts.get("verify", True):
            record.verify = self._oracle(frozen, result, inputs)
        return module

    def _oracle(self, frozen: torch.fx.GraphModule, result: Any, inputs: tuple) -> Any:
        from .errors import DegenerateReferenceError
        from .verify import verify

        try:
            return verify(frozen, result, inputs)
        except DegenerateReferenceError as exc:  # nothing to compare on these inputs: say so, keep it
            logger.warning("fxprune backend: the oracle could not check graph: %s", exc)
            return None
        except VerificationError as exc:
            raise _Refused(f"the oracle rejected the pruned graph: {exc}") from exc

    def _unpruned(self, gm: torch.fx.GraphModule, inputs: tuple, then: Callable, record: CompiledGraph,
                  reason: str) -> Callable:
        if self.options.get("strict", False):
            raise ConfigError(f"fxprune backend (strict=True): graph {record.index} cannot be pruned: {reason}")
        record.reason, record.module = reason, gm
        record.params_before = record.params_after = (0 if record.graph is None
                                                      else _constant_elements(record.graph))
        level = logging.INFO if reason.startswith("nothing to remove") else logging.WARNING
        logger.log(level, "fxprune backend: graph %d compiled unpruned: %s", record.index, reason)
        return then(gm, list(inputs))


class _PrunedCall:
    """The callable Dynamo runs: takes the graph's arguments, passes the model's inputs to
    the compiled pruned graph. With ``state`` given, it checks that the parameters and
    buffers are those pruned (same objects, no in-place change since) and runs the
    original graph otherwise."""

    def __init__(self, compiled: Callable, original: torch.fx.GraphModule, kept: tuple[int, ...],
                 inputs: tuple | None):
        self.compiled, self.original, self.kept = compiled, original, kept
        self.n_args = None if inputs is None else len(inputs)
        if inputs is not None:
            kept_set = set(kept)
            self.state_idx = tuple(i for i in range(len(inputs)) if i not in kept_set)
            self.state_ids = tuple(id(inputs[i]) for i in self.state_idx)
            self.state_versions = tuple(_version(inputs[i]) for i in self.state_idx)
        self.stale = False

    def __call__(self, *args: Any) -> Any:
        if self.n_args is not None and not self.stale:
            state = [args[i] for i in self.state_idx]
            if (tuple(map(id, state)) != self.state_ids
                    or tuple(map(_version, state)) != self.state_versions):
                self.stale = True
                logger.warning("fxprune backend: the parameters changed since the graph was pruned; running "
                               "the original graph from now on (call torch.compiler.reset() to prune again)")
        if self.stale:
            return self.original(*args)
        return self.compiled(*[args[i] for i in self.kept])


def _version(t: Any) -> int:
    try:
        return t._version
    except (AttributeError, RuntimeError):  # inference tensors have no version counter
        return -1


def backend(**options: Any) -> FxpruneBackend:
    """A ``torch.compile`` backend that prunes with these options, then compiles with ``then``.

    Parameters
    ----------
    ratio, target_macs, target_params, pipeline : pruning mode: :func:`fxprune.prune`
        with these (and ``importance``, ``global_ranking``, ``max_ratio``,
        ``isomorphic``, ``round_to``, ``policy``, ``gqa``). Without any: lossless
        dead-channel elimination, outputs unchanged (``lossless_options`` are passed
        on to it).
    then : the backend that compiles the pruned graph: ``"inductor"`` (default),
        ``"eager"``, any registered name, or a callable ``(gm, example_inputs)``;
        ``then_options`` are its options.
    verify : run the oracle (:func:`fxprune.verify`) on every pruned graph (default True).
    rtol : in lossless mode the pruned graph's outputs must equal the original's to
        this fraction of their scale (default 1e-4) on Dynamo's example inputs.
    strict : raise where a graph cannot be pruned, instead of compiling it unpruned.
    check_weights : run the original graph when the parameters changed after the
        compile (default True).

    Examples
    --------
    >>> import torch, fxprune
    >>> be = fxprune.backend(ratio=0.5, then="eager")
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    >>> with torch.no_grad():
    ...     y = torch.compile(net, backend=be)(torch.randn(2, 8))
    >>> be.records[0].params_before, be.records[0].params_after
    (212, 108)
    """
    return FxpruneBackend(**options)


def fxprune_backend(gm: torch.fx.GraphModule, example_inputs: list, *, options: Mapping | None = None,
                    mode: str | None = None, **unknown: Any) -> Callable:
    """The backend registered as ``"fxprune"`` (entry point ``torch_dynamo_backends``):
    ``torch.compile(model, backend="fxprune", options={...})``; see :func:`backend`."""
    return FxpruneBackend(**dict(options or {}))(gm, example_inputs, mode=mode, **unknown)
