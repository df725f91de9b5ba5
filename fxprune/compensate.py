"""Bias compensation: a removed channel is replaced by its calibration mean, and what
that constant contributes is folded into its consumer's bias (FLAP's compensation).

For an affine consumer ``y = W x + b`` (a linear layer; a conv with zero padding,
where a constant input channel contributes the same at every output position), the
removed channels ``P`` with calibration means ``m_P`` give ``y = W_K x_K + (b + W_P
m_P)``: the consumer keeps its kept columns and gets the bias ``b + W_P m_P``, a new
bias where it had none (it shows in the generated code as the layer's bias or a
``get_attr`` argument).

``compensate="lsq"`` refits instead the kept columns and the bias of each linear
consumer to the original output by ridge least squares on the calibration Gram
matrix of its input, ``A = (M G[:, S] + l s A0)(G[S, S] + l s I)^-1`` (``M = [W, b]``,
``S`` the kept columns and the constant, ``A0`` the bias-compensated layer, ``s`` the
Gram's mean diagonal): ``l`` is chosen on a held-out half of the calibration
batches from a grid that ends in ``l = inf``, which is bias compensation, so the
refit is never worse on held-out data than the mean; a naive refit overfits.

The oracle stays exact: the plan records, per compensated consumer input, the value
each removed channel takes there (``PrunePlan.fills``); the reference replaces the
channel by that value where it zeroes the others (``fxprune.verify``); for a refit it
records the Gram matrix and ``l``, and the oracle solves the closed form itself and
runs the reference layer with that solution. Consumers that
are not affine in that sense (a padded conv, whose border outputs see zeros, a
grouped or transposed conv, a sum over channels) are not compensated and are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .channels import ChannelGroups
from .errors import ConfigError
from .arguments import bind_args, replace_arg
from .rules.context import get_tensor
from .statistics import ActivationStats, consumer_sites

__all__ = ["COMPENSATIONS", "Compensation", "Refit", "compensation_fills", "apply_compensation", "refit_statistics",
           "ridge_refit", "why_not_affine"]

COMPENSATIONS = (None, "none", "bias", "lsq")
RIDGE_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))

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
    refits: dict[str, "Refit"] = field(default_factory=dict)
    # paths of the layer tensors compensation set in the pruned module (for write-back)
    written: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Refit:
    """A least-squares refit of linear consumer ``node`` (weight ``weight``, bias
    ``bias`` or None): the full-data Gram ``gram`` of its input (constant last), its
    kept input columns ``kept``, the ridge ``lam`` chosen and the held-out error of
    each ridge tried (relative to the output energy)."""

    weight: str
    bias: str | None
    gram: torch.Tensor = field(repr=False)
    kept: torch.Tensor = field(repr=False)
    lam: float
    curve: tuple[tuple[float, float], ...] = ()


def ridge_refit(m: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, lam: float) -> torch.Tensor:
    """``[W', b']`` for the kept columns ``kept`` of ``m = [W, b]`` (float64), with ridge
    ``lam`` toward the bias-compensated layer (``inf``: that layer itself)."""
    c = gram.shape[0] - 1
    s_idx = torch.cat([kept, torch.tensor([c])])
    mean = gram[c, :c] / gram[c, c]
    removed = torch.ones(c, dtype=torch.bool)
    removed[kept] = False
    a0 = torch.cat([m[:, kept], (m[:, c] + m[:, :c][:, removed] @ mean[removed])[:, None]], 1)
    if lam == float("inf"):
        return a0
    g_ss = gram[s_idx][:, s_idx]
    scale = float(g_ss.diagonal().mean()) or 1.0
    lhs = g_ss + lam * scale * torch.eye(len(s_idx), dtype=gram.dtype)
    rhs = m @ gram[:, s_idx] + lam * scale * a0
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    return torch.linalg.lstsq(lhs, rhs.T).solution.T  # singular at lam = 0: least norm


def _held_out_error(m: torch.Tensor, a: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean squared output error of ``a`` on the data of ``gram``, relative to the output energy."""
    c = gram.shape[0] - 1
    s_idx = torch.cat([kept, torch.tensor([c])])
    energy = float(((m @ gram) * m).sum())
    cross = float(((a @ gram[s_idx]) * m).sum())
    own = float(((a @ gram[s_idx][:, s_idx]) * a).sum())
    return max(energy - 2 * cross + own, 0.0) / max(energy, 1e-300)


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


def compensation_fills(groups: ChannelGroups, kept: torch.Tensor, stats: ActivationStats,
                       fit: tuple[ActivationStats, ActivationStats] | None = None) -> Compensation:
    """The reference values of the removed channels at every affine consumer input; with
    ``fit`` (statistics with input Gram matrices of two disjoint halves of the data), the
    least-squares refits of the linear consumers among them."""
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    fills: dict[str, dict] = {}
    skipped: list[str] = []
    refits: dict[str, Refit] = {}
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
        if fit is not None:
            refit = _refit(groups, node, site, mask, fit)
            if refit is not None:
                refits[name] = refit
                continue
        st = stats.stats.get(site.key)
        if st is None or st.count == 0:
            skipped.append(f"{name}: no calibration statistics of its input")
            continue
        shape = [1] * site.labels.ndim
        shape[site.dim] = -1
        mean = st.mean.reshape(shape)
        fills.setdefault(name, {})[pos] = torch.where(mask, torch.zeros((), dtype=torch.float64), mean)
    return Compensation(fills, tuple(skipped), refits)


def refit_statistics(groups: ChannelGroups, kept: torch.Tensor, data, *, max_batches: int | None = None,
                     progress: bool | None = None) -> tuple[ActivationStats, ActivationStats]:
    """Input Gram matrices of the linear consumers that lose input channels under ``kept``,
    on two disjoint halves of the batches (even and odd), for :func:`compensation_fills`."""
    from itertools import islice

    from .calibration import check_data
    from .statistics import collect_statistics

    check_data(data, "compensate='lsq'")
    batches = list(data if max_batches is None else islice(data, max_batches))
    if len(batches) < 2:
        raise ConfigError(f"compensate='lsq' needs at least 2 calibration batches (half of them are held out "
                          f"to choose the ridge), got {len(batches)}; pass more batches in data=")
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    keys = [(name, pos) for (name, pos), site in consumer_sites(groups).items()
            if pos in (0, "input") and not bool(kept[groups.class_of[site.labels]].all())
            and linear_parts(nodes[name], groups.gm) is not None]
    if not keys:
        raise ConfigError("compensate='lsq': no linear layer reads a removed channel; use compensate='bias'")
    common = dict(consumers=False, producers=False, gram=keys, progress=progress, criterion="compensate='lsq'")
    return (collect_statistics(groups, batches[0::2], **common), collect_statistics(groups, batches[1::2], **common))


def linear_parts(node: torch.fx.Node, root: nn.Module) -> tuple[str, str | None] | None:
    """(weight path, bias path or None) of a linear consumer whose weight is a plain
    attribute used by this node alone; None for anything else."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if type(mod) is not nn.Linear:
            return None
        return f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None)
    if node.op != "call_function" or node.target not in _LINEAR_FNS:
        return None
    a = bind_args(node).values
    w, b = a.get("weight"), a.get("bias")
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and len(w.users) == 1):
        return None
    if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr" and len(b.users) == 1):
        return None
    return w.target, (b.target if b is not None else None)


def _refit(groups, node, site, mask, fit) -> Refit | None:
    parts = linear_parts(node, groups.gm)
    a, b = (s.stats.get(site.key) for s in fit)
    if parts is None or a is None or b is None or a.gram is None or b.gram is None or not a.count or not b.count:
        return None
    weight = get_tensor(groups.gm, parts[0]).detach().double()
    if weight.ndim != 2 or weight.shape[1] != a.n_channels:
        return None
    bias = get_tensor(groups.gm, parts[1]).detach().double() if parts[1] else torch.zeros(weight.shape[0],
                                                                                          dtype=torch.float64)
    m = torch.cat([weight, bias[:, None]], 1)
    kept_cols = torch.nonzero(mask.reshape(-1)).flatten()
    fit_gram, hold_gram = a.gram / a.count, b.gram / b.count
    curve = tuple((lam, _held_out_error(m, ridge_refit(m, fit_gram, kept_cols, lam), hold_gram, kept_cols))
                  for lam in RIDGE_GRID)
    best = min(curve, key=lambda item: (item[1], -item[0]))[0]
    full = (a.gram + b.gram) / (a.count + b.count)
    return Refit(parts[0], parts[1], full, kept_cols, best, curve)


def _delta(groups: ChannelGroups, kept: torch.Tensor, path: str, fill: torch.Tensor) -> torch.Tensor:
    """``W @ fill`` over the input channels (a conv kernel's taps summed), for the output
    rows the plan keeps."""
    w = get_tensor(groups.gm, path).detach().double()
    if w.ndim > 2:
        w = w.sum(tuple(range(2, w.ndim)))
    return _kept_rows(groups, kept, path, w @ fill.reshape(-1))


def _kept_rows(groups: ChannelGroups, kept: torch.Tensor, path: str, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one per output row of the weight at ``path``) for the rows the plan keeps."""
    for a in groups.alignments:
        if a.path == path and a.dim == 0:
            return rows[kept[groups.class_of[a.labels.reshape(-1)]]]
    return rows


def apply_compensation(module: torch.fx.GraphModule, groups: ChannelGroups, kept: torch.Tensor,
                       comp: Compensation) -> None:
    """Fold ``comp`` into the pruned ``module`` (its consumer nodes keep the original nodes'
    names). New tensors are set, never changed in place (the rewrite's copies may be
    shared by tied layers), and they sit at the layer's own paths (``<layer>.bias``,
    ``<layer>.weight``) wherever the layer's weight has one, so that the generated code
    reads them as the layer's and write-back (``fxprune.apply``) finds them. The paths
    set are recorded in ``comp.written``."""
    if not comp.fills and not comp.refits:
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
            comp.written.append(f"{new.target}.bias")
        elif old.op == "call_module":  # a layer called more than once: an add after this call
            _add_after(module, new, delta, dtype)
        else:
            old_bias = _argument(new, "bias")
            bias = get_tensor(module, old_bias.target).detach().double() if old_bias is not None else 0.0
            _set_argument(module, new, "bias", _layer_path(new, "bias"), nn.Parameter((bias + delta).to(dtype)), comp)
    for name, refit in comp.refits.items():
        old, new = old_nodes[name], new_nodes[name]
        w = get_tensor(groups.gm, refit.weight)
        b = get_tensor(groups.gm, refit.bias).detach().double() if refit.bias else torch.zeros(w.shape[0],
                                                                                              dtype=torch.float64)
        a = ridge_refit(torch.cat([w.detach().double(), b[:, None]], 1), refit.gram, refit.kept, refit.lam)
        a = _kept_rows(groups, kept, refit.weight, a)
        weight, bias = nn.Parameter(a[:, :-1].to(w.dtype).contiguous()), nn.Parameter(a[:, -1].to(w.dtype))
        if old.op == "call_module":  # linear_parts admits a module called once only
            mod = module.get_submodule(new.target)
            mod.weight, mod.bias = weight, bias
            comp.written.extend([f"{new.target}.weight", f"{new.target}.bias"])
            continue
        _set_argument(module, new, "weight", _layer_path(new, "weight"), weight, comp)
        _set_argument(module, new, "bias", _layer_path(new, "bias"), bias, comp)
    module.recompile()


def _argument(node: torch.fx.Node, keyword: str) -> torch.fx.Node | None:
    value = bind_args(node).values.get(keyword)
    if value is not None and not (isinstance(value, torch.fx.Node) and value.op == "get_attr"):
        raise ConfigError(f"compensation: the {keyword} of {node.format_node()} is computed, not a tensor")
    return value


def _layer_path(node: torch.fx.Node, leaf: str) -> str | None:
    """``<layer>.<leaf>`` for a functional layer whose weight is the attribute ``<layer>.weight``."""
    weight = bind_args(node).values.get("weight")
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
        return weight.target[:-len("weight")] + leaf
    return None


def _set_argument(module: torch.fx.GraphModule, node: torch.fx.Node, keyword: str,
                  path: str | None, value: nn.Parameter, comp: Compensation) -> None:
    """Make argument ``keyword`` of ``node`` read ``value``, stored at ``path`` when that
    path is free or read by this node alone, else under a new name."""
    old = _argument(node, keyword)
    readers = [n for n in module.graph.nodes if n.op == "get_attr" and path is not None and n.target == path]
    if path is None or any(n is not old or len(n.users) > 1 for n in readers):
        path = f"{node.name}_compensated_{keyword}"
        while hasattr(module, path):
            path += "_"
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    elif leaf not in owner._parameters and hasattr(owner, leaf):
        delattr(owner, leaf)
    owner.register_parameter(leaf, value)
    if old is not None and old.target == path:
        get = old
    else:
        with module.graph.inserting_before(node):
            get = module.graph.get_attr(path)
        replace_arg(node, bind_args(node), keyword, get)
        if old is not None and not old.users:
            module.graph.erase_node(old)
            _drop_attribute(module, old.target)
    if "_compensated_" not in path:
        comp.written.append(path)


def _drop_attribute(module: torch.fx.GraphModule, target: str) -> None:
    """Remove the tensor at ``target`` from ``module`` when no node reads it any more."""
    if any(n.op == "get_attr" and n.target == target for n in module.graph.nodes):
        return
    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if name in owner._parameters:
        del owner._parameters[name]
    elif name in owner._buffers:
        del owner._buffers[name]
    elif hasattr(owner, name):
        delattr(owner, name)


def _add_after(module: torch.fx.GraphModule, node: torch.fx.Node, delta: torch.Tensor, dtype: torch.dtype) -> None:
    """``node`` (a linear or conv module called more than once) followed by ``+ delta``."""
    attr = f"{node.name}_compensated_bias"
    while hasattr(module, attr):
        attr += "_"
    mod = module.get_submodule(node.target)
    shape = [-1] + [1] * (0 if isinstance(mod, nn.Linear) else len(mod.kernel_size))
    module.register_parameter(attr, nn.Parameter(delta.to(dtype).reshape(shape)))
    with module.graph.inserting_after(node):
        get = module.graph.get_attr(attr)
    with module.graph.inserting_after(get):
        add = module.graph.call_function(torch.add, (node, get))
    node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
