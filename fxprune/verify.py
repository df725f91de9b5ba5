"""The oracle: proof on example data that pruning removed nothing but the pruned
channels.

The reference is the captured original graph run with the plan's removed channels
absent: every linear consumer of a removed channel (conv/linear weight columns, a
sum over channels) sees it as zero, and every op that mixes the values of a
channel dim (norm statistics, softmax, mean, variance, max) is evaluated on the
kept positions only, through its rule's masked semantics (``fxprune.masked``).
``result.module`` itself, the model the user gets, must equal that reference.

Both run in float64 copies (weights, inputs and the dtype constants of the
graph promoted), so the check is the same for float32, float16, bfloat16 and
mixed-dtype models, and its tolerance is far below what any perturbation of a
weight gives. An op whose mixing has no masked semantics is the one exception:
a plan that removes its channels is checked with those groups kept, and the
result names them (``VerifyResult.unchecked``). A degenerate reference (near-zero
or constant outputs, which any comparison would pass) is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

from ._util import as_tuple, mutable_args
from .errors import DegenerateReferenceError, VerificationError
from .labels import channel_dim
from .masked import MaskedCall
from .meta import graph_inputs, tensor_meta

__all__ = ["VerifyResult", "verify", "masked_reference", "as_float64"]

DEFAULT_RTOL = 1e-6  # relative to the reference's scale, both computed in float64


@dataclass(frozen=True)
class VerifyResult:
    """What the oracle measured.

    ``max_rel_err``: max |pruned - reference| / max |reference|; ``effect``: how much
    removing the channels changed the output on the same scale (an effect of 0 proves
    nothing); ``groups_removed`` / ``channels_removed``: what the plan removes;
    ``groups_checked`` / ``channels_checked``: how much of it the comparison covered
    (all of it unless ``unchecked`` names groups whose mixing op has no masked
    semantics); ``precision``: the dtype both sides were computed in;
    ``exact_groups`` / ``inexact_groups``: removed groups without / with a mixing op.
    """

    max_rel_err: float
    effect: float
    scale: float
    exact_groups: int
    inexact_groups: int
    channels_checked: int
    groups_removed: int = 0
    groups_checked: int = 0
    channels_removed: int = 0
    unchecked: tuple[str, ...] = ()
    precision: str = "float64"

    @property
    def complete(self) -> bool:
        """Whether every removed channel was checked."""
        return self.groups_checked == self.groups_removed and self.channels_checked == self.channels_removed

    def summary(self) -> str:
        """One line: how much was checked and the error."""
        text = (f"checked {self.groups_checked}/{self.groups_removed} groups, {self.channels_checked}/"
                f"{self.channels_removed} removed channels, max rel. error {self.max_rel_err:.3g} "
                f"({self.precision})")
        if self.unchecked:
            text += f"; not checked: {'; '.join(self.unchecked)}"
        return text


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


# -- float64 copies -----------------------------------------------------------------
_HIGH = {torch.float16: torch.float64, torch.bfloat16: torch.float64, torch.float32: torch.float64,
         torch.complex32: torch.complex128, torch.complex64: torch.complex128}
_CASTS = {"float": "double", "half": "double", "bfloat16": "double"}


def _promote_value(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return _HIGH.get(v, v)
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64:
        return v.double()
    return v


def as_float64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` computing in float64: floating parameters, buffers and tensor
    constants promoted, and so are the float dtypes the graph names (``x.to(torch.bfloat16)``,
    ``x.half()``, ``dtype=torch.float32``), so a mixed-precision graph keeps its structure
    and loses only its rounding. ``gm`` is not modified."""
    # the copy is made with float64 tensors in place of the floating parameters and buffers
    # (deepcopy's memo), never holding a second full-precision copy of a large model
    memo: dict[int, Any] = {}
    for t in (*gm.parameters(), *gm.buffers()):
        if t.is_floating_point() and t.dtype != torch.float64 and id(t) not in memo:
            wide = t.detach().to(torch.float64)
            memo[id(t)] = torch.nn.Parameter(wide, t.requires_grad) if isinstance(t, torch.nn.Parameter) else wide
    out = copy.deepcopy(gm, memo)
    out.to(torch.float64)
    for node in out.graph.nodes:
        node.args = map_aggregate(node.args, _promote_value)
        node.kwargs = map_aggregate(node.kwargs, _promote_value)
        if node.op == "call_method" and node.target in _CASTS:
            node.target = _CASTS[node.target]
        elif node.op == "get_attr":
            *parents, name = node.target.split(".")
            owner = out.get_submodule(".".join(parents))
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
                    and name not in owner._parameters and name not in owner._buffers:
                setattr(owner, name, value.double())  # a plain tensor attribute (Module.to skips it)
    out.recompile()
    return out


def _promote_inputs(inputs: tuple) -> tuple:
    import torch.utils._pytree as pytree

    return tuple(pytree.tree_map(lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                 else v, list(inputs)))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Factories without a dtype (``torch.zeros(n)``) make ``dtype`` while this is active."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# -- the masked reference ---------------------------------------------------------------
def _arg_key(pos: int | str | tuple[int, int], n_args: int) -> int | str | tuple[int, int]:
    """Where a consumer's input is: its position, (position, entry) in a list argument,
    or (recorded by name, or a position past the positional arguments) its keyword,
    ``"input"`` by default."""
    if isinstance(pos, int):
        return pos if pos < n_args else "input"
    return pos


def _get_arg(args, kwargs, key):
    if isinstance(key, tuple):
        return args[key[0]][key[1]]
    return args[key] if isinstance(key, int) else kwargs.get(key)


class _Masked(torch.fx.Interpreter):
    """Runs the original graph with the removed channels absent: zeroed at every linear
    consumer input, left out of every mixing op (its masked semantics)."""

    def __init__(self, gm, masks: dict[str, dict[int | str, torch.Tensor]],
                 modules: dict[str, torch.nn.Module] | None = None, tensors: dict[str, torch.Tensor] | None = None,
                 mixing: dict[str, Any] | None = None, kept_of: Any = None,
                 fills: dict[str, dict[int | str, torch.Tensor]] | None = None,
                 refits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(gm)
        self.masks = masks
        self.fills = fills or {}
        self.refits = refits or {}
        self.modules = modules or {}
        self.tensors = tensors or {}
        self.mixing = mixing or {}
        self.kept_of = kept_of
        self.counts: dict[torch.fx.Node, Any] = {}  # kept channel counts (see _count)

    def call_module(self, target, args, kwargs):
        if target in self.modules:
            return self.modules[target](*args, **kwargs)
        return super().call_module(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        if target in self.tensors:
            return self.tensors[target]
        return super().get_attr(target, args, kwargs)

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        return mutable_args(*super().fetch_args_kwargs_from_env(n))

    def _masked_args(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> tuple[list, dict]:
        args = list(args)
        fills = self.fills.get(n.name, {})

        def masked(x, pos, mask):  # removed channels: zero, or the value compensation gave them
            out = x * mask.to(x.dtype)
            return out + fills[pos].to(x.dtype) if pos in fills else out

        for pos, mask in self.masks.get(n.name, {}).items():
            key = _arg_key(pos, len(args))
            if isinstance(key, tuple):
                entries = list(args[key[0]])
                entries[key[1]] = masked(entries[key[1]], pos, mask)
                args[key[0]] = entries
            elif isinstance(key, int):
                args[key] = masked(args[key], pos, mask)
            else:
                kwargs = {**kwargs, key: masked(kwargs[key], pos, mask)}
        return args, kwargs

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.refits:  # a linear layer refit by least squares: its closed form
            with self._set_current_node(n):
                args, kwargs = self._masked_args(n, *self.fetch_args_kwargs_from_env(n))
                x = args[0] if args else kwargs["input"]
                weight, bias = self.refits[n.name]
                return torch.nn.functional.linear(x, weight.to(x.dtype), bias.to(x.dtype))
        masked = self.mixing.get(n.name)
        if masked is not None and getattr(masked, "counts", False):
            return self._count(n, masked)
        if self.counts and any(i in self.counts for i in n.all_input_nodes):
            if tensor_meta(n) is None:  # arithmetic on sizes: both values, the full one goes on
                self.counts[n] = self._run(n, masked, _ALL)
                return self._run(n, masked, None)
            return self._run(n, masked, _value_arguments(n, self.module))
        if n.name not in self.masks and masked is None:
            return super().run_node(n)
        return self._run(n, masked, None)

    def _run(self, n: torch.fx.Node, masked: Any, counted: Any) -> Any:
        """Run ``n`` with its consumer masks, its masked semantics, and the kept counts
        substituted at the arguments ``counted`` names (``_ALL``, positions and keywords,
        or None)."""
        with self._set_current_node(n):
            if counted is None:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
            else:
                def pick(a, where):
                    if a in self.counts and (counted is _ALL or where in counted):
                        return self.counts[a]
                    return self.env[a]

                args = tuple(torch.fx.node.map_arg(a, lambda x, i=i: pick(x, i)) for i, a in enumerate(n.args))
                kwargs = {k: torch.fx.node.map_arg(a, lambda x, k=k: pick(x, k)) for k, a in n.kwargs.items()}
                args, kwargs = mutable_args(args, kwargs)
            args, kwargs = self._masked_args(n, args, kwargs)
            run = lambda a, k: getattr(self, n.op)(n.target, tuple(a), k)  # noqa: E731
            if masked is None:
                return run(args, kwargs)
            module = self.fetch_attr(n.target) if n.op == "call_module" else None
            if n.op == "call_module" and n.target in self.modules:
                module = self.modules[n.target]
            return masked(MaskedCall(n, tuple(args), kwargs, module, self.kept_of, run,
                                     self.kept_of.of_labels, self.recompute))

    def recompute(self, node: torch.fx.Node, changes: dict[str, Any]) -> Any:
        """``node``'s value with the tensors at the paths of ``changes`` replaced by
        ``changes[path](tensor)``: the nodes in between are evaluated again (nodes that
        depend on no changed tensor keep their value, recomputed if the run freed it)."""
        memo: dict[torch.fx.Node, tuple[Any, bool]] = {}

        def ev(n: torch.fx.Node) -> tuple[Any, bool]:
            if n in memo:
                return memo[n]
            if n.op == "get_attr":
                value = self.get_attr(n.target, (), {})
                got = (changes[n.target](value), True) if n.target in changes else (value, False)
            else:
                inputs = {i: ev(i) for i in n.all_input_nodes}
                if not any(changed for _, changed in inputs.values()) and n in self.env:
                    got = (self.env[n], False)
                else:
                    pick = lambda a: inputs[a][0]  # noqa: E731
                    args, kwargs = mutable_args(torch.fx.node.map_arg(n.args, pick),
                                                torch.fx.node.map_arg(n.kwargs, pick))
                    got = (getattr(self, n.op)(n.target, tuple(args), kwargs),
                           any(changed for _, changed in inputs.values()))
            memo[n] = got
            return got

        return ev(node)[0]

    # A channel count read from a tensor (x.size(-1)) has two values here: the full one,
    # which shapes the reference's full-size tensors and structures (a view, a slice, a
    # conv's groups), and the kept count, which the pruned model computes and which every
    # *value* use (a scale, a divisor) must see.
    def _count(self, n: torch.fx.Node, masked: Any) -> Any:
        full = super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            run = lambda a, k: getattr(self, n.op)(n.target, tuple(a), k)  # noqa: E731
            self.counts[n] = masked(MaskedCall(n, args, kwargs, None, self.kept_of, run))
        return full


_ALL = object()  # every argument
_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_TENSOR_OF_VALUE = (torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.full_like)


def _value_arguments(node: torch.fx.Node, root: torch.nn.Module) -> Any:
    """The arguments of tensor op ``node`` that take numbers as values (every operand of an
    elementwise op, attention's ``scale``, the data of ``torch.tensor``), where a channel
    count means the kept count; None when it takes numbers only as structure (sizes,
    groups, dims)."""
    from .rules.registry import lookup

    if node.op == "call_function" and node.target in _SDPA:
        return {6, "scale"}
    if node.op == "call_function" and node.target in _TENSOR_OF_VALUE:
        return _ALL
    rule = lookup(node, root)
    return _ALL if rule is not None and rule.name == "pointwise" else None


class _KeptOf:
    """(dim, kept indices) of a node's value under a plan, or None when it keeps all."""

    def __init__(self, groups, kept: torch.Tensor):
        self.groups, self.kept = groups, kept
        self._cache: dict[str, Any] = {}

    def of_labels(self, labels: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(dim, kept indices) of a label tensor that varies along one dim."""
        dim = channel_dim(labels)
        if dim is None:
            return None
        mask = self.kept[self.groups.class_of[labels.reshape(-1)]]
        return None if bool(mask.all()) else (dim, mask.nonzero().reshape(-1))

    def __call__(self, node: Any) -> tuple[int, torch.Tensor] | None:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.name not in self._cache:
            labels = self.groups.node_labels.get(node.name)
            self._cache[node.name] = self.of_labels(labels) if isinstance(labels, torch.Tensor) else None
        return self._cache[node.name]


def consumer_masks(groups, kept: torch.Tensor) -> dict[str, dict[int | str, torch.Tensor]]:
    """Per consumer node and argument: a broadcastable 0/1 mask of kept channels."""
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    masks: dict[str, dict[int | str, torch.Tensor]] = {}
    for name, pos in groups.consumers:
        node = nodes[name]
        key = _arg_key(pos, len(node.args))
        if isinstance(key, tuple) and isinstance(node.args[key[0]], torch.fx.Node):
            whole = groups.node_labels.get(node.args[key[0]].name)  # an entry of a tuple-valued node
            labels = whole[key[1]] if isinstance(whole, tuple) else None
        else:
            arg = _get_arg(node.args, node.kwargs, key)
            labels = groups.node_labels.get(arg.name) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(labels, torch.Tensor):
            continue
        mask = kept[groups.class_of[labels]]
        if not bool(mask.all()):
            masks.setdefault(name, {})[pos] = mask
    return masks


def masked_weights(groups, kept: torch.Tensor, gm: torch.fx.GraphModule | None = None
                   ) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    """Copies of opaque modules that consume channels through their own weights (recurrent
    layers), with the removed weight columns zeroed; for an exported op (``aten.lstm``),
    zeroed copies of the weights it is given, by attribute path. ``gm``: the graph module
    to take them from (a float64 copy of ``groups.gm``; by default ``groups.gm``)."""
    from .rules.context import get_tensor

    gm = groups.gm if gm is None else gm
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    out: dict[str, torch.nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, path, labels in groups.param_consumers:
        mask = kept[groups.class_of[labels]]
        if bool(mask.all()):
            continue
        target = nodes[name].target
        if nodes[name].op != "call_module":
            if path not in tensors:
                tensors[path] = get_tensor(gm, path).detach().clone()
            tensors[path].mul_(mask.to(tensors[path].dtype))
            continue
        if target not in out:
            out[target] = copy.deepcopy(gm.get_submodule(target))
        attr = path[len(target) + 1:]
        with torch.no_grad():
            getattr(out[target], attr).mul_(mask.to(getattr(out[target], attr).dtype))
    for m in out.values():
        if hasattr(m, "_init_flat_weights"):
            m._init_flat_weights()
    return out, tensors


def _mixing_semantics(groups) -> dict[str, Any]:
    """The masked semantics of every mixing node that has one (a node with a site that
    has none is left out: it is only ever run with its channels all kept)."""
    found: dict[str, Any] = {}
    blocked = set()
    for site in groups.mixing:
        if site.masked is None:
            blocked.add(site.node)
        else:
            found.setdefault(site.node, site.masked)
    return {k: v for k, v in found.items() if k not in blocked}


def refit_reference(groups, refits: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The oracle's own solution of every least-squares refit (``fxprune.compensate``):
    the ridge normal equations solved directly, as full-size weights whose removed
    columns are zero."""
    from .rules.context import get_tensor

    out = {}
    for name, r in refits.items():
        w = get_tensor(groups.gm, r.weight).detach().double()
        b = get_tensor(groups.gm, r.bias).detach().double() if r.bias else torch.zeros(w.shape[0],
                                                                                      dtype=torch.float64)
        c = w.shape[1]
        gram = r.gram.double()
        s_idx = torch.cat([r.kept, torch.tensor([c])])
        removed = torch.ones(c, dtype=torch.bool)
        removed[r.kept] = False
        mean = gram[c, :c] / gram[c, c]
        bias0 = b + w[:, removed] @ mean[removed]
        if r.lam == float("inf"):
            a = torch.cat([w[:, r.kept], bias0[:, None]], 1)
        else:
            g_ss = gram[s_idx][:, s_idx]
            scale = float(g_ss.diagonal().mean()) or 1.0
            target = torch.cat([w, b[:, None]], 1) @ gram[:, s_idx] + r.lam * scale * torch.cat(
                [w[:, r.kept], bias0[:, None]], 1)
            system = g_ss + r.lam * scale * torch.eye(len(s_idx), dtype=torch.float64)
            a = torch.linalg.lstsq(system, target.T).solution.T
        full = torch.zeros_like(w)
        full[:, r.kept] = a[:, :-1]
        out[name] = (full, a[:, -1])
    return out


def masked_reference(groups, kept: torch.Tensor, inputs: tuple, gm: torch.fx.GraphModule | None = None,
                     fills: dict | None = None, refits: dict | None = None) -> Any:
    """Outputs of the original graph (or of ``gm``, a float64 copy of it) with the channels
    ``kept`` marks False absent: zeroed at their linear consumers (or, at the consumers
    ``fills`` names, set to the value bias compensation gave them), left out of every
    mixing op."""
    gm = groups.gm if gm is None else gm
    with torch.no_grad():
        return _Masked(gm, consumer_masks(groups, kept), *masked_weights(groups, kept, gm),
                       mixing=_mixing_semantics(groups), kept_of=_KeptOf(groups, kept),
                       fills=fills, refits=refit_reference(groups, refits) if refits else None).run(*inputs)


def unchecked_groups(groups, kept: torch.Tensor) -> dict[int, str]:
    """Groups with removed channels that pass through a mixing op without masked
    semantics, and why (the oracle cannot evaluate the reference for them)."""
    found: dict[int, str] = {}
    for site in groups.mixing:
        if site.masked is not None:
            continue
        cls = groups.class_of[site.labels.reshape(-1)]
        gone = cls[~kept[cls]]
        for g in torch.unique(groups.group_of_class[gone]).tolist():
            if g >= 0:
                found.setdefault(int(g), site.reason)
    return found


# -- comparison -------------------------------------------------------------------------
def _compare(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> float:
    if len(a) != len(b):
        raise VerificationError(f"{what}: {len(a)} outputs vs {len(b)}")
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"{what}: output shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            a, b = x.double(), y.double()
            diff = (a - b).abs()
            # equal infinities and NaN at the same place agree; any other non-finite entry
            # is an infinite error (a NaN must never compare as "not greater than rtol")
            diff = torch.where((a == b) | (a.isnan() & b.isnan()), torch.zeros_like(diff), diff)
            worst = float(diff.max())
            err = max(err, worst if worst == worst else float("inf"))
    return err


def _scale(outs: list[torch.Tensor], min_scale: float) -> float:
    floats = [t.double() for t in outs if t.is_floating_point() and t.numel()]
    if not floats:
        raise DegenerateReferenceError("the model has no floating-point output to compare")
    scale = max(float(t.abs().max()) for t in floats)
    spread = max(float((t - t.mean()).abs().max()) for t in floats)
    if not scale > min_scale or not spread > min_scale * 1e-3 * max(scale, 1.0) or spread == 0.0:
        raise DegenerateReferenceError(
            f"the reference output is degenerate (max |y| = {scale:.3g}, spread {spread:.3g}): any "
            f"comparison would pass. Give the model healthy activations first (re-initialize "
            f"all-zero weights, recalibrate BatchNorm statistics on random batches in train mode)")
    return scale


def _capture_tolerance(outs: list[torch.Tensor], rtol: float) -> float:
    """The captured graph and the model compute in the model's own dtype: they may differ
    by a few roundings of the coarsest float dtype among the outputs."""
    eps = max((torch.finfo(t.dtype).eps for t in outs if t.is_floating_point()), default=0.0)
    return max(rtol, 1e-4, 4 * eps)


class _Precision:
    """Runs graphs in float64 copies; ``native`` instead when a graph cannot run in float64
    and every float of the model is float32 or wider (then the float32 check holds)."""

    def __init__(self, inputs: tuple, native_ok: bool):
        self.inputs = inputs
        self.native_ok = native_ok
        self.name = "float64"

    def prepare(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return as_float64(gm) if self.name == "float64" else gm

    def args(self) -> tuple:
        return _promote_inputs(self.inputs) if self.name == "float64" else self.inputs

    def context(self):
        return _default_dtype(torch.float64) if self.name == "float64" else contextlib.nullcontext()


def _float_dtypes(*modules: torch.nn.Module, inputs: tuple = ()) -> set[torch.dtype]:
    found = {t.dtype for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()}
    found |= {t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return found


def verify(model: torch.nn.Module, result, example_inputs: Any, *, rtol: float | None = None,
           min_scale: float = 1e-6, name_failing_group: bool = True) -> VerifyResult:
    """Check a pruning result against the oracle; raise :class:`VerificationError` if it fails.

    ``result.module`` (every stage of a staged result) is run on ``example_inputs`` and
    compared with the original graph run with the removed channels absent (see the
    module docstring), both in float64.

    Parameters
    ----------
    model : the original module (used to check that the captured graph matches it).
    result : the :class:`fxprune.PruneResult` of ``fxprune.prune``.
    example_inputs : a tensor or tuple of positional inputs.
    rtol : allowed error relative to the reference output's scale (default 1e-6 in
        float64, 1e-4 when a graph can only run in float32).
    min_scale : a reference output below this scale is degenerate (refused).
    name_failing_group : on failure, find and name the first group that breaks the check.
    """
    if getattr(result, "stages", ()):  # staged pruning: each stage against the one before
        stages = list(result.stages)
        if stages[-1].module is not result.module:  # the module the user holds is the one checked
            stages[-1] = dataclasses.replace(stages[-1], module=result.module)
        checks, previous = [], model
        for stage in stages:
            checks.append(verify(previous, stage, example_inputs if previous is model else
                                 graph_inputs(result.stages[0].groups.gm, as_tuple(example_inputs)),
                                 rtol=rtol, min_scale=min_scale, name_failing_group=name_failing_group))
            previous = stage.module
        return VerifyResult(max(c.max_rel_err for c in checks), min(c.effect for c in checks),
                            checks[0].scale, sum(c.exact_groups for c in checks),
                            sum(c.inexact_groups for c in checks), sum(c.channels_checked for c in checks),
                            sum(c.groups_removed for c in checks), sum(c.groups_checked for c in checks),
                            sum(c.channels_removed for c in checks), tuple(u for c in checks for u in c.unchecked),
                            min((c.precision for c in checks), key=lambda p: p != "float64"))
    groups, plan = result.groups, result.plan
    model_inputs = as_tuple(example_inputs)
    inputs = graph_inputs(groups.gm, model_inputs)
    with torch.no_grad():
        original = _flat(model(*model_inputs))
        traced = _flat(groups.gm(*inputs))
    scale = _scale(original, min_scale)
    capture_err = _compare(traced, original, "captured graph vs model") / scale
    if capture_err > _capture_tolerance(original, rtol or DEFAULT_RTOL):
        raise VerificationError(f"the captured graph does not reproduce the model (rel. error "
                                f"{capture_err:.3g}); the model may depend on state fxprune cannot see")

    kept = plan.kept
    removed = ~kept
    removed_groups = {int(g) for g in groups.group_of_class[removed].tolist() if g >= 0}
    inexact_groups = {int(g) for g in groups.group_of_class[removed & groups.class_inexact].tolist()}
    blocked = unchecked_groups(groups, kept)
    check_kept = kept.clone()
    for g in blocked:
        check_kept[torch.tensor(groups.groups[g].classes, dtype=torch.int64)] = True

    wide = _float_dtypes(groups.gm, result.module, inputs=inputs) <= {torch.float32, torch.float64}
    precision = _Precision(inputs, native_ok=wide)
    pruned_gm = result.module if not blocked else _rewrite(groups, check_kept)
    comp = getattr(plan, "compensation", None)
    fills = comp.fills if comp is not None and not blocked else None
    refits = getattr(comp, "refits", None) if comp is not None and not blocked else None
    try:
        got, reference, unpruned = _run_both(groups, check_kept, pruned_gm, precision, fills, refits)
    except VerificationError:
        raise
    except Exception as exc:
        if not precision.native_ok:
            raise VerificationError(
                f"the float64 copy of the graph does not run ({type(exc).__name__}: {exc}); the oracle "
                f"cannot check a {sorted(str(d) for d in _float_dtypes(groups.gm))} model in its own "
                f"precision. Verify a float32 copy of the model and of the result instead") from exc
        precision.name = "native"
        got, reference, unpruned = _run_both(groups, check_kept, pruned_gm, precision, fills, refits)
    tol = rtol if rtol is not None else (DEFAULT_RTOL if precision.name == "float64" else 1e-4)
    ref_scale = _scale(reference, min_scale)
    err = _compare(got, reference, "pruned vs oracle") / ref_scale
    effect = _compare(reference, unpruned, "oracle vs original") / ref_scale
    if err > tol:
        culprit = _failing_group(groups, check_kept, precision, tol) if name_failing_group else None
        where = f"; the first failing group is {culprit}" if culprit else ""
        raise VerificationError(f"pruned model differs from the oracle: relative error {err:.3g} "
                                f"> {tol:g} ({precision.name}){where}")
    if blocked:  # the user's module itself: it runs and keeps the output shapes
        with torch.no_grad():
            full = _flat(result.module(*inputs))
        _compare([torch.zeros_like(t) for t in full], [torch.zeros_like(t) for t in original],
                 "pruned (unchecked groups) vs original shapes")
        bad = [i for i, t in enumerate(full) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise VerificationError(f"pruned model output {bad[0]} has non-finite values")
    return VerifyResult(
        err, effect, ref_scale, len(removed_groups - inexact_groups), len(inexact_groups),
        int((~check_kept).sum()), len(removed_groups), len(removed_groups - set(blocked)),
        int(removed.sum()),
        tuple(f"group {g} ({int((removed[torch.tensor(groups.groups[g].classes)]).sum())} channels): {why}"
              for g, why in sorted(blocked.items())),
        precision.name)


def _rewrite(groups, kept: torch.Tensor) -> torch.fx.GraphModule:
    from .rewrite import rewrite_graph

    return rewrite_graph(groups, kept)


def _run_both(groups, kept: torch.Tensor, pruned_gm: torch.fx.GraphModule, precision: _Precision,
              fills: dict | None = None, refits: dict | None = None):
    """(pruned outputs, masked reference outputs, unpruned outputs), all flat, in the
    precision chosen."""
    args = precision.args()
    with torch.no_grad(), precision.context():
        pruned = precision.prepare(pruned_gm)
        got = _flat(pruned(*args))
        del pruned  # one float64 copy at a time: a large model's copies are several GB
        gm = precision.prepare(groups.gm)
        reference = _flat(masked_reference(groups, kept, args, gm, fills, refits))
        unpruned = _flat(gm(*args))
    return got, reference, unpruned


def _failing_group(groups, kept: torch.Tensor, precision: _Precision, rtol: float) -> str | None:
    """Re-run the oracle one group at a time to name a group that breaks it."""
    for g in groups.groups:
        cls = torch.tensor(g.classes)
        if bool(kept[cls].all()):
            continue
        one = torch.ones_like(kept)
        one[cls] = kept[cls]
        got, ref, _ = _run_both(groups, one, _rewrite(groups, one), precision)
        scale = max(float(t.abs().max()) for t in ref if t.numel())
        if _compare(got, ref, "group") / max(scale, 1e-30) > rtol:
            members = ", ".join(str(m) for m in g.members[:3])
            return f"group {g.id} ({members})"
    return None
