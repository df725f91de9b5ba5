"""Contractions: matmul, bmm, einsum and scaled dot-product attention.

Each operand's dims get letters (einsum style). Positions that meet in a product
share the letters of both operands: for every assignment of the shared letters,
the labels of both operands (over their private letters) are unioned, so a
channel is removed from one side exactly when it is removed from the other.
The output's labels come from the operand whose labels vary along an output
letter: the heads of q carry through to the attention scores, the features of v
to the attention output. When no operand's channels reach the output (q @ k^T
contracting head_dim), the output carries no channel.
"""

from __future__ import annotations

from typing import Any, Sequence, cast

import math
import operator
import string

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils import flop_counter

from ..errors import Unsupported
from ..labels import channel_dim, const_like, normalize
from .context import AnalysisContext, RewriteContext, weight_operand
from .conv import dense
from .registry import aten_ops, meta_empty, register


def _channel_letter(labels: torch.Tensor, letters: str) -> str | None:
    cd = channel_dim(labels)
    return None if cd is None else letters[cd]


def _vector(labels: torch.Tensor) -> torch.Tensor:
    cd = cast(int, channel_dim(labels))  # callers pass labels that vary along one dim
    return labels.movedim(cd, -1).reshape(-1, labels.shape[cd])[0]


def _single_class(ctx: AnalysisContext, labels: torch.Tensor) -> bool:
    roots = ctx.classes(_vector(labels))
    return bool((roots == roots[0]).all())


def _varying(labels: torch.Tensor) -> int:
    return sum(1 for n in labels.shape if n > 1)


def _settle(ctx: AnalysisContext, labels: torch.Tensor, letters: str, met: set[str | None]) -> torch.Tensor:
    """The labels of an operand that still has one per element (a parameter used by value,
    a relative-position table ``q @ rel_k.T``), made to vary along one letter: the one
    another operand's channels vary along (its positions there go with those channels,
    its other dims are not channels: they are unioned), else the analysis's usual choice."""
    dims = [d for d, c in enumerate(letters) if c in met and labels.shape[d] > 1]
    if not dims:
        return normalize(ctx.space, labels)
    d = dims[0]
    rows = labels.movedim(d, 0).reshape(labels.shape[d], -1)
    ctx.union(rows, rows[:, :1])
    return ctx.along(rows[:, 0].contiguous(), d, labels.ndim)


def contract(ctx: AnalysisContext, node: torch.fx.Node, operands: list[tuple[Any, str]],
             out_letters: str) -> torch.Tensor:
    """Relate labels of ``operands`` (list of (node, letters)) contracted into ``out_letters``.

    Each normalized operand's channels vary along at most one letter. Two operands that
    share a letter pair up position by position along it: when both vary along it their
    channels are unioned; when only one does, the other cannot shrink along that letter
    (its channels vary elsewhere) and the first is pinned, or (the other has a single
    class) coupled to it. An operand broadcast along a letter is not coupled along it.
    """
    metas = [ctx.meta(x).shape for x, _ in operands]
    ops = []
    size: dict[str, int] = {}
    for (_, letters), shape in zip(operands, metas):
        for c, n in zip(letters, shape):
            size[c] = max(size.get(c, 1), n)
    labs = [ctx.labels_or_const(x) for x, _ in operands]
    settled = [_varying(lab) <= 1 for lab in labs]
    met = {_channel_letter(lab, letters) for lab, (_, letters), ok in zip(labs, operands, settled) if ok}
    for k, ((_, letters), lab) in enumerate(zip(operands, labs)):
        if not settled[k]:  # a free tensor met here first: see _settle
            labs[k] = _settle(ctx, lab, letters, met)
    for (x, letters), shape, lab in zip(operands, metas, labs):
        if channel_dim(lab) is not None and _single_class(ctx, lab):
            lab = const_like(len(shape))  # distinct labels, one class (a bias merged into CONST)
        broadcast = {c for c, n in zip(letters, shape) if n == 1 and size[c] > 1}
        ops.append((letters, lab, _channel_letter(lab, letters), broadcast))
    for i in range(len(ops)):
        for j in range(len(ops)):
            if i == j:
                continue
            li, ai, ci, bi = ops[i]
            lj, aj, cj, bj = ops[j]
            if ci is None or ci not in lj:
                continue
            if ci in bj or ci in bi:
                ctx.pin(ai, f"{node.name}: operand broadcast across channels")
            elif cj == ci:
                if i < j:
                    ctx.union(_vector(ai), _vector(aj))
            elif cj is None:
                ctx.union(_vector(ai), aj.reshape(-1)[:1])
            else:
                ctx.pin(ai, f"{node.name}: the other operand's channels vary along another dim")
    out_ndim = len(out_letters)
    carried = [(c, lab) for letters, lab, c, bcast in ops if c is not None and c in out_letters and c not in bcast]
    if len({c for c, _ in carried}) > 1:
        # channels of two operands cross in the output (k^T v in linear attention, random
        # features times values): each output position has one label, so only one
        # operand's channels can be followed. The others are pinned (kept whole), and the
        # output carries the one left: one not pinned already, the last operand's if several.
        free = [c for c, lab in carried if not ctx.space.is_pinned(lab)]
        keep = free[-1] if free else None
        for c, lab in carried:
            if c != keep:
                ctx.pin(lab, f"{node.name}: channels of two operands cross in the output (the "
                             f"other's are followed)" if keep else
                        f"{node.name}: channels of two operands cross in the output")
        carried = [(c, lab) for c, lab in carried if c == keep]
    if carried:
        c, lab = carried[0]
        return ctx.along(_vector(lab), out_letters.index(c), out_ndim)
    return const_like(out_ndim)


def _matmul_letters(na: int, nb: int) -> tuple[str, str, str]:
    """Letters of a @ b with numpy broadcasting of batch dims."""
    batch = max(na, nb) - 2 if min(na, nb) >= 2 else max(na, nb) - (1 if min(na, nb) == 1 else 2)
    pool = iter(string.ascii_letters)
    bl = [next(pool) for _ in range(max(batch, 0))]
    i, k, j = "I", "K", "J"
    if na == 1 and nb == 1:
        return "K", "K", ""
    if na == 1:
        b = bl[len(bl) - (nb - 2):] if nb > 2 else []
        return k, "".join(b) + k + j, "".join(b) + j
    if nb == 1:
        a = bl[len(bl) - (na - 2):] if na > 2 else []
        return "".join(a) + i + k, k, "".join(a) + i
    a = bl[len(bl) - (na - 2):]
    b = bl[len(bl) - (nb - 2):]
    return "".join(a) + i + k, "".join(b) + k + j, "".join(bl) + i + j


def _operands(ctx: AnalysisContext) -> tuple[Any, Any]:
    """The two operands of a product, in parameter order (the ops name the second one
    ``other``, ``mat2`` or ``vec2``; torch.sparse.mm names them ``sparse`` and ``dense``)."""
    a, b, *_ = ctx.named_args(("input", "other")).values()
    return a, b


def matmul(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    a, b = _operands(ctx)
    weight = weight_operand(ctx.gm, b, 2)
    if weight is not None:  # x @ W.T with a parameter W: a linear layer written by hand
        path, transposed = weight
        out_vec = dense(ctx, node, a, 0, path, None, out_dim=0 if transposed else 1)
        return ctx.along(out_vec, -1, ctx.meta(node).ndim)
    la, lb, lo = _matmul_letters(ctx.meta(a).ndim, ctx.meta(b).ndim)
    ctx.consume(0)
    return contract(ctx, node, [(a, la), (b, lb)], lo)


# torch.sparse.mm: a (sparse) matrix product like any other (a GCN's adjacency)
register(torch.matmul, operator.matmul, "matmul", "__matmul__", torch.bmm, "bmm", torch.mm, "mm",
         torch.sparse.mm, *aten_ops("matmul", "mm", "bmm"))(matmul)


def einsum(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """einsum(equation, *operands) or (equation, [operands]): a contraction; the oracle
    zeroes removed channels in every operand (a channel summed over in the second and
    third operands only is not reached through the first)."""
    eq = cast(str, node.args[0])  # the equation
    ops: Sequence[Any] = node.args[1:]
    listed = None  # the position of the operand list, when they come as one
    if isinstance(node.target, torch._ops.OpOverload):
        ops, listed = cast("Sequence[Any]", node.args[1]), 1  # aten.einsum(equation, tensors, path=None)
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops, listed = ops[0], 1
    for k, op in enumerate(ops):
        if not ctx.is_tensor(op):
            continue
        if listed is None:
            ctx.consume(1 + k)
        else:
            ctx.consume(listed, item=k)
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if not arrow:
        rhs = "".join(sorted(c for c in set(lhs.replace(",", "").replace(".", "")) if lhs.count(c) == 1))
        rhs = ("..." if "..." in lhs else "") + rhs
    if "..." in eq:
        ins, rhs = _expand_ellipsis(ctx, ops, ins, rhs, eq)
    return contract(ctx, node, list(zip(ops, ins)), rhs)


def _expand_ellipsis(ctx: AnalysisContext, ops: Sequence[Any], ins: list[str], rhs: str,
                     eq: str) -> tuple[list[str], str]:
    """Letters for the dims an einsum's ``...`` stands for: broadcast like numpy (aligned
    from the right across operands), one fresh letter per dim, in the output where it
    writes ``...``."""
    spans = [ctx.meta(op).ndim - len(letters.replace("...", "")) if "..." in letters else 0
             for op, letters in zip(ops, ins)]
    spare = iter(c for c in string.ascii_letters if c not in eq)
    fresh = "".join(next(spare) for _ in range(max(spans, default=0)))
    ins = [letters.replace("...", fresh[len(fresh) - n:] if n else "") for letters, n in zip(ins, spans)]
    return ins, rhs.replace("...", fresh)


register(torch.einsum, *aten_ops("einsum"))(einsum)


def outer(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """outer(a, b)[i, j] = a[i] * b[j]."""
    a, b = _operands(ctx)
    return contract(ctx, node, [(a, "i"), (b, "j")], "ij")


register(torch.outer, torch.ger, "outer", "ger")(outer)


def sdpa(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """softmax(q k^T * scale + mask) @ v as one contraction of q (..LE), k (..SE) and
    v (..SV) into (..LV); the default scale depends on head_dim, so the rewrite passes the
    original scale explicitly."""
    a = ctx.named_args()
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    nq = ctx.meta(q).ndim
    batch = string.ascii_lowercase[:nq - 2]

    def letters(t: Any, tail: str) -> str:
        """The letters of ``t``'s dims, aligned from the right (a 1-d mask is S alone)."""
        n = ctx.meta(t).ndim
        return (batch + tail)[max(len(batch) + len(tail) - n, 0):]

    kv_letters: tuple[str, ...] = letters(k, "SE"), letters(v, "SV")
    if nq >= 3 and ctx.meta(k).ndim == nq and ctx.meta(k).shape[-3] not in (1, ctx.meta(q).shape[-3]):
        _group_query_heads(ctx, node, q, k, v)
        # kv heads get a letter of their own: query head h meets kv head h // rep, which
        # _group_query_heads has coupled; the contraction pairs the rest
        kv_letters = tuple(t[:-3] + "G" + t[-2:] for t in kv_letters)
    operands = [(q, letters(q, "LE")), (k, kv_letters[0]), (v, kv_letters[1])]
    if ctx.is_tensor(mask):
        _couple_mask(ctx, node, q, letters(q, "LE"), mask, letters(mask, "LS"))
    ctx.consume(0)
    return contract(ctx, node, operands, batch + "LV")


def _group_query_heads(ctx: AnalysisContext, node: torch.fx.Node, q: Any, k: Any, v: Any) -> None:
    """Grouped-query SDPA (``enable_gqa=True``): query head h attends with kv head
    ``h // rep``. Where the heads are the channels, a kv head goes with its query heads
    (``gqa="kv_groups"``), or the kv heads stay and every group loses the same query
    heads (``gqa="q_heads"``); head_dim channels pair as in any attention."""
    hq, hkv = ctx.meta(q).shape[-3], ctx.meta(k).shape[-3]
    if hq % hkv:
        raise Unsupported(f"grouped-query SDPA with {hq} query heads and {hkv} kv heads")
    labs = [ctx.labels_or_const(t) for t in (q, k, v)]
    on_heads = [channel_dim(l) == l.ndim - 3 for l in labs]
    if not any(on_heads):
        return
    if not all(on_heads):
        for l in labs:
            ctx.pin(l, f"{node.name}: grouped-query attention whose query and kv heads are not all channels")
        return
    groups = _vector(labs[0]).reshape(hkv, hq // hkv)
    for kv in labs[1:]:
        if ctx.gqa == "q_heads":
            heads = _vector(kv)
            ctx.union(heads, heads[:1])
        else:
            ctx.union(groups, _vector(kv).reshape(hkv, 1))
    if ctx.gqa == "q_heads":
        ctx.union(groups, groups[:1])


def _couple_mask(ctx: AnalysisContext, node: torch.fx.Node, q: Any, q_letters: str, mask: Any,
                 mask_letters: str) -> None:
    """The mask is added to the (.., heads, L, S) scores. One broadcast along the heads
    ((B, 1, L, S) padding) is the same for every head; a per-head one (T5's relative bias,
    ALiBi) goes with the heads, and one whose heads are not traced (an opaque op made it)
    keeps them all."""
    lq, lm = ctx.labels(q), ctx.labels_or_const(mask)
    cq = _channel_letter(lq, q_letters) if lq is not None else None
    cm = _channel_letter(lm, mask_letters)
    if cm is not None and cm != cq:
        ctx.pin(lm, f"{node.name}: attention mask with channels along its L or S dim")
    if cq is None or cq not in mask_letters or ctx.meta(mask).shape[mask_letters.index(cq)] == 1:
        return
    lq = cast(torch.Tensor, lq)  # cq is a letter: q has labels
    ctx.union(_vector(lq), _vector(lm) if cm == cq else lm.reshape(-1)[:1])


def rewrite_sdpa(r: RewriteContext, old: torch.fx.Node, new: torch.fx.Node) -> None:
    a = r.named_args(old)
    e_old, e_new = r.old_shape(a["query"])[-1], r.new_shape(a["query"])[-1]
    if e_old != e_new and a.get("scale") is None:
        r.set_arg(new, "scale", e_old ** -0.5)


def sdpa_shape(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """F.scaled_dot_product_attention(q, k, v, ...): q's leading dims, v's last."""
    if op is not F.scaled_dot_product_attention or len(args) != 3 or \
            set(kwargs) - {"attn_mask", "dropout_p", "is_causal", "scale"}:
        return None
    q, k, v = args
    mask = kwargs.get("attn_mask")
    if not all(isinstance(t, torch.Tensor) and t.ndim >= 2 and t.dtype == q.dtype for t in (q, k, v)):
        return None
    if not (q.ndim == k.ndim == v.ndim and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        return None
    if mask is not None:
        scores = (*q.shape[:-1], k.shape[-2])
        try:
            if not isinstance(mask, torch.Tensor) or \
                    torch.broadcast_shapes(mask.shape, scores) != scores:  # type: ignore[no-untyped-call]
                return None
        except RuntimeError:
            return None
    return meta_empty((*q.shape[:-1], v.shape[-1]), q.dtype)


def sdpa_flops(op: Any, args: tuple[Any, ...], out: Any) -> int:
    """Batch dims flattened into one, as ``torch.utils.flop_counter`` counts attention."""
    q, k, v = (a.shape for a in args[:3])
    batch = math.prod(q[:-2])
    return int(flop_counter.sdpa_flop_count((1, batch, *q[-2:]), (1, batch, *k[-2:]),  # type: ignore[no-untyped-call]
                                            (1, batch, *v[-2:])))


register(F.scaled_dot_product_attention, *aten_ops("scaled_dot_product_attention"), rewrite=rewrite_sdpa,
         shape=sdpa_shape, flops=sdpa_flops)(sdpa)
