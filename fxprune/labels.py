"""Channel labels: the decision variables of structural pruning.

Every channel position of every tensor in the graph carries an integer label.
A *label tensor* ``L`` is an int64 tensor broadcastable to the value's shape
(dims where the label does not depend on the index have size 1). Labels are
unioned into equivalence classes by a union-find; removing a class removes
every tensor position, weight row and weight column that carries one of its
labels.

Label 0 is ``CONST``: positions that hold constants (padding, model inputs,
values no rule understands). Its class is pinned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONST = 0
_MAX_REASONS = 4


@dataclass(frozen=True)
class Family:
    """Where a block of fresh labels came from (a node or a parameter)."""

    what: str
    node: str | None = None


class LabelSpace:
    """A union-find over labels with families and per-class annotations.

    The parent array is a tensor and every operation is vectorized: a union of two
    label tensors hooks all their roots at once, however many channels they hold.
    Every label's parent is no larger than the label itself, so CONST (0) and, in
    general, the oldest label of a class is its root.

    Examples
    --------
    >>> s = LabelSpace()
    >>> a = s.fresh((3,), Family("a")); b = s.fresh((3,), Family("b"))
    >>> s.union(a, b)
    >>> bool((s.roots(a) == s.roots(b)).all())
    True
    """

    def __init__(self) -> None:
        self._parent = torch.zeros(1024, dtype=torch.int64)
        self._n = 1  # label 0 is CONST
        self._sizes: list[int] = [1]  # labels per family, in creation order
        self.families: list[Family] = [Family("constant")]
        # (labels, reason) in the order they were noted, resolved to classes at the end
        # (see class_notes): a union after the note carries it to the merged class
        self.pinned: list[tuple[torch.Tensor, str]] = [(torch.tensor([CONST]), "constant")]
        self.inexact: list[tuple[torch.Tensor, str]] = []

    # -- construction ---------------------------------------------------
    def fresh(self, shape, family: Family) -> torch.Tensor:
        """A tensor of ``shape`` filled with new labels of a new family."""
        n = 1
        for s in shape:
            n *= int(s)
        start = self._n
        if start + n > self._parent.numel():
            grown = torch.empty(max(2 * self._parent.numel(), start + n), dtype=torch.int64)
            grown[:start] = self._parent[:start]
            self._parent = grown
        labels = torch.arange(start, start + n, dtype=torch.int64)
        self._parent[start:start + n] = labels
        self._n = start + n
        self.families.append(family)
        self._sizes.append(n)
        return labels.reshape(tuple(shape))

    def __len__(self) -> int:
        return self._n

    @property
    def family_of(self) -> torch.Tensor:
        """The family index of every label."""
        return torch.repeat_interleave(torch.arange(len(self._sizes), dtype=torch.int64),
                                       torch.tensor(self._sizes, dtype=torch.int64))

    def all_roots(self) -> torch.Tensor:
        """The root of every label, by vectorized pointer jumping."""
        parent = self._parent[:self._n]
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                self._parent[:self._n] = parent  # full path compression
                return parent.clone()
            parent = grand

    # -- union-find -----------------------------------------------------
    def _find(self, flat: torch.Tensor) -> torch.Tensor:
        # index_select / index_copy_ and torch.equal: the cheapest kernels for these small
        # int64 vectors (advanced indexing and a comparison + any() cost several times more)
        parent = self._parent
        r = parent.index_select(0, flat)
        while True:
            up = parent.index_select(0, r)
            if torch.equal(up, r):
                break
            r = up
        parent.index_copy_(0, flat, r)  # path compression
        return r

    def find(self, x: int) -> int:
        return int(self._find(torch.tensor([x], dtype=torch.int64))[0])

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union labels of ``a`` and ``b`` position by position (with broadcasting)."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        if torch.equal(a, b):
            return
        ra, rb = self._find(a), self._find(b)
        while not torch.equal(ra, rb):
            # hook every larger root onto the smallest root it is paired with (a pair that
            # already shares its root changes nothing); chains that form (3 -> 2 -> 1) are
            # followed by the next find, and the loop repeats until every pair shares a root
            lo, hi = torch.minimum(ra, rb), torch.maximum(ra, rb)
            self._parent.scatter_reduce_(0, hi, lo, "amin")
            ra, rb = self._find(lo), self._find(hi)

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        """The class root of every label in ``labels`` (same shape)."""
        return self._find(labels.reshape(-1)).reshape(labels.shape)

    # -- annotations ----------------------------------------------------
    def pin(self, labels: torch.Tensor, reason: str) -> None:
        """Mark the classes of ``labels`` as never removable, with a reason."""
        self.pinned.append((labels, reason))

    def is_pinned(self, labels: torch.Tensor) -> bool:
        """Whether every class of ``labels`` is pinned already (pins only ever spread, so
        a rule may rely on it)."""
        pinned = self._find(concat_tagged([l for l, _ in self.pinned])[0])
        return bool(torch.isin(self.roots(labels).reshape(-1), pinned).all())

    def mark_inexact(self, labels: torch.Tensor, reason: str) -> None:
        """Mark the classes of ``labels`` as touched by a value-mixing op."""
        self.inexact.append((labels, reason))

    def class_notes(self, notes: list[tuple[torch.Tensor, str]], class_of: torch.Tensor,
                    n: int) -> tuple[torch.Tensor, dict[int, list[str]]]:
        """Resolve ``pinned`` or ``inexact`` to classes (``class_of``: the class of every
        label): a flag per class and, for the flagged ones, the first few distinct
        reasons in the order they were noted."""
        flags = torch.zeros(n, dtype=torch.bool)
        reasons: dict[int, list[str]] = {}
        if not notes:
            return flags, reasons
        texts: dict[str, int] = {}
        rid = torch.tensor([texts.setdefault(r, len(texts)) for _, r in notes], dtype=torch.int64)
        flat, note = concat_tagged([l for l, _ in notes])
        cls = class_of[flat]
        flags[cls] = True
        n_texts = len(texts)
        keys = torch.unique(cls * n_texts + rid[note])  # by class, then reason
        c = keys // n_texts
        first = torch.searchsorted(c, c, side="left")
        keys = keys[torch.arange(keys.numel()) - first < _MAX_REASONS]  # a few reasons per class
        text_of = list(texts)
        for key in keys.tolist():
            reasons.setdefault(key // n_texts, []).append(text_of[key % n_texts])
        return flags, reasons


# -- label-tensor helpers ---------------------------------------------------
def label_tensors(values) -> list[torch.Tensor]:
    """The label tensors among per-node labels (a tensor, a tuple of them, or None), each
    object once (several nodes may share one)."""
    found: dict[int, torch.Tensor] = {}
    for got in values:
        for l in (got if isinstance(got, tuple) else (got,)):
            if isinstance(l, torch.Tensor):
                found.setdefault(id(l), l)
    return list(found.values())


def concat_tagged(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All elements of ``tensors`` flattened into one vector, and for each element the
    index of the tensor it came from: per-tensor work done in one vectorized pass."""
    sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    tag = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int64), sizes)
    return torch.cat([t.reshape(-1) for t in tensors]), tag


def unique_runs(values: torch.Tensor) -> torch.Tensor:
    """``torch.unique`` of a vector that is mostly runs of one value (labels numbered
    together, a concatenation's parts): only the first value of each run is sorted."""
    if values.numel() < 2:
        return torch.unique(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    torch.ne(values[1:], values[:-1], out=starts[1:])
    return torch.unique(values[starts])


def const_like(ndim: int) -> torch.Tensor:
    """A label tensor of ``ndim`` dims, all CONST."""
    return torch.full((1,) * ndim, CONST, dtype=torch.int64)


def constant_along(k: torch.Tensor, dim: int) -> bool:
    """True when ``k`` does not change along ``dim``."""
    if k.shape[dim] <= 1 or k.stride(dim) == 0:  # stride 0: an expanded dim repeats by construction
        return True
    return torch.equal(k, k.narrow(dim, 0, 1).expand_as(k))


def varying_dims(k: torch.Tensor) -> list[int]:
    """Dims along which a class tensor changes."""
    return [d for d in range(k.ndim) if not constant_along(k, d)]


def _distinct_along(k: torch.Tensor, dim: int) -> int:
    index = [0] * k.ndim
    index[dim] = slice(None)
    return int(torch.unique(k[tuple(index)]).numel())


def choose_channel_dim(k: torch.Tensor, dims: list[int], policy: str = "auto",
                       avoid: frozenset | set = frozenset()) -> int:
    """Which of several varying dims stays the channel dim.

    Where a view split one channel dim into several, ``inner`` keeps the last of them
    (head_dim: the same channels go in every head) and ``outer`` the first (whole
    blocks such as heads go together). Elsewhere (``auto``) the dim with the most
    distinct classes is kept.
    """
    dims = [d for d in dims if d not in avoid] or dims
    if policy == "outer":
        return dims[0]
    if policy == "inner":
        return dims[-1]
    # most distinct classes; then the dim without repeats (a real channel dim rather than a
    # spatial dim that a pixel shuffle filled with a few classes); then the inner one
    return max(dims, key=lambda d: (_distinct_along(k, d), _distinct_along(k, d) / k.shape[d], d))


def normalize(space: LabelSpace, labels: torch.Tensor, policy: str = "auto",
              avoid: frozenset | set = frozenset(), chose: list | None = None) -> torch.Tensor:
    """Make a label tensor *separable*: after this its classes change along at most one
    dim, and every other dim is compressed to size 1.

    A tensor whose classes change along two dims (a channel dim split into
    (groups, width) by a view, a grouped conv weight) can only be pruned to a
    dense rectangle if removal follows one of them; the classes along the other
    dims are unioned. When ``policy`` had to choose among several dims, the kept dim is
    appended to ``chose``.
    """
    if sum(1 for n in labels.shape if n > 1) <= 1:
        return labels  # at most one dim can vary: already separable
    for d in range(labels.ndim):  # cheap first pass: dims along which the labels repeat
        if labels.shape[d] > 1 and constant_along(labels, d):
            labels = labels.narrow(d, 0, 1)
    if sum(1 for n in labels.shape if n > 1) <= 1:
        return labels.contiguous()
    k = space.roots(labels)
    dims = varying_dims(k)
    if len(dims) > 1:
        keep = choose_channel_dim(k, dims, policy, avoid)
        if chose is not None:
            chose.append(keep)
        rows = k.movedim(keep, 0).reshape(k.shape[keep], -1)
        space.union(rows, rows[:, :1])
        dims = [keep]
    out = labels
    for d in range(labels.ndim):
        if d not in dims and out.shape[d] > 1:
            out = out.narrow(d, 0, 1)
    return out.contiguous()


def channel_dim(labels: torch.Tensor) -> int | None:
    """The one dim of a normalized label tensor with size > 1, or None."""
    for d, s in enumerate(labels.shape):
        if s > 1:
            return d
    return None
