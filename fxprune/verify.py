"""The oracle: proof on example data that pruning removed nothing but the pruned
channels.

For the exact groups of a plan, the pruned model must equal the original model
in which every consumer of a removed channel (conv/linear weight columns, a sum
over channels) sees that channel zeroed. The reference is computed by running
the captured original graph with those inputs masked. Inexact groups (channels
that pass through layer norm, softmax, a mean over channels) are checked for
shape and finiteness. A degenerate reference (near-zero or constant outputs,
which any comparison would pass) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ._util import as_tuple, mutable_args
from .errors import DegenerateReferenceError, VerificationError
from .meta import graph_inputs


@dataclass(frozen=True)
class VerifyResult:
    """What the oracle measured.

    ``max_rel_err``: max |pruned - reference| / max |reference| over exact groups;
    ``effect``: how much zeroing the removed channels changed the output, on the same
    scale (a test whose effect is 0 proves nothing); ``exact_groups`` and
    ``inexact_groups``: groups with removed channels of each kind.
    """

    max_rel_err: float
    effect: float
    scale: float
    exact_groups: int
    inexact_groups: int
    channels_checked: int


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


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
    """Runs the original graph, zeroing removed channels at every consumer input."""

    def __init__(self, gm, masks: dict[str, dict[int | str, torch.Tensor]],
                 modules: dict[str, torch.nn.Module] | None = None, tensors: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.masks = masks
        self.modules = modules or {}
        self.tensors = tensors or {}

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

    def run_node(self, n: torch.fx.Node) -> Any:
        masks = self.masks.get(n.name)
        if not masks:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = list(args)
            for pos, mask in masks.items():
                key = _arg_key(pos, len(args))
                if isinstance(key, tuple):
                    entries = list(args[key[0]])
                    entries[key[1]] = entries[key[1]] * mask.to(entries[key[1]].dtype)
                    args[key[0]] = entries
                elif isinstance(key, int):
                    args[key] = args[key] * mask.to(args[key].dtype)
                else:
                    kwargs = {**kwargs, key: kwargs[key] * mask.to(kwargs[key].dtype)}
            return getattr(self, n.op)(n.target, tuple(args), kwargs)


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


def masked_weights(groups, kept: torch.Tensor) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    """Copies of opaque modules that consume channels through their own weights (recurrent
    layers), with the removed weight columns zeroed; for an exported op (``aten.lstm``),
    zeroed copies of the weights it is given, by attribute path."""
    import copy

    from .rules.context import get_tensor

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
                tensors[path] = get_tensor(groups.gm, path).detach().clone()
            tensors[path].mul_(mask.to(tensors[path].dtype))
            continue
        if target not in out:
            out[target] = copy.deepcopy(groups.gm.get_submodule(target))
        attr = path[len(target) + 1:]
        with torch.no_grad():
            getattr(out[target], attr).mul_(mask.to(getattr(out[target], attr).dtype))
    for m in out.values():
        if hasattr(m, "_init_flat_weights"):
            m._init_flat_weights()
    return out, tensors


def masked_reference(groups, kept: torch.Tensor, inputs: tuple) -> Any:
    """Outputs of the original graph with removed channels zeroed at their consumers."""
    with torch.no_grad():
        return _Masked(groups.gm, consumer_masks(groups, kept), *masked_weights(groups, kept)).run(*inputs)


def _compare(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> float:
    if len(a) != len(b):
        raise VerificationError(f"{what}: {len(a)} outputs vs {len(b)}")
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"{what}: output shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            err = max(err, float((x.double() - y.double()).abs().max()))
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


def verify(model: torch.nn.Module, result, example_inputs: Any, *, rtol: float = 1e-4,
           min_scale: float = 1e-6, name_failing_group: bool = True) -> VerifyResult:
    """Check a pruning result against the oracle; raise :class:`VerificationError` if it fails.

    Parameters
    ----------
    model : the original module (used to check that the captured graph matches it).
    result : the :class:`fxprune.PruneResult` of ``fxprune.prune``.
    example_inputs : a tensor or tuple of positional inputs.
    rtol : allowed error relative to the reference output's scale.
    """
    from passes.rewrite import rewrite_graph

    if getattr(result, "stages", ()):  # staged pruning: each stage against the one before
        checks, previous = [], model
        for stage in result.stages:
            checks.append(verify(previous, stage, example_inputs if previous is model else
                                 graph_inputs(result.stages[0].groups.gm, as_tuple(example_inputs)),
                                 rtol=rtol, min_scale=min_scale, name_failing_group=name_failing_group))
            previous = stage.module
        return VerifyResult(max(c.max_rel_err for c in checks), min(c.effect for c in checks),
                            checks[0].scale, sum(c.exact_groups for c in checks),
                            sum(c.inexact_groups for c in checks), sum(c.channels_checked for c in checks))
    groups, plan = result.groups, result.plan
    model_inputs = as_tuple(example_inputs)
    inputs = graph_inputs(groups.gm, model_inputs)
    with torch.no_grad():
        original = _flat(model(*model_inputs))
        traced = _flat(groups.gm(*inputs))
    scale = _scale(original, min_scale)
    capture_err = _compare(traced, original, "captured graph vs model") / scale
    if capture_err > rtol:
        raise VerificationError(f"the captured graph does not reproduce the model (rel. error "
                                f"{capture_err:.3g}); the model may depend on state fxprune cannot see")
    exact_kept = plan.restrict(~groups.class_inexact).kept
    removed = ~plan.kept
    inexact_groups = {int(g) for g in groups.group_of_class[removed & groups.class_inexact].tolist()}
    exact_groups = {int(g) for g in groups.group_of_class[removed & ~groups.class_inexact].tolist()}
    pruned = result.module if not inexact_groups else rewrite_graph(groups, exact_kept)
    reference = _flat(masked_reference(groups, exact_kept, inputs))
    ref_scale = _scale(reference, min_scale)
    with torch.no_grad():
        got = _flat(pruned(*inputs))
    err = _compare(got, reference, "pruned vs oracle") / ref_scale
    effect = _compare(reference, original, "oracle vs original") / ref_scale
    if err > rtol:
        culprit = _failing_group(groups, exact_kept, inputs, rtol) if name_failing_group else None
        where = f"; the first failing group is {culprit}" if culprit else ""
        raise VerificationError(f"pruned model differs from the oracle: relative error {err:.3g} "
                                f"> {rtol:g}{where}")
    if inexact_groups:
        with torch.no_grad():
            full = _flat(result.module(*inputs))
        _compare([torch.zeros_like(t) for t in full], [torch.zeros_like(t) for t in original],
                 "pruned (inexact groups) vs original shapes")
        bad = [i for i, t in enumerate(full) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise VerificationError(f"pruned model output {bad[0]} has non-finite values")
    return VerifyResult(err, effect, ref_scale, len(exact_groups), len(inexact_groups),
                        int((~exact_kept).sum()))


def _failing_group(groups, exact_kept: torch.Tensor, inputs: tuple, rtol: float) -> str | None:
    """Re-run the oracle one group at a time to name a group that breaks it."""
    from passes.rewrite import rewrite_graph

    for g in groups.groups:
        cls = torch.tensor(g.classes)
        if bool(exact_kept[cls].all()):
            continue
        kept = torch.ones_like(exact_kept)
        kept[cls] = exact_kept[cls]
        with torch.no_grad():
            ref = _flat(masked_reference(groups, kept, inputs))
            got = _flat(rewrite_graph(groups, kept)(*inputs))
        scale = max(float(t.abs().max()) for t in ref if t.numel())
        if _compare(got, ref, "group") / max(scale, 1e-30) > rtol:
            members = ", ".join(str(m) for m in g.members[:3])
            return f"group {g.id} ({members})"
    return None
