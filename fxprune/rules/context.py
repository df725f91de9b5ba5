"""What op rules see: the analysis context (labels in, labels out, unions,
pins, parameter alignments) and the rewrite context (old and new shapes,
kept indices)."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.fx

from ..arguments import CallArgs, bind_args, replace_arg
from ..errors import AnalysisError, RewriteError
from ..labels import CONST, Family, LabelSpace, channel_dim, concat_tagged, const_like
from ..channels import MixSite
from ..meta import TensorMeta, get_meta, tensor_meta


MAX_FREE_LABELS = 1 << 20  # a larger free tensor is a constant (pinned), not a channel source

_aten = torch.ops.aten
# x @ W: the right operand of these is a weight matrix when it is a parameter
_MATMULS = frozenset({torch.matmul, torch.mm, "matmul", "mm", "__matmul__", _aten.matmul.default,
                      _aten.mm.default, operator.matmul})
# grouped (per-expert) matmuls: the second operand is a (experts, in, out) parameter
_GROUPED_MM = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")
# ops that take a parameter by reference (their rules align it by path, never by value)
_BY_PATH = frozenset({torch.nn.functional.embedding, torch.nn.functional.linear, _aten.embedding.default,
                      _aten.linear.default})
_LINEARS = frozenset({torch.nn.functional.linear, _aten.linear.default})  # weight at position 1
_CONVS = frozenset({torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                    _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
                    _aten.convolution.default})
_LINEAR_WEIGHTS = frozenset({torch.nn.functional.linear, _aten.linear.default})


def _transposes(node: torch.fx.Node, ndim: int) -> bool | None:
    """For a layout op on an ``ndim``-d tensor: True when it swaps the last two dims (t,
    .T, .mT, transpose, permute), False when it keeps the layout, None when it is not one."""
    if node.op not in ("call_function", "call_method"):
        return None  # (a submodule may be called "t")
    t = node.target
    args: Any = node.args  # torch.fx's Argument union: checked below
    if t in ("t", torch.t, _aten.t.default, _aten.numpy_T.default):
        return True if ndim == 2 else None
    if node.op == "call_function" and t is getattr and len(args) == 2 and args[1] in ("T", "mT"):
        return True if ndim == 2 or args[1] == "mT" else None
    if t in ("transpose", torch.transpose, _aten.transpose.int) and len(args) == 3:
        if not all(isinstance(a, int) for a in args[1:]):
            return None
        a, b = args[1] % ndim, args[2] % ndim
        return False if a == b else {a, b} == {ndim - 2, ndim - 1} or None
    if t in ("permute", torch.permute, _aten.permute.default):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % ndim for d in dims]
        keep = list(range(ndim))
        return False if dims == keep else dims == keep[:-2] + [ndim - 1, ndim - 2] or None
    return None


def weight_operand(root: torch.nn.Module, x: Any, ndim: int) -> tuple[str, bool] | None:
    """(path, transposed) when ``x`` is a parameter of ``ndim`` dims, possibly seen through
    transposes of its last two dims, used only as the weight of matmuls (``ndim=2``:
    ``x @ self.weight.T``, a linear layer written by hand as in Falcon) or of grouped
    matmuls (``ndim=3``: the (experts, in, out) matrices of a mixture of experts). Such a
    tensor is a weight with rows and columns, not a free tensor with a label per element.
    Its other uses may only take it by reference (a tied embedding); else None."""
    flips, node = False, x
    while isinstance(node, torch.fx.Node) and node.op != "get_attr":
        flip = _transposes(node, ndim)
        if flip is None or len(node.users) != 1:
            return None
        flips, node = flips ^ flip, node.args[0]
    if not isinstance(node, torch.fx.Node):
        return None
    t = get_tensor(root, attr_target(node))
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point():
        return None
    return (attr_target(node), flips) if _weight_uses_only(node, ndim) else None


def _weight_uses_only(node: torch.fx.Node, ndim: int) -> bool:
    """Every use of ``node`` is by reference or, through transposes, as the weight operand
    of a matmul or of F.linear (2-d), or of a grouped matmul (3-d)."""
    for user in node.users:
        operand = node
        if user.op == "call_function" and user.target in _BY_PATH:
            continue
        while _transposes(user, ndim) is not None and len(user.users) == 1:
            operand, user = user, next(iter(user.users))
        if user.op not in ("call_function", "call_method") or len(user.args) < 2 \
                or user.args[1] is not operand or user.args[0] is operand:
            return False
        if ndim == 2 and not ((user.target in _MATMULS and len(user.args) == 2) or user.target in _LINEARS):
            return False
        if ndim == 3 and getattr(getattr(user.target, "_schema", None), "name", None) not in _GROUPED_MM:
            return False
    return True


def _feeds_dense_weight(node: torch.fx.Node, ndim: int, depth: int = 8) -> bool:
    """Whether ``node``'s value (``ndim`` dims) reaches the weight argument of a
    convolution (of ``F.linear`` when 2-d) within ``depth`` ops (a weight standardized or
    masked in ``forward``)."""
    targets = _LINEAR_WEIGHTS if ndim == 2 else _CONVS
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "call_function" and user.target in targets:
                    if len(user.args) > 1 and user.args[1] is n or user.kwargs.get("weight") is n:
                        return True
                    continue
                nxt.append(user)
        frontier = nxt
    return False


def get_tensor(root: torch.nn.Module, path: str) -> torch.Tensor:
    """The tensor attribute at a dotted ``path`` of ``root``."""
    *parents, name = path.split(".")
    obj: Any = root
    try:  # the dicts nn.Module keeps: several times faster than its __getattr__
        for part in parents:
            obj = obj._modules[part]
        d = obj.__dict__
        for table in ("_parameters", "_buffers"):
            t = d.get(table, {}).get(name)
            if t is not None:
                return cast(torch.Tensor, t)
    except (KeyError, AttributeError):
        obj = root
        for part in parents:
            obj = getattr(obj, part)
    return cast(torch.Tensor, getattr(obj, name))


def get_module(root: torch.nn.Module, target: str) -> torch.nn.Module:
    """The submodule at a dotted ``target`` (``root.get_submodule``, walking the module
    dicts directly: lookups happen for every node of every pass)."""
    obj: Any = root
    try:
        for part in target.split(".") if target else ():
            obj = obj._modules[part]
    except (KeyError, AttributeError):
        return root.get_submodule(target)
    if not isinstance(obj, torch.nn.Module):
        return root.get_submodule(target)  # raises its own clear error
    return obj


def attr_target(node: torch.fx.Node) -> str:
    """The dotted path a ``get_attr`` or ``call_module`` node names, or the method name of
    a ``call_method`` node (torch.fx types a target as a callable or a str; these ops
    always hold a str)."""
    return cast(str, node.target)


def op_name(node: torch.fx.Node) -> str:
    """The bare name of what ``node`` calls: a method name, an ATen packet's name
    (``aten.view.default`` -> ``"view"``) or a function's ``__name__``."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t.overloadpacket.__name__)
    return str(getattr(t, "__name__", ""))


def _only_along(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """``labels`` with every dim but ``dim`` cut to its first position."""
    index = tuple(slice(None) if d == dim else slice(0, 1) for d in range(labels.ndim))
    return labels[index]


class AnalysisContext:
    """The state of the channel-dependency analysis, and the API op rules use."""

    def __init__(self, gm: torch.fx.GraphModule, space: LabelSpace, policy: str = "inner"):
        self.gm = gm
        self.space = space
        self.policy = policy
        self.labels_of: dict[torch.fx.Node, Any] = {}
        # parameters used by value, and values computed from them alone (a chunk of a
        # rotary table): their labels stay one per element until they meet a channel
        self.free_nodes: set[torch.fx.Node] = set()
        self.alignments: list[tuple[str, torch.Tensor, str, str]] = []
        self.consumers: list[tuple[str, int | str | tuple[int, int]]] = []
        self.param_consumers: list[tuple[str, str, torch.Tensor]] = []
        self.barriers: list[str] = []
        # Python ints computed from a channel count (x.size(1), c // heads): True, or for a
        # size tuple the set of its entries that are channel counts
        self.channel_sized: dict[str, Any] = {}
        self._tensor_paths: dict[int, list[str]] = {}
        self._first_alignment: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.node: torch.fx.Node | None = None
        self.splits_channels = False  # set by view-like rules: the policy picks the channel dim
        self.avoid_dims: set[int] = set()  # ... but not one of these (unpacked right away)
        self.head_splits: list[tuple[str, torch.Tensor]] = []  # views where the policy chose
        self.gqa = "kv_groups"  # grouped-query attention: remove whole kv groups or q heads
        self.strict = True  # a rule's unexpected exception is raised (False: a barrier)
        self.opaque_tensors: dict[int, str] = {}  # id(tensor) -> why it must not be sliced
        # a weight-normalized weight ("layer.weight", or "<node>" for an exported
        # _weight_norm) -> the paths of its g and v, and the dim g varies along
        self.weight_norms: dict[str, tuple[str, str, int]] = {}
        self.mixing: list[MixSite] = []  # ops that mix channel values (see inexact)
        self.wider: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # see keep_wider
        self._named_args: dict[tuple[torch.fx.Node, tuple[str, ...]], CallArgs] = {}  # see named_args

    # -- reading the graph ----------------------------------------------
    @property
    def current(self) -> torch.fx.Node:
        """The node whose rule is running."""
        if self.node is None:
            raise AnalysisError("no op rule is running")
        return self.node

    @property
    def module(self) -> Any:
        """The submodule a ``call_module`` node calls (typed ``Any``: rules read the
        attributes of its layer type, ``in_channels``, ``eps``, which torch types as
        ``Tensor | Module``)."""
        return get_module(self.gm, attr_target(self.current))

    def meta(self, x: Any) -> TensorMeta:
        m = tensor_meta(x)
        if m is None:
            raise AnalysisError(f"node {x} of {self.where()} carries no tensor shape")
        return m

    def is_tensor(self, x: Any) -> bool:
        return tensor_meta(x) is not None

    def value(self, x: Any) -> Any:
        """Concrete value of a non-tensor argument (ints from ``x.size()`` included)."""
        if isinstance(x, torch.fx.Node):
            return get_meta(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x)
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        return x

    def named_args(self, names: Sequence[str] = (), node: torch.fx.Node | None = None) -> Mapping[str, Any]:
        """The arguments of ``node`` (default: the current node) by parameter name, so a rule
        reads ``a["dim"]`` whether the call passed it by position or by keyword (see
        :func:`bind_args`; ``names`` names the positional arguments of a call torch.fx
        cannot bind, a method call for one)."""
        n = self.current if node is None else node
        key = (n, tuple(names))
        cached = self._named_args.get(key)
        if cached is None:
            module = type(get_module(self.gm, attr_target(n))) if n.op == "call_module" else None
            cached = self._named_args[key] = bind_args(n, names, module, self.where())
        return cached.values

    def where(self) -> str:
        return str(self.node.format_node()) if self.node is not None else "<graph>"

    # -- labels -----------------------------------------------------------
    def labels(self, x: Any) -> torch.Tensor | None:
        """Label tensor of argument ``x`` (None for non-tensors and Python scalars)."""
        if not isinstance(x, torch.fx.Node):
            return None
        if x.op == "get_attr" and x not in self.labels_of:
            self.labels_of[x] = self._attr_labels(x)
        got = self.labels_of.get(x)
        return got if isinstance(got, torch.Tensor) else None

    def labels_or_const(self, x: Any) -> torch.Tensor:
        """Label tensor of tensor argument ``x``, or CONST labels of its rank when it has none."""
        labels = self.labels(x)
        return labels if labels is not None else const_like(self.meta(x).ndim)

    def tuple_labels(self, x: Any) -> tuple[Any, ...] | None:
        got = self.labels_of.get(x) if isinstance(x, torch.fx.Node) else None
        return got if isinstance(got, tuple) else None

    def _attr_labels(self, node: torch.fx.Node) -> Any:
        path = attr_target(node)
        t = get_tensor(self.gm, path)
        if not isinstance(t, torch.Tensor):
            return None
        if t.ndim == 0 or not t.is_floating_point() or t.layout != torch.strided:
            return const_like(t.ndim)  # sparse tensors (a graph's adjacency) are never sliced
        if t.ndim in (2, 3) and _weight_uses_only(node, t.ndim):  # (grouped) matmul weights:
            return const_like(t.ndim)                            # their rules align them
        if t.ndim >= 2 and _feeds_dense_weight(node, t.ndim):
            # a conv or linear weight computed from this one (weight standardization, a
            # mask): one label per output channel; the layer aligns the inputs itself
            labels = self.space.fresh((t.shape[0],) + (1,) * (t.ndim - 1),
                                      Family(f"tensor {node.target}", node.name))
            self.align(path, labels, "free")
            self.free_nodes.add(node)
            return labels
        # a parameter or buffer used by value (layer scale, positional embedding, rotary
        # frequencies): every position gets a fresh label, so it is sliced with what it meets
        labels = self.free_labels(node, tuple(t.shape), f"tensor {node.target}")
        if labels.any():
            self.align(path, labels, "free")
        return labels

    def free_labels(self, node: torch.fx.Node, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """A fresh label for every position of ``node``'s value, which is then *free*: not
        normalized here, the ops that use it decide which dim is the channel."""
        if math.prod(shape) > MAX_FREE_LABELS and len(shape) >= 2 and 1 < shape[-1] <= MAX_FREE_LABELS:
            # too many elements to label one by one (a position table for thousands of
            # positions): one label per entry of the last dim, where tables keep their
            # channels; used along another dim, the shared labels couple what they meet
            # (kept whole), never a wrong slice
            shape = (1,) * (len(shape) - 1) + (shape[-1],)
        elif math.prod(shape) > MAX_FREE_LABELS:
            self.barriers.append(f"{node.name}: {what} has {math.prod(shape)} elements; "
                                 f"treated as a constant")
            return const_like(len(shape))
        self.free_nodes.add(node)
        return self.space.fresh(shape, Family(what, node.name))

    def full(self, x: Any) -> torch.Tensor:
        """Label tensor of ``x`` expanded to its actual shape."""
        labels = self.labels(x)
        shape = self.meta(x).shape
        if labels is None:
            labels = const_like(len(shape))
        return labels.expand(shape)

    def fresh(self, shape: Any, what: str) -> torch.Tensor:
        return self.space.fresh(shape, Family(what, self.node.name if self.node is not None else None))

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.space.union(a, b)

    def pin(self, labels: torch.Tensor | None, reason: str) -> None:
        if labels is not None:
            self.space.pin(labels, reason)

    def inexact(self, labels: torch.Tensor | None, reason: str, masked: Any = None) -> None:
        """The current op mixes the values of the channels in ``labels`` (statistics,
        softmax, a count used as a value): removing some changes the kept ones. ``masked``
        is its masked semantics (``fxprune.masked``): how the oracle evaluates it as if the
        removed channels were absent; without one, the oracle cannot check a plan that
        removes these channels and says so."""
        if labels is not None:
            self.space.mark_inexact(labels, reason)
            self.mixing.append(MixSite(self.node.name if self.node is not None else "", labels,
                                       reason, masked))

    def keep_wider(self, a: torch.Tensor, b: torch.Tensor, reason: str) -> None:
        """Every plan must keep more channels of ``a`` than of ``b`` (an LSTM's cell
        must stay wider than its projection): selection keeps more of ``a`` where needed."""
        self.wider.append((a, b, reason))

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        return self.space.roots(labels)

    def vector(self, x: Any, dim: int) -> torch.Tensor:
        """The labels along ``dim`` of tensor ``x`` as a 1-d vector of its actual size:
        positions that share an index along ``dim`` are unioned (they meet in one weight
        column)."""
        shape = self.meta(x).shape
        dim = dim % len(shape)
        labels = self.labels(x)
        if labels is None:
            return torch.full((shape[dim],), CONST, dtype=torch.int64)
        moved = labels.movedim(dim, 0)
        rows = moved.reshape(moved.shape[0], -1)
        if rows.shape[1] > 1:
            self.union(rows, rows[:, :1])
        return rows[:, 0].expand(shape[dim]).contiguous()

    def along(self, vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
        """Shape a 1-d label vector as a label tensor of ``ndim`` dims varying along ``dim``."""
        shape = [1] * ndim
        shape[dim % ndim] = vector.numel()
        return vector.reshape(shape)

    # -- parameters --------------------------------------------------------
    def tensor(self, path: str) -> torch.Tensor:
        """The tensor at ``path`` (for a weight-normalized weight, its ``v``: same shape)."""
        normed = self.weight_norms.get(path)
        return get_tensor(self.gm, normed[1] if normed is not None else path)

    def attr_path(self, x: Any) -> str | None:
        """The attribute path when argument ``x`` is a ``get_attr`` node (or the key of an
        exported weight normalization, aligned through its g and v), else None."""
        if isinstance(x, torch.fx.Node):
            if x.op == "get_attr":
                return attr_target(x)
            key = f"<{x.name}>"
            if key in self.weight_norms:
                return key
        return None

    def align(self, path: str, labels: torch.Tensor, role: str) -> None:
        """Record that the tensor at ``path`` is sliced by ``labels`` (broadcastable to its
        shape). A tensor reached twice (tied weights) has its alignments unioned. The
        weight of a weight-normalized layer is computed: its ``v`` is aligned instead, and
        its ``g`` along the dim it varies on."""
        normed = self.weight_norms.get(path)
        if normed is not None:
            g, v, dim = normed
            self.align(v, labels, role)
            if dim != -1 and labels.shape[dim] > 1:
                self.align(g, _only_along(labels, dim), "norm")
            return
        t = self.tensor(path)
        if labels.ndim != t.ndim:
            raise AnalysisError(f"{self.where()}: alignment of {path} has {labels.ndim} dims, "
                                f"the tensor {t.ndim}")
        key = (id(t), tuple(labels.shape))  # tied uses of a tensor along the same dims
        first = self._first_alignment.get(key)
        if first is not None:
            self.union(first, labels)
        else:
            self._first_alignment[key] = labels
        self.alignments.append((path, labels, role, self.node.name if self.node is not None else ""))

    def consume(self, argpos: int, name: str | None = None, item: int | None = None) -> None:
        """The current op contracts over the labelled positions of its input ``argpos``
        (or of keyword argument ``name`` when it is not passed by position; ``item``: the
        entry of a list passed there, as einsum's operands can be): the oracle zeroes
        removed channels there."""
        if item is not None:
            self.consumers.append((self.current.name, (argpos, item)))
            return
        node = self.current
        by_name = name is not None and argpos >= len(node.args) and name in node.kwargs
        self.consumers.append((node.name, name if by_name and name is not None else argpos))

    def consume_param(self, path: str, labels: torch.Tensor) -> None:
        """The current (opaque) module contracts over positions of its own tensor ``path``
        labelled ``labels`` (a recurrent weight's hidden columns): the oracle zeroes the
        removed ones inside the module."""
        self.param_consumers.append((self.current.name, path, labels))

    def barrier(self, reason: str) -> None:
        """Pin every tensor input of the current node and record why. A parameter handed to
        an opaque op is never sliced (no label is made for it here; any use elsewhere is
        pinned when the walk ends)."""
        for inp in self.current.all_input_nodes:
            if inp.op == "get_attr" and inp not in self.labels_of:
                self.opaque_tensors[id(get_tensor(self.gm, attr_target(inp)))] = reason
                continue
            self.pin(self.labels(inp), reason)
            tl = self.tuple_labels(inp)
            for labels in tl or ():
                if isinstance(labels, torch.Tensor):
                    self.pin(labels, reason)
        self.barriers.append(reason)

    def const_output(self) -> Any:
        """CONST labels shaped like the current node's output (a tensor or a tuple)."""
        return _const_for(get_meta(self.current))


def _const_for(meta: Any) -> Any:
    if isinstance(meta, TensorMeta):
        return const_like(meta.ndim)
    if isinstance(meta, tuple):
        return tuple(_const_for(m) for m in meta)
    return None


class RewriteContext:
    """What a rule's rewrite hook sees: shapes before and after, kept indices,
    the copied node and (for modules) the rebuilt module."""

    def __init__(self, groups: Any, kept: torch.Tensor):
        self.groups = groups
        self.kept = kept
        self.module_for: Any = None  # set by the rewrite: target -> the rebuilt module
        self.fold_weight_norm: Any = None  # ... (g, v, dim) of a weight norm: see fxprune.weight_norm
        self._kept: dict[int, tuple[torch.Tensor, Any]] = {}  # id(labels) -> (labels, answer)
        self._bound: dict[torch.fx.Node, dict[tuple[str, ...], CallArgs]] = {}  # see named_args

    def module(self, old: torch.fx.Node) -> Any:
        """The rebuilt module that the copy of ``call_module`` node ``old`` calls (``Any``,
        as :attr:`AnalysisContext.module`)."""
        return self.module_for(old.target)

    def named_args(self, node: torch.fx.Node, names: Sequence[str] = ()) -> Mapping[str, Any]:
        """The arguments of ``node`` (the old node or its copy) by parameter name, as
        :meth:`AnalysisContext.named_args` reads them."""
        return self._bind(node, names).values

    def set_arg(self, node: torch.fx.Node, name: str, value: Any, names: Sequence[str] = ()) -> None:
        """Set argument ``name`` of the copied node ``node`` to ``value``, by position or by
        keyword as the call passed it (``names``: as for :meth:`named_args`)."""
        replace_arg(node, self._bind(node, names), name, value)
        self._bound.pop(node, None)

    def _bind(self, node: torch.fx.Node, names: Sequence[str]) -> CallArgs:
        by_names = self._bound.setdefault(node, {})
        got = by_names.get(tuple(names))
        if got is None:
            module = type(self.module_for(node.target)) if node.op == "call_module" else None
            got = by_names[tuple(names)] = bind_args(node, names, module)
        return got

    def kept_index(self, labels: torch.Tensor | None) -> tuple[int, torch.Tensor] | None:
        """(dim, kept indices) of a normalized label tensor, or None when nothing there goes."""
        if labels is None:
            return None
        got = self._kept.get(id(labels))
        if got is None or got[0] is not labels:
            got = self._kept[id(labels)] = (labels, self._kept_index(labels))
        return got[1]

    def prepare(self, labels: list[torch.Tensor]) -> None:
        """Compute :meth:`kept_index` for many label tensors in one vectorized pass (the
        rewrite asks for every alignment and most nodes: one by one, the small tensor
        ops dominate)."""
        todo = list({id(l): l for l in labels if id(l) not in self._kept}.values())
        if not todo:
            return
        sizes = [l.numel() for l in todo]
        flat, tag = concat_tagged(todo)
        mask = self.kept[self.groups.class_of[flat]]
        size_t = torch.tensor(sizes, dtype=torch.int64)
        position = torch.arange(flat.numel()) - (torch.cumsum(size_t, 0) - size_t)[tag]  # index in its tensor
        removed = torch.zeros(len(todo), dtype=torch.int64).index_add_(0, tag, (~mask).long()).tolist()
        pieces = torch.split(position[mask], [n - r for n, r in zip(sizes, removed)])
        for l, n_removed, idx in zip(todo, removed, pieces):
            dim = channel_dim(l)
            if n_removed == 0:
                answer = None
            elif dim is None:
                answer = self._kept_index(l)  # raises its error
            else:
                answer = (dim, idx)
            self._kept[id(l)] = (l, answer)

    def _kept_index(self, labels: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        dim = channel_dim(labels)
        mask = self.kept[self.groups.class_of[labels.reshape(-1)]]
        if dim is None:
            if not bool(mask.all()):
                raise RewriteError("the plan removes the only channel class of a tensor; "
                                   "select must keep at least one channel of every tensor")
            return None
        if bool(mask.all()):
            return None
        return dim, mask.nonzero().reshape(-1)

    def node_labels(self, node: Any, index: int | None = None) -> torch.Tensor | None:
        """The labels of ``node`` (a node, typed ``Any`` as the node arguments rules pass are)."""
        got = self.groups.node_labels.get(node.name)
        if index is not None and isinstance(got, tuple):
            got = got[index]
        return got if isinstance(got, torch.Tensor) else None

    def old_shape(self, node: Any, index: int | None = None) -> tuple[int, ...]:
        meta = get_meta(node)
        if index is not None:
            meta = meta[index]
        return tuple(meta.shape)

    def new_shape(self, node: Any, index: int | None = None) -> tuple[int, ...]:
        shape = list(self.old_shape(node, index))
        got = self.kept_index(self.node_labels(node, index))
        if got is not None:
            dim, idx = got
            shape[dim] = idx.numel()
        return tuple(shape)

    def kept_along(self, node: Any, dim: int, index: int | None = None) -> torch.Tensor | None:
        """Kept indices of ``node``'s value along ``dim`` (None: all kept)."""
        got = self.kept_index(self.node_labels(node, index))
        if got is None:
            return None
        d, idx = got
        ndim = len(self.old_shape(node, index))
        return idx if d == dim % ndim else None
