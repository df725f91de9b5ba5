"""The rewrite: a new, smaller GraphModule from the analysis and a plan (the ``rewrite``
pass runs it).

The graph is copied node by node; every parameter and buffer aligned with
channel labels is sliced to the kept channels; modules are rebuilt around the
sliced tensors; each rule's rewrite hook recomputes the shape constants and
module attributes the plan changes. The input GraphModule and the user's
modules are never modified: every tensor of the result is a fresh copy.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import torch
import torch.fx

from fxprune.capture import copy_node
from fxprune.channels import ChannelGroups
from fxprune.errors import RewriteError
from fxprune.labels import label_tensors
from fxprune.meta import META_KEY, copy_pytree_specs, get_meta
from fxprune.rules.context import RewriteContext, get_module, get_tensor
from fxprune.rules.registry import lookup
from fxprune.weight_norm import fold_gain, recompute_hooked_weight, weight_norm_of


# -- pure helpers ---------------------------------------------------------------
def _intersect(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    if a is None:
        return b
    return a[torch.isin(a, b)]


def slice_plan(groups: ChannelGroups, rctx: RewriteContext) -> dict[int, dict[int, torch.Tensor]]:
    """For every aligned tensor (by identity): dim -> kept indices."""
    plan: dict[int, dict[int, torch.Tensor]] = {}
    rctx.prepare([a.labels for a in groups.alignments] + label_tensors(groups.node_labels.values()))
    for a in groups.alignments:
        t = get_tensor(groups.gm, a.path)
        got = rctx.kept_index(a.labels)
        dims = plan.setdefault(id(t), {})
        if got is not None:
            dim, idx = got
            dims[dim] = _intersect(dims.get(dim), idx)
    return plan


def sliced_copy(t: torch.Tensor, dims: dict[int, torch.Tensor] | None) -> torch.Tensor:
    out = t.detach()
    for dim, idx in sorted((dims or {}).items()):
        if idx.numel() == 0:
            raise RewriteError(f"the plan removes every slice of a tensor of shape {tuple(t.shape)} "
                               f"along dim {dim}")
        out = out.index_select(dim, idx.to(out.device))  # a copy
    if not dims:  # kept whole: a copy of its own (also of a sparse tensor, which has no data_ptr)
        out = out.clone()
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _shallow_copy(m: torch.nn.Module) -> torch.nn.Module:
    """``copy.copy(m)``, without the pickle protocol's detour where the class allows it."""
    cls = type(m)
    if cls.__reduce_ex__ is not object.__reduce_ex__ or hasattr(cls, "__copy__"):
        return copy.copy(m)
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    return new


class _Rebuilder:
    """Builds new modules and attribute tensors, sharing one copy per original tensor
    (tied weights stay tied)."""

    def __init__(self, gm: torch.fx.GraphModule, plan: dict[int, dict[int, torch.Tensor]]):
        self.gm = gm
        self.plan = plan
        self.tensors: dict[int, torch.Tensor] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        self._folded: set[int] = set()

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        got = self.tensors.get(id(t))
        if got is None:
            got = self.tensors[id(t)] = sliced_copy(t, self.plan.get(id(t)))
        return got

    def module(self, target: str) -> torch.nn.Module:
        got = self.modules.get(target)
        if got is not None:
            return got
        old = get_module(self.gm, target)
        if any(child is not None for child in old._modules.values()):
            # copied whole with its tensors rebuilt: an opaque leaf's are only cloned, the g
            # and v of a parametrized weight norm are sliced
            memo = {id(t): self.tensor(t) for t in itertools.chain(old.parameters(), old.buffers())}
            new = copy.deepcopy(old, memo)
        else:
            new = _shallow_copy(old)
            state = new.__dict__
            for key, value in state.items():
                if isinstance(value, dict):  # hooks and the like: the copy gets its own dicts
                    state[key] = value.copy() if type(value) in (dict, OrderedDict) else copy.copy(value)
            state["_parameters"] = {k: (None if v is None else self.tensor(v)) for k, v in old._parameters.items()}
            state["_buffers"] = {k: (None if v is None else self.tensor(v)) for k, v in old._buffers.items()}
        norm = weight_norm_of(old)
        if norm is not None:
            self.fold_weight_norm(get_tensor(old, norm.g), get_tensor(old, norm.v), norm.dim)
            if norm.hooked:
                recompute_hooked_weight(new, norm)
        self.modules[target] = new
        return new

    def fold_weight_norm(self, g: torch.Tensor, v: torch.Tensor, dim: int) -> None:
        """Fold the change of the kept norms into the rebuilt ``g`` (``fxprune.weight_norm``),
        once however many times the layer is used."""
        if id(g) not in self._folded:
            self._folded.add(id(g))
            fold_gain(self.tensor(g), v, self.tensor(v), (self.plan.get(id(v)) or {}).get(dim), dim)


def _is_number(value) -> bool:
    """An int, float or bool, or a tuple of them (a size): what shape arithmetic makes."""
    if isinstance(value, (tuple, list)):
        return all(_is_number(v) for v in value)
    return isinstance(value, (int, float, bool))


def _drop_dead_sizes(env: dict[torch.fx.Node, torch.fx.Node]) -> None:
    """Size arithmetic the rewrite replaced by constants (``C // heads``, ``x.shape[-1]``)
    is left without users: remove it, so the generated code only computes what it uses.
    Only non-tensor values that lost their last user here go; nothing the model computed
    for no use is touched."""
    for old, new in reversed(env.items()):
        if (not new.users and old.users and new.op in ("call_function", "call_method")
                and _is_number(get_meta(old)) and not new.is_impure()):
            new.graph.erase_node(new)


def _copy_modes(gm: torch.nn.Module, out: torch.nn.Module) -> None:
    """Every module of ``out`` in the train/eval mode of its namesake in ``gm`` (an eval-mode
    BatchNorm inside a container left in train mode stays in eval mode); containers the
    GraphModule made itself take the mode of their nearest namesake above."""
    modes = {name: m.training for name, m in gm.named_modules()}
    for name, m in out.named_modules():
        key = name
        while key not in modes and key:
            key = key.rpartition(".")[0]
        m.training = modes.get(key, gm.training)


def rewrite_graph(groups: ChannelGroups, kept: torch.Tensor) -> torch.fx.GraphModule:
    """The pruned GraphModule for the classes ``kept`` (a bool per class)."""
    gm = groups.gm
    rctx = RewriteContext(groups, kept)
    rebuild = _Rebuilder(gm, slice_plan(groups, rctx))
    rctx.module_for, rctx.fold_weight_norm = rebuild.module, rebuild.fold_weight_norm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, object] = {}
    for old in gm.graph.nodes:
        new = copy_node(graph, old, lambda n: env[n])
        new.meta.pop(META_KEY, None)
        env[old] = new
        if old.op == "call_module":
            root[old.target] = rebuild.module(old.target)
        elif old.op == "get_attr":
            value = get_tensor(gm, old.target)
            root[old.target] = rebuild.tensor(value) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        rule = lookup(old, gm)
        if rule is not None and rule.rewrite is not None:
            try:
                rule.rewrite(rctx, old, new)
            except RewriteError:
                raise
            except Exception as exc:
                raise RewriteError(f"rewriting {old.format_node()} with rule {rule.name} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    _drop_dead_sizes(env)
    try:
        graph.lint()
    except Exception as exc:
        raise RewriteError(f"the rewritten graph is malformed: {exc}") from exc
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # an exported graph's pytree in/out
    out = torch.fx.GraphModule(root, graph, type(gm).__name__.replace("GraphModule", "") + "Pruned")
    copy_pytree_specs(gm, out)
    _copy_modes(gm, out)
    out.meta.update(gm.meta)
    return out
