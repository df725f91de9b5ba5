"""Bias compensation: a removed channel is replaced by its calibration mean, and what
that constant contributes is folded into its consumer's bias (FLAP's compensation).

For an affine consumer ``y = W x + b`` (a linear layer; a conv with zero padding,
where a constant input channel contributes the same at every output position), the
removed channels ``P`` with calibration means ``m_P`` give ``y = W_K x_K + (b + W_P
m_P)``: the consumer keeps its kept columns and gets the bias ``b + W_P m_P``, a new
bias where it had none (it shows in the generated code as the layer's bias or a
``get_attr`` argument).

The oracle stays exact: the plan records, per compensated consumer input, the value
each removed channel takes there (``PrunePlan.fills``); the reference replaces the
channel by that value where it zeroes the others (``fxprune.verify``). Consumers that
are not affine in that sense (a padded conv, whose border outputs see zeros, a
grouped or transposed conv, a sum over channels) are not compensated and are listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .channels import ChannelGroups
from .errors import ConfigError
from .rules.context import get_tensor
from .statistics import ActivationStats, consumer_sites

__all__ = ["COMPENSATIONS", "Compensation", "compensation_fills", "apply_compensation", "why_not_affine"]

COMPENSATIONS = (None, "none", "bias")

_LINEAR_FNS = {F.linear, torch.ops.aten.linear.default}
_CONV_FNS = {F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
             torch.ops.aten.conv3d.default, torch.ops.aten.convolution.default}


@dataclass(frozen=True)
class Compensation:
    """Per consumer node and input position: the value every channel takes there in the
    reference (the calibration mean where removed, 0 where kept; shaped like the input's
    labels); and the consumers left uncompensated, with why."""

    fills: dict[str, dict]
    skipped: tuple[str, ...] = ()


def _weight_path(groups: ChannelGroups, node: str) -> str | None:
    for a in groups.alignments:
        if a.node == node and a.role == "in":
            return a.path
    return None


def why_not_affine(node: torch.fx.Node, root: nn.Module) -> str | None:
    """None when ``node`` is ``W x + b`` with a constant input channel contributing the
    same at every output position; else the reason it is not."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if type(mod) is nn.Linear:
            return None
        if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            padding, groups = mod.padding, mod.groups
        else:
            return f"{type(mod).__name__} is not a linear or conv layer"
    elif node.op == "call_function" and node.target in _LINEAR_FNS:
        return None
    elif node.op == "call_function" and node.target in _CONV_FNS:
        try:
            pair = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
        except Exception:
            pair = None
        if pair is None:
            return "its arguments cannot be normalized"
        kw = pair.kwargs
        if kw.get("transposed", False):
            return "a transposed conv"
        padding, groups = kw.get("padding", 0), kw.get("groups", 1)
    else:
        return "not a linear or conv layer"
    if groups != 1:
        return f"a grouped conv (groups={groups})"
    pads = [padding] if isinstance(padding, (int, str)) else list(padding)
    if any(p not in (0, "valid") for p in pads):
        return f"a conv with padding {padding} (its borders see zeros, not the mean)"
    return None


def compensation_fills(groups: ChannelGroups, kept: torch.Tensor, stats: ActivationStats) -> Compensation:
    """The reference values of the removed channels at every affine consumer input."""
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    fills: dict[str, dict] = {}
    skipped: list[str] = []
    for (name, pos), site in consumer_sites(groups).items():
        mask = kept[groups.class_of[site.labels]]
        if bool(mask.all()) or pos not in (0, "input"):
            continue
        node = nodes[name]
        if _weight_path(groups, name) is None:  # a sum over channels, an attention product
            continue
        why = why_not_affine(node, groups.gm)
        if why is not None:
            skipped.append(f"{name}: {why}")
            continue
        st = stats.stats.get(site.key)
        if st is None or st.count == 0:
            skipped.append(f"{name}: no calibration statistics of its input")
            continue
        shape = [1] * site.labels.ndim
        shape[site.dim] = -1
        mean = st.mean.reshape(shape)
        fills.setdefault(name, {})[pos] = torch.where(mask, torch.zeros((), dtype=torch.float64), mean)
    return Compensation(fills, tuple(skipped))


def _delta(groups: ChannelGroups, kept: torch.Tensor, path: str, fill: torch.Tensor) -> torch.Tensor:
    """``W @ fill`` over the input channels (a conv kernel's taps summed), for the output
    rows the plan keeps."""
    w = get_tensor(groups.gm, path).detach().double()
    if w.ndim > 2:
        w = w.sum(tuple(range(2, w.ndim)))
    delta = w @ fill.reshape(-1)
    for a in groups.alignments:
        if a.path == path and a.dim == 0:
            delta = delta[kept[groups.class_of[a.labels.reshape(-1)]]]
            break
    return delta


def apply_compensation(module: torch.fx.GraphModule, groups: ChannelGroups, kept: torch.Tensor,
                       comp: Compensation) -> None:
    """Fold ``comp`` into the biases of the pruned ``module`` (its consumer nodes keep the
    original nodes' names). Only tensors of ``module`` are replaced: the rewrite gave it
    its own copies, and a new tensor is set rather than one changed in place."""
    if not comp.fills:
        return
    new_nodes = {n.name: n for n in module.graph.nodes}
    old_nodes = {n.name: n for n in groups.gm.graph.nodes}
    calls: dict[str, int] = {}
    for n in module.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for name, by_pos in comp.fills.items():
        old, new = old_nodes[name], new_nodes.get(name)
        if new is None:
            raise ConfigError(f"compensation: the pruned graph has no node {name!r} (the rewrite renamed it)")
        path = _weight_path(groups, name)
        delta = sum(_delta(groups, kept, path, fill) for fill in by_pos.values())
        dtype = get_tensor(groups.gm, path).dtype
        if old.op == "call_module" and calls.get(new.target, 0) == 1:
            mod = module.get_submodule(new.target)
            bias = mod.bias.detach().double() if mod.bias is not None else 0.0
            mod.bias = nn.Parameter((bias + delta).to(dtype))
            continue
        _add_bias_argument(module, new, delta, dtype)
    module.recompile()


def _add_bias_argument(module: torch.fx.GraphModule, node: torch.fx.Node, delta: torch.Tensor,
                       dtype: torch.dtype) -> None:
    """Give a functional linear/conv call (or a module called more than once) the bias
    ``old + delta`` as a new attribute; a module call gets an add after it."""
    attr = f"{node.name}_compensated_bias"
    while hasattr(module, attr):
        attr += "_"
    if node.op == "call_module":
        mod = module.get_submodule(node.target)
        shape = [-1] + [1] * (0 if isinstance(mod, nn.Linear) else len(mod.kernel_size))
        module.register_parameter(attr, nn.Parameter(delta.to(dtype).reshape(shape)))
        with module.graph.inserting_after(node):
            get = module.graph.get_attr(attr)
        with module.graph.inserting_after(get):
            add = module.graph.call_function(torch.add, (node, get))
        node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        return
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    old = 0.0
    if isinstance(bias, torch.fx.Node):
        if bias.op != "get_attr":
            raise ConfigError(f"compensation: the bias of {node.format_node()} is computed, not a tensor")
        old = get_tensor(module, bias.target).detach().double()
    module.register_parameter(attr, nn.Parameter((old + delta).to(dtype)))
    with module.graph.inserting_before(node):
        get = module.graph.get_attr(attr)
    if len(node.args) > 2:
        args = list(node.args)
        args[2] = get
        node.args = tuple(args)
    elif len(node.args) == 2 and "bias" not in node.kwargs:
        node.args = (*node.args, get)
    else:
        node.kwargs = {**node.kwargs, "bias": get}
