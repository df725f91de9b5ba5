"""Write-back: a pruned copy of the user's own module tree (``fxprune.apply(model, result)``,
``result.apply(model)``).

``fxprune.prune`` emits a new GraphModule; write-back puts what it computed back into a
deep copy of ``model``, so the copy keeps its classes, methods and everything the
graph cannot carry (``generate()`` and the KV cache of a Hugging Face model,
``save_pretrained``, a detector's post-processing).

Invariants of the returned copy:

- ``model`` is never modified, and the copy shares no tensor with it or with
  ``result.module``.
- Every tensor the captured graph reads holds, at the same path, the tensor that
  ``result.module`` holds there (the kept slices of the model's tensor, weight-norm gains
  as the rewrite folded them; see :mod:`fxprune.rewrite`). Tensors tied in ``model`` stay
  tied; tensors the graph does not read are copied unchanged.
- The attributes that describe sizes follow the tensors: ``in_features``/
  ``out_features``, ``in_channels``/``out_channels``/``groups``, ``normalized_shape``,
  ``num_features``, ``num_embeddings``/``embedding_dim``, ``hidden_size``/``proj_size``/
  ``input_size`` of recurrent layers, ``embed_dim``/``num_heads``/``head_dim``/``kdim``/
  ``vdim`` of ``nn.MultiheadAttention``, and the head counts and head size of any
  attention module that names them (``num_heads``, ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim``, ``attention_head_size``, ...), read from the
  views where the graph splits channels into heads. A module the symbolic trace called
  gets every size attribute the rewrite recomputed on it.
- One exception to "kept slices": an attention module whose head size changes and that
  scales its scores by ``head_dim ** -0.5`` (``nn.MultiheadAttention``, torchvision's
  shifted-window attention, or a module whose ``scale``/``scaling`` attribute holds
  ``head_dim ** -0.5``; the attribute becomes ``new_head_dim ** -0.5``, as the class
  computes it) gets ``sqrt(new_head_dim / head_dim)`` folded into its query projection
  (or query norm), so the scores stay what the pruned graph computes. A scale that is no
  function of the head size (T5's 1.0) is kept, and so are the query rows.
- ``check=True`` (default): the copy gives ``result.module``'s outputs on the example
  inputs (given, or made from the captured graph's input shapes), else a
  :class:`WritebackError` naming the source lines whose sizes the plan changed (a
  literal ``view(B, N, 12, 64)`` in ``forward`` that no attribute carries): use
  ``result.module`` there.
- A Hugging Face model gets its config updated where the config can express the pruned
  sizes (:func:`fxprune.hf.update_config`).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from . import hf
from ._util import as_tuple
from .errors import AnalysisError, ConfigError, RewriteError
from .labels import label_tensors
from .meta import graph_inputs, tensor_meta
from .rewrite import sliced_copy, slice_plan
from .arguments import bind_args
from .rules.context import RewriteContext, get_tensor
from .weight_norm import weight_norm_of

HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "d_head", "dim_head")
INNER = ("all_head_size", "inner_dim", "attn_dim", "split_size")  # heads * head_dim
SCALES = ("scale", "scaling", "softmax_scale")
# attention classes that compute their scale from the head size in forward, no attribute
RECOMPUTED_SCALE = frozenset({"ShiftedWindowAttention", "ShiftedWindowAttention3d"})
# attributes of other modules that hold a width; updated where every dim of that size of
# the module's own and its children's tensors became one new size
WIDTHS = ("hidden_size", "intermediate_size", "embed_dim", "d_model", "hidden_dim", "ffn_dim", "dim",
          "in_dim", "out_dim", "num_channels", "hidden_features", "in_features", "out_features")
Q_ALONE = ("q_proj", "query", "q", "to_q", "q_lin", "wq")  # a query projection of its own
Q_FUSED = ("qkv", "qkv_proj", "c_attn", "Wqkv", "in_proj")  # q, k, v stacked: q is the first third
_RTOL, _ATOL = 1e-4, 1e-6


class WritebackError(RewriteError):
    """The pruned weights cannot be put back into the model's own classes: the model is not
    the one pruned, or its code fixes a size that the plan changes and no attribute
    carries. ``result.module`` (or ``fxprune.save``) is the pruned model there."""


def apply(model: nn.Module, result: Any, example_inputs: Any = None, *, check: bool = True,
          strict_config: bool = False) -> nn.Module:
    """A pruned deep copy of ``model``, the module ``result`` was pruned from: same classes,
    the kept slices of its tensors, size attributes updated (see the module docstring for
    every invariant). ``model`` is never modified.

    Parameters
    ----------
    model : nn.Module
        The model given to ``fxprune.prune`` (a different or since-modified one is an error).
    result : PruneResult
    example_inputs : Tensor or tuple, optional
        Inputs for the check; by default random inputs of the captured shapes (token ids
        below the vocabulary size of the embedding that reads them).
    check : compare the copy with ``result.module`` on the inputs (``WritebackError`` if
        they differ).
    strict_config : a Hugging Face config that cannot express the pruned sizes is a
        ``ConfigError`` instead of a :class:`fxprune.hf.ConfigWarning`.

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 3))
    >>> r = fxprune.prune(net.eval(), torch.randn(1, 3, 16, 16), ratio=0.5)
    >>> small = fxprune.apply(net, r)
    >>> type(small).__name__, small[0].out_channels, small[1].num_features, small[2].in_channels
    ('Sequential', 4, 4, 4)
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise ConfigError(f"apply writes the pruned weights back into the model that was pruned (an "
                          f"nn.Module that is no GraphModule), got {type(model).__name__}; result.module is "
                          f"the pruned GraphModule")
    stages = tuple(result.stages) or (result,)
    out, heads = model, {}
    for stage in stages:
        out, found = _write_stage(out, stage, model, heads)
        heads.update(found)
    if hf.is_hf_model(out):
        hf.update_config(out, model, heads, strict=strict_config)
    if check:
        inputs = as_tuple(example_inputs) if example_inputs is not None else _made_inputs(stages[0].groups.gm, out)
        _check(out, result, stages, inputs)
    return out


# -- tensors --------------------------------------------------------------------------------
def _graph_tensors(gm: torch.fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor the graph reads: get_attr targets and the tensors of
    called modules."""
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_tensor(gm, node.target)
            if isinstance(value, torch.Tensor) and node.target not in seen:
                seen.add(node.target)
                yield node.target, value
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            for name, t in _named_tensors(module):
                path = f"{node.target}.{name}" if node.target else name
                if path not in seen:
                    seen.add(path)
                    yield path, t


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _lookup(root: nn.Module, path: str) -> torch.Tensor | None:
    try:
        value = get_tensor(root, path)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _gains(module: nn.Module) -> set[str]:
    """Paths of the weight-norm gains the rewrite rescales (not plain slices)."""
    out = set()
    for name, m in module.named_modules():
        norm = weight_norm_of(m)
        if norm is not None:
            out.add(f"{name}.{norm.g}" if name else norm.g)
    return out


def _write_stage(model: nn.Module, stage: Any, original: nn.Module, known: dict) -> tuple[nn.Module, dict]:
    """A copy of ``model`` holding ``stage.module``'s tensors at the paths its graph reads,
    with size attributes updated, and {attention module path: (heads, kv heads, head
    size)} where the plan changed them (``known``: those of earlier stages). ``model`` is checked to be what the stage pruned:
    every kept slice of its tensors equals the pruned graph's."""
    groups, pruned = stage.groups, stage.module
    gm = groups.gm
    rctx = RewriteContext(groups, stage.plan.kept)
    dims = slice_plan(groups, rctx)
    gains = _gains(gm)
    memo: dict[int, Any] = {}
    what = type(original).__name__
    pairs = []
    for path, t in _graph_tensors(gm):
        new = _lookup(pruned, path)
        if new is None:
            continue  # read by a size computation the rewrite dropped
        mine = _lookup(model, path)
        if mine is None:
            if dims.get(id(t)):
                raise WritebackError(f"the pruned graph slices tensor '{path}', which {what} does not hold as an "
                                     f"attribute (a tensor made or captured outside the module tree): its code "
                                     f"would keep using all of it. Use result.module instead")
            continue
        if mine.shape != t.shape:
            raise WritebackError(f"{what} is not the model this result was pruned from: its tensor '{path}' has "
                                 f"shape {tuple(mine.shape)}, the pruned model's source had {tuple(t.shape)}. "
                                 f"Pass the model given to fxprune.prune, or prune this one")
        pairs.append((path, t, new, mine))
    comp = getattr(stage.plan, "compensation", None)
    written = set(getattr(comp, "written", ()))  # tensors compensation recomputed: not slices
    hidden = [n.target for n in pruned.graph.nodes if n.op == "get_attr" and "_compensated_" in str(n.target)]
    if hidden:
        raise WritebackError(f"compensation added {', '.join(hidden[:3])} outside {what}'s layers (a layer "
                             f"called more than once, or a weight that is not a layer attribute): its classes "
                             f"cannot hold it. Use result.module, or prune without compensate=")
    for path, t, new, mine in pairs:
        if path not in gains and path not in written:
            expected = sliced_copy(mine, dims.get(id(t)))
            if expected.shape != new.shape or not torch.equal(expected, new.detach()):
                raise WritebackError(f"{what} differs from the model this result was pruned from: the kept part of "
                                     f"'{path}' is not what the pruned model holds (the model was changed since "
                                     f"it was pruned, or it is another one). Prune the model as it is now")
        if id(mine) not in memo:
            fresh = new.detach().clone()
            if isinstance(mine, nn.Parameter):
                fresh = nn.Parameter(fresh, requires_grad=mine.requires_grad)
            memo[id(mine)] = fresh
    before = {name: tuple(t.shape) for name, t in _named_tensors(model)}
    out = copy.deepcopy(model, memo)
    for path in written:  # a bias compensation gave a layer that had none, or a refit weight
        owner_path, _, leaf = path.rpartition(".")
        owner = out.get_submodule(owner_path) if owner_path else out
        value = _lookup(pruned, path)
        if value is None:
            raise WritebackError(f"compensation set '{path}', which the pruned module does not hold")
        if leaf not in owner._parameters and hasattr(owner, leaf):
            raise WritebackError(f"compensation set '{path}', but {type(owner).__name__}.{leaf} is not a "
                                 f"parameter slot there; use result.module")
        owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
    rebuilt = _copy_rewritten_attributes(gm, pruned, out)
    graph_args = _graph_arguments(gm, pruned)
    for name, m in out.named_modules():
        _fix_sizes(m, name, graph_args, name in rebuilt)
    found = _attention(out, model, stage, rctx, dims, known)
    _widths(out, before)
    return out, found


# -- attributes -----------------------------------------------------------------------------
def _size_value(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_size_value(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _copy_rewritten_attributes(gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule, out: nn.Module) -> set[str]:
    """Modules the symbolic trace called: the size attributes the rewrite recomputed on its
    rebuilt copies (``in_channels``, ``groups``, ``normalized_shape``, ``hidden_size``).
    Returns their paths."""
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        try:
            old, new, dst = (r.get_submodule(node.target) for r in (gm, pruned, out))
        except AttributeError:
            continue
        if type(dst) is not type(old):
            continue
        done.add(node.target)
        for key, value in new.__dict__.items():
            if _size_value(value) and key in old.__dict__ and old.__dict__[key] != value:
                setattr(dst, key, value)
    return done


_CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"})


def _graph_arguments(gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    """For tensors read by functional convolutions and group norms of the pruned graph (an
    exported graph has no modules): weight path -> {'groups': n} / {'num_groups': n}."""
    attrs = {n.name: n.target for n in pruned.graph.nodes if n.op == "get_attr"}
    out: dict[str, dict[str, Any]] = {}
    for node in pruned.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name not in _CONVS and name != "group_norm":
            continue
        try:
            a = bind_args(node).values
        except AnalysisError:  # no signature: not one of these ops
            continue
        weight = a.get("weight")
        if not (isinstance(weight, torch.fx.Node) and weight.name in attrs):
            continue
        if name in _CONVS and isinstance(a.get("groups", 1), int):
            out[attrs[weight.name]] = {"groups": a.get("groups", 1)}
        elif name == "group_norm" and isinstance(a.get("num_groups"), int):
            out[attrs[weight.name]] = {"num_groups": a["num_groups"]}
    return out


def _fix_sizes(m: nn.Module, name: str, graph_args: dict[str, dict[str, Any]], rebuilt: bool) -> None:
    """The size attributes of the standard layers, from their tensors (a convolution's
    groups from the rewrite: its rebuilt module, ``rebuilt``, or its op in the graph)."""
    prefix = f"{name}." if name else ""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.Bilinear):
        m.out_features, m.in1_features, m.in2_features = m.weight.shape
    elif isinstance(m, nn.modules.conv._ConvNd) and m.weight is not None:
        w = m.weight
        groups = m.groups if rebuilt else graph_args.get(prefix + "weight", {}).get("groups")
        if groups is None:  # no op of the graph says: a depthwise conv keeps its multiplier
            groups = m.groups
            if m.groups > 1 and m.groups == m.in_channels:
                groups = w.shape[0] if m.transposed else w.shape[0] * m.groups // m.out_channels
        m.groups = int(groups)
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, (nn.modules.batchnorm._NormBase,)):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            m.num_features = t.shape[0]
    elif isinstance(m, nn.GroupNorm):
        if m.weight is not None:
            m.num_channels = m.weight.shape[0]
        m.num_groups = graph_args.get(prefix + "weight", {}).get("num_groups", m.num_groups)
    elif isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        if m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    elif isinstance(m, nn.RNNBase):
        m.input_size = m.weight_ih_l0.shape[1]
        if getattr(m, "proj_size", 0):
            m.proj_size, m.hidden_size = m.weight_hr_l0.shape
        else:
            m.hidden_size = m.weight_hh_l0.shape[1]
        m._init_flat_weights()
    elif isinstance(m, nn.RNNCellBase):
        m.input_size, m.hidden_size = m.weight_ih.shape[1], m.weight_hh.shape[1]
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
        m.nx, m.nf = m.weight.shape  # transformers' transposed linear (GPT-2)


def _widths(out: nn.Module, before: dict[str, tuple]) -> None:
    """Width attributes of other modules (``LlamaMLP.intermediate_size``): where every dim of
    the module's own and its children's tensors that had the attribute's value now has one
    new size, the attribute takes it."""
    now = {name: tuple(t.shape) for name, t in _named_tensors(out)}
    for name, m in out.named_modules():
        if type(m).__module__.startswith("torch.nn"):
            continue
        prefix = f"{name}." if name else ""
        shapes = [(before[k], now[k]) for k in now if k.startswith(prefix) and k in before
                  and k[len(prefix):].count(".") <= 1]
        for attr in WIDTHS:
            value = m.__dict__.get(attr)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            new = {b[d] for a, b in shapes if len(a) == len(b) for d in range(len(a)) if a[d] == value}
            if len(new) == 1 and value not in new:
                setattr(m, attr, new.pop())


def _first(m: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for n in names:
        v = m.__dict__.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return n, v
    return None


def head_counts(m: nn.Module) -> tuple[int | None, int | None, int | None] | None:
    """(heads, key/value heads, head size) an attention module names (a Hugging Face module
    that names only its head size gives its counts through its config), None for a module
    that names neither a head count nor a head size."""
    h, kv, d = _first(m, HEADS), _first(m, KV_HEADS), _first(m, HEAD_DIM)
    if h is None and d is None or isinstance(m, nn.MultiheadAttention):
        return None
    cfg = m.__dict__.get("config")
    from_cfg = lambda name: getattr(cfg, name, None) if isinstance(getattr(cfg, name, None), int) else None  # noqa: E731
    return (h[1] if h else from_cfg("num_attention_heads"), kv[1] if kv else from_cfg("num_key_value_heads"),
            d[1] if d else None)


def _owner(node: torch.fx.Node, model: nn.Module) -> str | None:
    """The innermost module on ``node``'s module stack that names a head count or size."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if any(isinstance(c, nn.MultiheadAttention) for c in m.modules()):
            return None  # the split is nn.MultiheadAttention's own (decomposed inside its caller)
        if head_counts(m) is not None:
            return path
    return None


def _attention(out: nn.Module, model: nn.Module, stage: Any, rctx: RewriteContext, dims: dict,
               known: dict) -> dict:
    """Head counts and head size of attention modules, from the views that split channels
    into (heads, head_dim) and what the plan keeps of them; the scale fold."""
    groups = stage.groups
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    found: dict[str, list[tuple[str, int, int, int]]] = {}
    labels = [groups.node_labels.get(s) for s in groups.head_splits]
    rctx.prepare(label_tensors([lab for lab in labels if isinstance(lab, torch.Tensor)]))
    for split, lab in zip(groups.head_splits, labels):
        node = nodes.get(split)
        meta = tensor_meta(node) if node is not None else None
        path = _owner(node, model) if meta is not None and isinstance(lab, torch.Tensor) else None
        if path is None:
            continue
        h0, kv0, d0 = known.get(path) or head_counts(model.get_submodule(path))
        shape = meta.shape
        pairs = [a for a in range(len(shape) - 1) if (h0 is None or shape[a] in (h0, kv0 or h0))
                 and (d0 is None or shape[a + 1] == d0)]
        if not pairs:
            continue
        a = pairs[-1]
        kept = rctx.kept_index(lab)
        h_new = len(kept[1]) if kept is not None and kept[0] == a else shape[a]
        d_new = len(kept[1]) if kept is not None and kept[0] == a + 1 else shape[a + 1]
        role = "kv" if kv0 is not None and kv0 != h0 and shape[a] == kv0 else "q"
        found.setdefault(path, []).append((role, h_new, d_new, shape[a + 1]))
    heads = {path: _set_heads(out.get_submodule(path), model.get_submodule(path), path, splits, known.get(path))
             for path, splits in found.items()}
    for path, m in out.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            in_proj = _lookup(groups.gm, f"{path}.in_proj_weight") if m._qkv_same_embed_dim else None
            kept_rows = (dims.get(id(in_proj)) or {}).get(0) if in_proj is not None else None
            old = model.get_submodule(path)
            _multihead(m, old, path, groups.policy, kept_rows)
            for name, parent in out.named_modules():  # a block naming its attention's head count
                if path.startswith(name + ".") and not isinstance(parent, nn.MultiheadAttention) \
                        and sum(isinstance(c, nn.MultiheadAttention) for c in parent.modules()) == 1:
                    for n in HEADS:
                        if parent.__dict__.get(n) == old.num_heads:
                            setattr(parent, n, m.num_heads)
    return heads


def _set_heads(m: nn.Module, old: nn.Module, path: str, splits: list[tuple[str, int, int, int]],
               known: tuple | None) -> tuple:
    h0, kv0, _ = known or head_counts(old)
    q = [s for s in splits if s[0] == "q"] or splits
    kv = [s for s in splits if s[0] == "kv"]
    heads, head_dims, old_dim = {s[1] for s in q}, {s[2] for s in splits}, q[0][3]
    # no view of the keys seen: grouped-query counts stay, plain multi-head ones follow the queries
    kv_heads = {s[1] for s in kv} or ({kv0} if kv0 is not None and kv0 != h0 else set(heads))
    if len(heads) > 1 or len(kv_heads) > 1 or len(head_dims) > 1:
        raise WritebackError(f"{type(m).__name__} at '{path}' holds one head count and one head size, and the plan "
                             f"gives its views query head counts {sorted(heads)}, key/value head counts "
                             f"{sorted(kv_heads)} and head sizes {sorted(head_dims)} (queries/keys and values "
                             f"pruned apart): no attribute can carry that. Use result.module, or prune with "
                             f"policy='heads' (whole heads, the head size stays)")
    h, hkv, dim = heads.pop(), kv_heads.pop(), head_dims.pop()
    for names, value in ((HEADS, h), (KV_HEADS, hkv), (HEAD_DIM, dim)):
        for n in names:
            if isinstance(old.__dict__.get(n), int):
                setattr(m, n, value)
    if isinstance(old.__dict__.get("num_key_value_groups"), int) and hkv:
        m.num_key_value_groups = h // hkv
    for n in INNER:
        if h0 is not None and old.__dict__.get(n) == h0 * old_dim:
            setattr(m, n, h * dim)
    scales = [n for n in SCALES if isinstance(old.__dict__.get(n), float)
              and math.isclose(old.__dict__[n], old_dim ** -0.5, rel_tol=1e-9)]
    if dim != old_dim and (type(m).__name__ in RECOMPUTED_SCALE or scales):
        if _fold_query(m, math.sqrt(dim / old_dim), h * dim):
            for n in scales:  # as the class computes it from the new size
                setattr(m, n, dim ** -0.5)
    return h, hkv, dim


def _fold_query(m: nn.Module, factor: float, width: int) -> bool:
    """Multiply the query rows of ``m`` by ``factor`` (its query norm's gain when it has
    one, since a norm after the projection would undo the fold): True when done."""
    norm = m._modules.get("q_norm")
    with torch.no_grad():
        if norm is not None and not isinstance(norm, nn.Identity):
            if getattr(norm, "weight", None) is None:
                return False
            norm.weight.mul_(factor)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(factor)
            return True
        for name in Q_ALONE + Q_FUSED:
            proj = m._modules.get(name)
            if proj is None or getattr(proj, "weight", None) is None:
                continue
            rows = slice(None) if name in Q_ALONE else slice(0, width)
            if type(proj).__name__ == "Conv1D":  # (in, out): the query is columns
                proj.weight[:, rows].mul_(factor)
            else:
                proj.weight[rows].mul_(factor)
            if getattr(proj, "bias", None) is not None:
                proj.bias[rows].mul_(factor)
            return True
    return False


def _multihead(m: nn.MultiheadAttention, old: nn.MultiheadAttention, path: str, policy: str,
               kept_rows: torch.Tensor | None) -> None:
    """``nn.MultiheadAttention`` has one ``embed_dim`` for its input, its heads x head_dim
    (of queries, keys and values alike) and its output; torch scales by
    ``head_dim ** -0.5`` itself. ``kept_rows``: the rows of ``in_proj_weight`` kept."""
    e0 = old.embed_dim
    if m._qkv_same_embed_dim:
        width, kdim, vdim = (m.in_proj_weight.shape[1],) * 3
        sections = ([int(((kept_rows >= i * e0) & (kept_rows < (i + 1) * e0)).sum()) for i in range(3)]
                    if kept_rows is not None else [e0] * 3)
    else:
        width, kdim, vdim = m.q_proj_weight.shape[1], m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
        sections = [t.shape[0] for t in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
    if len(set(sections)) > 1:
        raise WritebackError(f"nn.MultiheadAttention at '{path}' holds one head size for queries, keys and values, "
                             f"and the plan keeps {sections[0]}, {sections[1]} and {sections[2]} of their "
                             f"{e0} channels: torch's module cannot hold that. Use result.module, or prune with "
                             f"policy='heads' (whole heads)")
    inner, out = sections[0], m.out_proj.weight.shape[0]
    if not inner == width == out:
        raise WritebackError(f"nn.MultiheadAttention at '{path}' takes one embed_dim for its input ({width} "
                             f"channels in the pruned model), its heads x head_dim ({inner}) and its output "
                             f"({out}): torch's module cannot hold these sizes. Use result.module, or keep the "
                             f"attention's channels with ignore=['{path}'] when pruning")
    d0 = old.embed_dim // old.num_heads
    heads, dim = (inner // d0, d0) if policy == "outer" and inner % d0 == 0 else (old.num_heads, inner // old.num_heads)
    if heads * dim != inner:
        raise WritebackError(f"nn.MultiheadAttention at '{path}': {inner} channels in {old.num_heads} heads of "
                             f"{d0} is no whole number of heads. Use result.module")
    m.embed_dim, m.num_heads, m.head_dim, m.kdim, m.vdim = inner, heads, dim, kdim, vdim
    if dim != d0:
        factor = math.sqrt(dim / d0)
        with torch.no_grad():
            w = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight
            w[:inner].mul_(factor)
            if m.in_proj_bias is not None:
                m.in_proj_bias[:inner].mul_(factor)


# -- the check ------------------------------------------------------------------------------
def _made_inputs(gm: torch.fx.GraphModule, model: nn.Module) -> tuple:
    """Random inputs of the captured shapes on ``model``'s device: floats from a seeded
    normal, integers below the row count of the embedding that reads them (else ones: an
    attention mask), booleans True."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    return tuple(t.to(device) for t in _cpu_inputs(gm))


def _cpu_inputs(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = tensor_meta(node)
        if meta is None:
            raise ConfigError(f"apply(check=True) needs example inputs: the model's input '{node.name}' is no "
                              f"tensor. Pass example_inputs=... (those given to fxprune.prune)")
        if meta.dtype.is_floating_point or meta.dtype.is_complex:
            out.append(torch.randn(meta.shape, generator=gen).to(meta.dtype))
        elif meta.dtype == torch.bool:
            out.append(torch.ones(meta.shape, dtype=torch.bool))
        else:
            rows = _embedding_rows(gm, node)
            out.append(torch.randint(0, rows, meta.shape, generator=gen, dtype=meta.dtype) if rows
                       else torch.ones(meta.shape, dtype=meta.dtype))
    return out


def _embedding_rows(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    for user in node.users:
        if user.op == "call_module":
            m = gm.get_submodule(user.target)
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and user.args[:1] == (node,):
                return m.num_embeddings
        elif user.op == "call_function" and "embedding" in getattr(user.target, "__name__", ""):
            weight = user.args[0] if user.args[1:2] == (node,) else user.kwargs.get("weight")
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                return get_tensor(gm, weight.target).shape[0]
    return None


def _train_flags(*modules: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for root in modules for m in root.modules()]


def _check(out: nn.Module, result: Any, stages: tuple, inputs: tuple) -> None:
    """``out`` must give ``result.module``'s outputs on ``inputs``."""
    gm_inputs = graph_inputs(stages[0].groups.gm, inputs)
    flags = _train_flags(out, result.module)
    out.eval()
    result.module.eval()
    try:
        with torch.no_grad():
            ref = result.module(*gm_inputs)
            with hf.capture_settings(out):
                try:
                    got = out(*inputs)
                except Exception as exc:
                    where = _user_frame(sys.exc_info()[2])
                    raise WritebackError(
                        f"the written-back {type(out).__name__} fails on the example inputs"
                        f"{f' at {where}' if where else ''}: {type(exc).__name__}: {exc}. {_advice(stages)}") from exc
    finally:
        for m, training in flags:
            m.training = training
    problem = _difference(ref, got)
    if problem:
        raise WritebackError(f"the written-back {type(out).__name__} does not compute what result.module computes on "
                             f"the example inputs: {problem}. {_advice(stages)}")


def _difference(ref: Any, got: Any) -> str | None:
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(ref)
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    if ref_spec != got_spec:
        return f"its outputs are structured differently ({got_spec}, expected {ref_spec})"
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        where = f"output{pytree.keystr(path)}"
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return f"{where} has shape {tuple(getattr(b, 'shape', ()))}, expected {tuple(a.shape)}"
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return f"{where} differs"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64)
        if not bool(finite.any()):
            continue
        err = float((a64 - b64).abs()[finite].max())
        scale = float(a64[finite].abs().max())
        if not err <= _ATOL + _RTOL * scale:
            return f"{where} differs by {err:.3g} (its scale is {scale:.3g})"
    return None


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch and fxprune, as 'file:line: code'."""
    from .capture import user_frame as frame

    return frame(tb)


def _changed_lines(stage: Any) -> list[str]:
    """Where the rewrite changed a size written in the graph (a view's shape, a split's
    sizes): the model's source line of each, or its module."""
    new_nodes = {n.name: n for n in stage.module.graph.nodes}
    lines: dict[str, None] = {}
    for old in stage.groups.gm.graph.nodes:
        new = new_nodes.get(old.name)
        if new is None or old.op not in ("call_function", "call_method", "call_module"):
            continue
        literal = lambda args: [a for a in pytree.tree_leaves(args) if not isinstance(a, torch.fx.Node)]  # noqa: E731
        if literal((old.args, old.kwargs)) == literal((new.args, new.kwargs)):
            continue
        lines[_source_of(old)] = None
    # a size inside a torch.nn layer's own forward is one of its attributes, which write-back sets
    return [line for line in lines if line and "/torch/nn/modules/" not in line]


def _source_of(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].startswith("File "):
            code = frames[i + 1] if i + 1 < len(frames) else ""
            return f"{frames[i]}: {code}"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        name = getattr(cls, "__qualname__", cls)
        return f"in the forward of '{path}' ({name}), op {node.format_node()}"
    return ""


def _advice(stages: tuple) -> str:
    lines = [line for stage in stages for line in _changed_lines(stage)]
    where = ""
    if lines:
        shown = "\n  ".join(lines[:6]) + (f"\n  ... ({len(lines) - 6} more)" if len(lines) > 6 else "")
        where = f"The pruned graph changed sizes written at:\n  {shown}\n"
    return (f"{where}The model's code fixes a size the plan changes (a literal shape, a size read from a global "
            f"or computed from one) that no module attribute carries. Use result.module (or fxprune.save) "
            f"instead, or keep those channels with ignore=[...] when pruning")


__all__ = ["WritebackError", "apply"]
