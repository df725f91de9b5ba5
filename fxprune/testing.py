"""Hypothesis strategies for random PyTorch networks, and checks for graph rewrites.

This module is public: other projects that transform PyTorch models (pruners,
fusers, quantizers, any ``torch.fx`` pass) can use it to test their rewrites on
thousands of random networks. It needs `Hypothesis <https://hypothesis.works>`_
(``pip install "fxprune[testing]"``); ``import fxprune`` does not import it.

Strategies
----------
Each strategy is a function that validates its arguments at once (raising
:class:`hypothesis.errors.InvalidArgument`) and returns a strategy. Every example
it draws is a :class:`Drawn` pair ``(module, inputs)``: a module in eval mode and
a tuple of positional example inputs for it, valid by construction (nothing is
filtered). Weights and inputs come from a seed the strategy draws, so an example
replays exactly (``module.drawn_config`` holds the configuration and that seed,
and the module's ``repr`` shows them), and the networks are healthy: no all-zero
weights, norm scales and shifts that differ per channel, BatchNorm running
statistics and eps drawn explicitly (never left at their initial zeros and ones),
outputs that vary across the batch.

- :func:`cnn_dags`: convolutional DAGs (dense, grouped and depthwise convolutions,
  BatchNorm, activations, residual adds, gating, concatenation, channel splits).
- :func:`attention_blocks`: attention blocks (heads, grouped-query kv heads,
  head_dim, fused or separate projections, explicit, SDPA or linear attention,
  rotary embeddings, causal masks, an optional residual LayerNorm).
- :func:`recurrent_nets`: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` between linear layers.
- :func:`mixed_nets`: a convolutional stem whose feature map becomes tokens for
  attention and MLP blocks with LayerNorm, GELU and residuals.
- :func:`networks`: any of the above.

Checks
------
- :func:`assert_equivalent`: two modules give the same outputs on the same inputs.
- :func:`rewrite_property` and :func:`assert_rewrite_preserves`: a Hypothesis
  property that a ``GraphModule -> GraphModule`` rewrite preserves every drawn
  network's outputs and leaves a graph that lints.

Examples
--------
>>> import torch
>>> from fxprune.testing import cnn_dags, assert_rewrite_preserves
>>> def no_op(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
...     return gm
>>> assert_rewrite_preserves(no_op, strategy=cnn_dags(max_steps=3), max_examples=3)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

try:
    import hypothesis
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fxprune.testing needs Hypothesis: pip install 'fxprune[testing]' "
                      "(or pip install hypothesis)") from e

__all__ = ["Drawn", "cnn_dags", "attention_blocks", "recurrent_nets", "mixed_nets", "networks",
           "assert_equivalent", "rewrite_property", "assert_rewrite_preserves",
           "CnnDag", "Attention", "AttentionBlock", "AttentionNet", "RecurrentNet", "MixedNet"]

CNN_OPS = ("conv", "grouped", "depthwise", "bn", "act", "add", "mul", "cat", "split")
ACTIVATIONS = ("relu", "silu", "tanh", "gelu")
ATTENTION_KINDS = ("explicit", "sdpa", "linear")
CELLS = ("lstm", "gru", "rnn")
MIXED_BLOCKS = ("attention", "mlp")
FAMILIES = ("cnn", "attention", "recurrent", "mixed")
_SEEDS = st.integers(0, 2**32 - 1)


class Drawn(NamedTuple):
    """One drawn example: ``module(*inputs)`` runs. Unpacks as ``module, inputs = drawn``.

    Attributes
    ----------
    module : nn.Module
        In eval mode; ``module.drawn_config`` is the drawn configuration (a dict, with its
        ``"seed"``), which its ``repr`` shows first.
    inputs : tuple of torch.Tensor
        Positional example inputs.
    """

    module: nn.Module
    inputs: tuple

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t) for t in self.inputs)
        return f"Drawn(module={self.module!r}, inputs=<tensors of shape {shapes}>)"


# ---------------------------------------------------------------------------
# argument validation (eager, as Hypothesis's own strategies do)


def _check_int(name: str, value: Any, min_value: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int")
    if value < min_value:
        raise InvalidArgument(f"{name}={value!r} must be at least {min_value}")
    return value


def _check_range(what: str, min_value: Any, max_value: Any, lowest: int) -> tuple[int, int]:
    _check_int(f"min_{what}", min_value, lowest)
    _check_int(f"max_{what}", max_value, lowest)
    if min_value > max_value:
        raise InvalidArgument(f"min_{what}={min_value!r} is larger than max_{what}={max_value!r}")
    return min_value, max_value


def _check_choices(name: str, values: Any, allowed: Collection[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Collection):
        raise InvalidArgument(f"{name}={values!r} must be a collection of names from {sorted(allowed)}")
    values = tuple(dict.fromkeys(values))
    if not values:
        raise InvalidArgument(f"{name} must not be empty (choose from {sorted(allowed)})")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise InvalidArgument(f"{name}: unknown {unknown!r}; choose from {sorted(allowed)}")
    return values


def _check_sizes(name: str, values: Any, *, even: bool = False) -> tuple[int, ...]:
    if isinstance(values, (str, int)) or not isinstance(values, Collection) or not values:
        raise InvalidArgument(f"{name}={values!r} must be a non-empty collection of positive ints")
    for v in values:
        _check_int(f"an entry of {name}", v, 1)
        if even and v % 2:
            raise InvalidArgument(f"{name}={values!r}: rotary embeddings need even sizes ({v} is odd); "
                                  f"pass rotary=False or even sizes")
    return tuple(dict.fromkeys(values))


def _check_flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be True, False or None (None draws either)")
    return value


def _flag(draw, value: bool | None) -> bool:
    return draw(st.booleans()) if value is None else value


# ---------------------------------------------------------------------------
# healthy weights


_BN_EPS = (1e-5, 1e-3, 0.1)


def _healthy(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Give norms distinct per-channel scales and shifts, BatchNorm explicit running
    statistics (means around 0, variances in [0.05, 2]) and an eps of 1e-5, 1e-3 or 0.1,
    in place; ``module`` ends in eval mode."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.empty(m.bias.shape).normal_(0.0, 0.2, generator=gen))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.empty(m.running_mean.shape).normal_(0.0, 0.3, generator=gen))
                m.running_var.copy_(torch.empty(m.running_var.shape).uniform_(0.05, 2.0, generator=gen))
                m.num_batches_tracked.fill_(100)
                # eps matters (a rewrite that drops it changes the output measurably)
                m.eps = _BN_EPS[int(torch.randint(len(_BN_EPS), (), generator=gen))]
        for name, p in module.named_parameters():
            if p.numel() and bool((p == 0).all()):  # nothing here should be all zero
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.2, generator=gen))
    return module.eval()


def _build(seed: int, make: Callable[[], nn.Module], input_shapes: list[tuple[int, ...]],
           config: dict) -> Drawn:
    """Build a module with torch's global RNG seeded (restored afterwards), give it healthy
    weights, and draw its inputs from the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    gen = torch.Generator().manual_seed(seed)
    _healthy(module, gen)
    module.drawn_config = {"seed": seed, **config}
    inputs = tuple(torch.randn(s, generator=gen) for s in input_shapes)
    return Drawn(module, inputs)


def _config_repr(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


_ACT = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "gelu": F.gelu}


# ---------------------------------------------------------------------------
# CNN DAGs


class CnnDag(nn.Module):
    """A convolutional DAG that interprets a program of steps; every step appends one tensor.

    Steps (``src`` indexes the tensors so far, 0 being the input):
    ``("conv", src, out_channels, kernel_size, groups)``, ``("dw", src, multiplier)``,
    ``("bn", src)``, ``("act", src, name)``, ``("add", src, other)``,
    ``("mul", src, other)`` (``src`` gated by ``sigmoid`` of ``other``'s spatial mean),
    ``("cat", src, other)``, ``("split", src, first, take)``. The head pools (or
    flattens) the last tensor into a linear layer.
    """

    def __init__(self, program, channels, out_features: int = 3, head: str = "pool", spatial: int = 6):
        super().__init__()
        self.program = [tuple(s) for s in program]
        self.head_kind = head
        self.layers = nn.ModuleDict()
        for i, step in enumerate(self.program):
            kind = step[0]
            if kind == "conv":
                _, src, cout, k, groups = step
                self.layers[str(i)] = nn.Conv2d(channels[src], cout, k, padding=k // 2, groups=groups)
            elif kind == "dw":
                _, src, mult = step
                c = channels[src]
                self.layers[str(i)] = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
            elif kind == "bn":
                self.layers[str(i)] = nn.BatchNorm2d(channels[step[1]])
        features = channels[-1] * (spatial * spatial if head == "flatten" else 1)
        self.head = nn.Linear(features, out_features)

    def forward(self, x):
        values = [x]
        for i, step in enumerate(self.program):
            kind, src = step[0], step[1]
            v = values[src]
            if kind in ("conv", "dw", "bn"):
                out = self.layers[str(i)](v)
            elif kind == "act":
                out = _ACT[step[2]](v)
            elif kind == "add":
                out = v + values[step[2]]
            elif kind == "mul":
                out = v * torch.sigmoid(values[step[2]].mean((2, 3), keepdim=True))
            elif kind == "cat":
                out = torch.cat([v, values[step[2]]], 1)
            else:  # split
                _, _, first, take = step
                out = torch.split(v, [first, v.shape[1] - first], 1)[take]
            values.append(out)
        y = values[-1]
        if self.head_kind == "flatten":
            return self.head(torch.flatten(y, 1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    def extra_repr(self) -> str:
        return _config_repr(getattr(self, "drawn_config", {}))


@st.composite
def _cnn_dags(draw, min_steps, max_steps, ops, widths, kernel_sizes, activations, heads,
              min_spatial, max_spatial, in_channels, batch_size, out_features):
    channels = [in_channels]
    program = []
    for _ in range(draw(st.integers(min_steps, max_steps))):
        # mostly a chain (each step reads the last tensor), with skips to any earlier one
        src = len(channels) - 1 if draw(st.booleans()) else draw(st.integers(0, len(channels) - 1))
        c = channels[src]
        same = [j for j, cj in enumerate(channels) if cj == c and j != src]
        kinds = []
        if "conv" in ops or "grouped" in ops:
            kinds += ["conv", "conv"]
        kinds += [k for k in ("bn", "act") if k in ops]
        if "depthwise" in ops:
            kinds.append("dw")
        if same:
            kinds += [k for k in ("add", "mul") if k in ops]
        if len(channels) > 1 and "cat" in ops:
            kinds.append("cat")
        if c >= 2 and "split" in ops:
            kinds.append("split")
        if not kinds:  # only combining ops were asked for and nothing combines yet
            kinds = ["conv"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            cout = draw(st.sampled_from(widths))
            divisors = [g for g in (1, 2, 3, 4) if c % g == 0 and cout % g == 0]
            if "conv" not in ops and len(divisors) > 1:
                divisors = divisors[1:]
            elif "grouped" not in ops:
                divisors = [1]
            step = ("conv", src, cout, draw(st.sampled_from(kernel_sizes)), draw(st.sampled_from(divisors)))
            channels.append(cout)
        elif kind == "dw":
            mult = draw(st.sampled_from([1, 2]))
            step = ("dw", src, mult)
            channels.append(c * mult)
        elif kind == "bn":
            step = ("bn", src)
            channels.append(c)
        elif kind == "act":
            step = ("act", src, draw(st.sampled_from(activations)))
            channels.append(c)
        elif kind in ("add", "mul"):
            step = (kind, src, draw(st.sampled_from(same)))
            channels.append(c)
        elif kind == "cat":
            other = draw(st.integers(0, len(channels) - 1))
            step = ("cat", src, other)
            channels.append(c + channels[other])
        else:
            first = draw(st.integers(1, c - 1))
            take = draw(st.integers(0, 1))
            step = ("split", src, first, take)
            channels.append(first if take == 0 else c - first)
        program.append(step)
    # end with a conv so the head always sees learned channels
    program.append(("conv", len(channels) - 1, max(widths), 1, 1))
    channels.append(max(widths))
    head = draw(st.sampled_from(heads))
    spatial = draw(st.integers(min_spatial, max_spatial))
    seed = draw(_SEEDS)
    config = {"program": program, "head": head}
    return _build(seed, lambda: CnnDag(program, channels, out_features, head, spatial),
                  [(batch_size, in_channels, spatial, spatial)], config)


def cnn_dags(*, min_steps: int = 2, max_steps: int = 9, ops: Collection[str] = CNN_OPS,
             widths: Collection[int] = (4, 6, 8, 12), kernel_sizes: Collection[int] = (1, 3),
             activations: Collection[str] = ("relu", "silu", "tanh"),
             heads: Collection[str] = ("pool", "flatten"), min_spatial: int = 4, max_spatial: int = 8,
             in_channels: int = 3, batch_size: int = 2,
             out_features: int = 3) -> st.SearchStrategy[Drawn]:
    """Random convolutional DAGs (a :class:`CnnDag`) and an input batch.

    Parameters
    ----------
    min_steps, max_steps : int
        How many steps the program has before its final 1x1 convolution.
    ops : collection of str
        Op families to draw from: ``"conv"`` (dense convolutions), ``"grouped"``
        (convolutions with 2-4 groups), ``"depthwise"`` (with channel multiplier 1 or
        2), ``"bn"`` (BatchNorm2d), ``"act"``, ``"add"`` (residual), ``"mul"``
        (squeeze-excitation-like gating), ``"cat"`` and ``"split"`` (along channels).
        A final 1x1 convolution is always there.
    widths : collection of int
        Output channel counts for the convolutions.
    kernel_sizes : collection of int
        Odd kernel sizes (same padding).
    activations : collection of str
        From ``"relu"``, ``"silu"``, ``"tanh"``, ``"gelu"``.
    heads : collection of str
        ``"pool"`` (global average pool, then linear) and/or ``"flatten"`` (the whole
        feature map flattened into the linear layer).
    min_spatial, max_spatial : int
        Height and width of the input image.
    in_channels, batch_size, out_features : int
        Input channels, batch size, and outputs of the linear head.

    Returns
    -------
    SearchStrategy[Drawn]
        ``(module, (x,))`` with ``x`` of shape ``(batch_size, in_channels, s, s)``.

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(cnn_dags(max_steps=4, ops=["conv", "bn", "act", "add"]))
    ... def test_runs(drawn):
    ...     model, (x,) = drawn
    ...     assert model(x).shape == (2, 3)
    >>> test_runs()
    """
    min_steps, max_steps = _check_range("steps", min_steps, max_steps, 0)
    ops = _check_choices("ops", ops, CNN_OPS)
    widths = _check_sizes("widths", widths)
    kernel_sizes = _check_sizes("kernel_sizes", kernel_sizes)
    if any(k % 2 == 0 for k in kernel_sizes):
        raise InvalidArgument(f"kernel_sizes={kernel_sizes!r} must be odd (same padding)")
    activations = _check_choices("activations", activations, ACTIVATIONS)
    heads = _check_choices("heads", heads, ("pool", "flatten"))
    min_spatial, max_spatial = _check_range("spatial", min_spatial, max_spatial, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("out_features", out_features, 1)
    return _cnn_dags(min_steps, max_steps, ops, widths, kernel_sizes, activations, heads,
                     min_spatial, max_spatial, in_channels, batch_size, out_features)


# ---------------------------------------------------------------------------
# attention


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Multi-head attention over ``(batch, tokens, dim)``, with ``kv_heads`` dividing
    ``heads`` (grouped-query attention), ending in the output projection (no residual).

    ``kind`` is ``"explicit"`` (softmax(q k^T * scale) v), ``"sdpa"``
    (``F.scaled_dot_product_attention``) or ``"linear"`` (kernelized with elu + 1
    feature maps, Katharopoulos et al.: k^T v crosses two operands' channels).
    """

    def __init__(self, dim, heads, kv_heads, head_dim, kind="explicit", fused=False, rotary=False,
                 causal=False):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.fused, self.kind, self.rotary = fused, kind, rotary
        self.causal = causal and kind != "linear"
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        if fused:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out)
        else:
            self.q, self.k, self.v = nn.Linear(dim, q_out), nn.Linear(dim, kv_out), nn.Linear(dim, kv_out)
        self.o = nn.Linear(q_out, dim)
        self.scale = head_dim ** -0.5
        self.register_buffer("freq", torch.rand(max(head_dim // 2, 1)) + 0.1)

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, n, self.h, self.d).transpose(1, 2)
        k = k.view(b, n, self.kv, self.d).transpose(1, 2)
        v = v.view(b, n, self.kv, self.d).transpose(1, 2)
        if self.rotary:
            ang = torch.outer(torch.arange(n, dtype=torch.float32), self.freq)
            ang = torch.cat((ang, ang), dim=-1)
            q = q * ang.cos() + _rotate_half(q) * ang.sin()
            k = k * ang.cos() + _rotate_half(k) * ang.sin()
        r = self.h // self.kv
        if r > 1:
            k = k[:, :, None].expand(b, self.kv, r, n, self.d).reshape(b, self.h, n, self.d)
            v = v[:, :, None].expand(b, self.kv, r, n, self.d).reshape(b, self.h, n, self.d)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=self.causal)
        elif self.kind == "linear":
            fq, fk = F.elu(q) + 1, F.elu(k) + 1
            kv = torch.einsum("bhnd,bhne->bhde", fk, v)
            z = 1 / (torch.einsum("bhnd,bhd->bhn", fq, fk.sum(2)) + 1e-6)
            y = torch.einsum("bhnd,bhde,bhn->bhne", fq, kv, z)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if self.causal:
                pos = torch.arange(n)
                scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, self.h * self.d))


class AttentionBlock(nn.Module):
    """``x + attention(x)``, then LayerNorm if ``residual_norm`` (post-norm)."""

    def __init__(self, attention: Attention, dim: int, residual_norm: bool):
        super().__init__()
        self.attn, self.residual_norm = attention, residual_norm
        self.norm = nn.LayerNorm(dim) if residual_norm else None

    def forward(self, x):
        y = x + self.attn(x)
        return self.norm(y) if self.residual_norm else y


class AttentionNet(nn.Module):
    """``head(block(inp(x)))``: linear layers around one :class:`AttentionBlock`."""

    def __init__(self, in_features, dim, block, out_features=3):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(in_features, dim), block, nn.Linear(dim, out_features)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))

    def extra_repr(self) -> str:
        return _config_repr(getattr(self, "drawn_config", {}))


def _draw_attention(draw, dim, min_heads, max_heads, gqa, head_dims, kinds, fused, rotary, causal):
    heads = draw(st.integers(min_heads, max_heads))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0])) if gqa else heads
    head_dim = draw(st.sampled_from(head_dims))
    kind = draw(st.sampled_from(kinds))
    fused, rotary = _flag(draw, fused), _flag(draw, rotary) and head_dim % 2 == 0
    causal = _flag(draw, causal) and kind != "linear"
    config = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "kind": kind,
              "fused": fused, "rotary": rotary, "causal": causal}
    return config, lambda: Attention(dim, heads, kv_heads, head_dim, kind, fused, rotary, causal)


@st.composite
def _attention_blocks(draw, min_heads, max_heads, gqa, head_dims, dims, kinds, fused, rotary, causal,
                      residual_norm, min_tokens, max_tokens, in_features, batch_size, out_features):
    dim = draw(st.sampled_from(dims))
    tokens = draw(st.integers(min_tokens, max_tokens))
    config, make_attention = _draw_attention(draw, dim, min_heads, max_heads, gqa, head_dims, kinds,
                                             fused, rotary, causal)
    norm = _flag(draw, residual_norm)
    seed = draw(_SEEDS)
    config = {"dim": dim, "tokens": tokens, **config, "residual_norm": norm}

    def make():
        return AttentionNet(in_features, dim, AttentionBlock(make_attention(), dim, norm), out_features)

    return _build(seed, make, [(batch_size, tokens, in_features)], config)


def attention_blocks(*, min_heads: int = 1, max_heads: int = 6, gqa: bool = True,
                     head_dims: Collection[int] = (2, 4, 6), dims: Collection[int] = (8, 12),
                     kinds: Collection[str] = ATTENTION_KINDS, fused: bool | None = None,
                     rotary: bool | None = None, causal: bool | None = None,
                     residual_norm: bool | None = None, min_tokens: int = 3, max_tokens: int = 7,
                     in_features: int = 6, batch_size: int = 2,
                     out_features: int = 3) -> st.SearchStrategy[Drawn]:
    """Random attention blocks between two linear layers (an :class:`AttentionNet`).

    Parameters
    ----------
    min_heads, max_heads : int
        Number of query heads.
    gqa : bool
        Draw the kv heads from the divisors of the heads (grouped-query and
        multi-query attention); if False there are as many kv heads as heads.
    head_dims, dims : collection of int
        Per-head width, and the model width the block reads and writes.
    kinds : collection of str
        ``"explicit"``, ``"sdpa"``, ``"linear"`` (see :class:`Attention`).
    fused, rotary, causal, residual_norm : bool or None
        One fused qkv projection (else q, k, v); rotary position embeddings on q and k
        (only drawn with an even head_dim); a causal mask (explicit and SDPA attention);
        LayerNorm after the residual add. None draws either.
    min_tokens, max_tokens : int
        Sequence length.
    in_features, batch_size, out_features : int
        Input features, batch size and outputs.

    Returns
    -------
    SearchStrategy[Drawn]
        ``(module, (x,))`` with ``x`` of shape ``(batch_size, tokens, in_features)``.
    """
    min_heads, max_heads = _check_range("heads", min_heads, max_heads, 1)
    _check_flag("gqa", gqa)
    if gqa is None:
        raise InvalidArgument("gqa must be True or False")
    head_dims = _check_sizes("head_dims", head_dims, even=rotary is True)
    dims = _check_sizes("dims", dims)
    kinds = _check_choices("kinds", kinds, ATTENTION_KINDS)
    for name in ("fused", "rotary", "causal", "residual_norm"):
        _check_flag(name, locals()[name])
    min_tokens, max_tokens = _check_range("tokens", min_tokens, max_tokens, 1)
    _check_int("in_features", in_features, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("out_features", out_features, 1)
    return _attention_blocks(min_heads, max_heads, gqa, head_dims, dims, kinds, fused, rotary, causal,
                             residual_norm, min_tokens, max_tokens, in_features, batch_size, out_features)


# ---------------------------------------------------------------------------
# recurrent networks


_CELL_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# torch needs proj_size < hidden_size: projections are drawn from 1 to hidden_size - 1,
# for hidden sizes of at least 2
_MIN_PROJ_HIDDEN = 2


class RecurrentNet(nn.Module):
    """``head(rnn(act(inp(x))))``: an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` between linear
    layers, on ``(batch, time, features)`` (``(time, batch, features)`` unless
    ``batch_first``). With ``final_state`` the last layer's final hidden state (every
    direction) also feeds the output, through a second linear layer."""

    def __init__(self, cell, in_features, input_size, hidden_size, num_layers=1, bidirectional=False,
                 batch_first=True, proj_size=0, nonlinearity="tanh", pre=True, final_state=False,
                 out_features=3):
        super().__init__()
        self.batch_first, self.pre, self.final_state = batch_first, pre, final_state
        self.lstm = cell == "lstm"
        self.inp = nn.Linear(in_features, input_size) if pre else None
        kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
        if cell == "lstm" and proj_size:
            kwargs["proj_size"] = proj_size
        if cell == "rnn":
            kwargs["nonlinearity"] = nonlinearity
        self.rnn = _CELL_TYPES[cell](input_size if pre else in_features, hidden_size, **kwargs)
        if cell == "rnn" and nonlinearity == "relu":  # no unit dead on every step of a short input
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        p.add_(0.5)
        self.dirs = 2 if bidirectional else 1
        out = proj_size or hidden_size
        self.head = nn.Linear(out * self.dirs, out_features)
        self.state_head = nn.Linear(out * self.dirs, out_features) if final_state else None

    def forward(self, x):
        if self.pre:
            x = torch.tanh(self.inp(x))
        out, state = self.rnn(x)
        y = self.head(out)
        if self.final_state:
            h = state[0] if self.lstm else state  # LSTM: (h, c)
            last = torch.cat([h[-self.dirs + i] for i in range(self.dirs)], dim=-1)
            y = y + self.state_head(last).unsqueeze(1 if self.batch_first else 0)
        return y

    def extra_repr(self) -> str:
        return _config_repr(getattr(self, "drawn_config", {}))


@st.composite
def _recurrent_nets(draw, cells, min_layers, max_layers, bidirectional, batch_first, proj, pre,
                    final_state, hidden_sizes, min_seq_len, max_seq_len, in_features, batch_size,
                    out_features):
    cell = draw(st.sampled_from(cells))
    layers = draw(st.integers(min_layers, max_layers))
    bidir, first = _flag(draw, bidirectional), _flag(draw, batch_first)
    hidden = draw(st.sampled_from(hidden_sizes))
    proj_size = 0
    if cell == "lstm" and hidden >= _MIN_PROJ_HIDDEN and _flag(draw, proj):
        proj_size = draw(st.integers(1, hidden - 1))
    nonlinearity = draw(st.sampled_from(["tanh", "relu"])) if cell == "rnn" else "tanh"
    use_pre, use_state = _flag(draw, pre), _flag(draw, final_state)
    input_size = draw(st.sampled_from(hidden_sizes)) if use_pre else in_features
    seq = draw(st.integers(min_seq_len, max_seq_len))
    seed = draw(_SEEDS)
    config = {"cell": cell, "num_layers": layers, "bidirectional": bidir, "batch_first": first,
              "hidden_size": hidden, "proj_size": proj_size, "input_size": input_size, "pre": use_pre,
              "final_state": use_state}
    if cell == "rnn":
        config["nonlinearity"] = nonlinearity
    shape = (batch_size, seq, in_features) if first else (seq, batch_size, in_features)
    return _build(seed, lambda: RecurrentNet(cell, in_features, input_size, hidden, layers, bidir, first,
                                             proj_size, nonlinearity, use_pre, use_state, out_features),
                  [shape], config)


def recurrent_nets(*, cells: Collection[str] = CELLS, min_layers: int = 1, max_layers: int = 2,
                   bidirectional: bool | None = None, batch_first: bool | None = None,
                   proj_size: bool | None = None, pre: bool | None = None,
                   final_state: bool | None = None, hidden_sizes: Collection[int] = (4, 6, 8),
                   min_seq_len: int = 3, max_seq_len: int = 6, in_features: int = 5,
                   batch_size: int = 2, out_features: int = 3) -> st.SearchStrategy[Drawn]:
    """Random recurrent networks (a :class:`RecurrentNet`): a linear layer and tanh, an
    ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (tanh or relu), and a linear head on every step.

    Parameters
    ----------
    cells : collection of str
        ``"lstm"``, ``"gru"``, ``"rnn"``.
    min_layers, max_layers : int
        The recurrent module's ``num_layers``.
    bidirectional, batch_first : bool or None
        The module's flags; None draws either.
    proj_size : bool or None
        Give LSTMs a projection; ``proj_size`` is drawn from 1 to ``hidden_size - 1``
        (torch needs it smaller), for hidden sizes of at least 2.
    pre : bool or None
        A linear layer (and tanh) before the recurrent module; without it the input
        goes to the recurrent module directly.
    final_state : bool or None
        The final hidden state (last layer, both directions) also feeds the output.
    hidden_sizes : collection of int
        Hidden sizes (also the width of the linear layer before).
    min_seq_len, max_seq_len : int
        Sequence length.
    in_features, batch_size, out_features : int
        Input features, batch size and outputs per step.

    Returns
    -------
    SearchStrategy[Drawn]
        ``(module, (x,))`` with ``x`` of shape ``(batch_size, seq_len, in_features)``, or
        ``(seq_len, batch_size, in_features)`` when not ``batch_first``.
    """
    cells = _check_choices("cells", cells, CELLS)
    min_layers, max_layers = _check_range("layers", min_layers, max_layers, 1)
    for name in ("bidirectional", "batch_first", "proj_size", "pre", "final_state"):
        _check_flag(name, locals()[name])
    hidden_sizes = _check_sizes("hidden_sizes", hidden_sizes)
    if proj_size is True and (cells != ("lstm",) or min(hidden_sizes) < _MIN_PROJ_HIDDEN):
        raise InvalidArgument(f"proj_size=True needs cells=['lstm'] and hidden sizes of at least "
                              f"{_MIN_PROJ_HIDDEN} (proj_size=None draws projections for LSTMs with "
                              f"those hidden sizes only)")
    min_seq_len, max_seq_len = _check_range("seq_len", min_seq_len, max_seq_len, 1)
    _check_int("in_features", in_features, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("out_features", out_features, 1)
    return _recurrent_nets(cells, min_layers, max_layers, bidirectional, batch_first, proj_size, pre,
                           final_state, hidden_sizes, min_seq_len, max_seq_len, in_features, batch_size,
                           out_features)


# ---------------------------------------------------------------------------
# mixed: conv stem, tokens, attention / MLP


class MixedNet(nn.Module):
    """A conv stem (conv, BatchNorm, activation; optionally a residual second conv), the
    feature map as tokens (``flatten(2).transpose(1, 2)`` or ``permute`` + ``reshape``),
    an optional learned position embedding, pre-norm residual blocks (attention:
    ``t + attn(LN(t))``; MLP: ``t + fc2(GELU(fc1(LN(t))))``), a final LayerNorm, a mean
    over tokens and a linear head."""

    def __init__(self, in_channels, width, stride, stem_act, residual_stem, tokens, pos_embed, n_tokens,
                 blocks, mlp_ratio=2, out_features=3):
        super().__init__()
        self.stem_act, self.residual_stem, self.tokens = stem_act, residual_stem, tokens
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(width)
        if residual_stem:
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) * 0.5) if pos_embed else None
        self.kinds = [kind for kind, _ in blocks]
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in blocks)
        self.blocks = nn.ModuleList()
        for kind, make in blocks:
            if kind == "attention":
                self.blocks.append(make())
            else:
                self.blocks.append(nn.Sequential(nn.Linear(width, width * mlp_ratio), nn.GELU(),
                                                 nn.Linear(width * mlp_ratio, width)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        act = _ACT[self.stem_act]
        x = act(self.bn(self.conv(x)))
        if self.residual_stem:
            x = x + act(self.bn2(self.conv2(x)))
        if self.tokens == "flatten":
            t = x.flatten(2).transpose(1, 2)
        else:
            b, c, h, w = x.shape
            t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.pos is not None:
            t = t + self.pos
        for norm, block in zip(self.norms, self.blocks):
            t = t + block(norm(t))
        return self.head(self.norm(t).mean(1))

    def extra_repr(self) -> str:
        return _config_repr(getattr(self, "drawn_config", {}))


@st.composite
def _mixed_nets(draw, blocks, min_blocks, max_blocks, widths, min_heads, max_heads, head_dims, kinds,
                min_spatial, max_spatial, in_channels, batch_size, out_features):
    width = draw(st.sampled_from(widths))
    spatial = draw(st.integers(min_spatial, max_spatial))
    stride = draw(st.sampled_from([1, 2])) if spatial >= 4 else 1
    side = (spatial - 1) // stride + 1
    stem_act = draw(st.sampled_from(["relu", "gelu"]))
    residual_stem, pos = draw(st.booleans()), draw(st.booleans())
    tokens = draw(st.sampled_from(["flatten", "permute"]))
    chosen, makers = [], []
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        kind = draw(st.sampled_from(blocks))
        if kind == "attention":
            cfg, make = _draw_attention(draw, width, min_heads, max_heads, True, head_dims, kinds,
                                        None, None, False)
            chosen.append({"attention": cfg})
            makers.append(("attention", make))
        else:
            chosen.append("mlp")
            makers.append(("mlp", None))
    seed = draw(_SEEDS)
    config = {"width": width, "spatial": spatial, "stride": stride, "stem_act": stem_act,
              "residual_stem": residual_stem, "tokens": tokens, "pos_embed": pos, "blocks": chosen}
    return _build(seed, lambda: MixedNet(in_channels, width, stride, stem_act, residual_stem, tokens, pos,
                                         side * side, makers, out_features=out_features),
                  [(batch_size, in_channels, spatial, spatial)], config)


def mixed_nets(*, blocks: Collection[str] = MIXED_BLOCKS, min_blocks: int = 1, max_blocks: int = 2,
               widths: Collection[int] = (8, 12), min_heads: int = 1, max_heads: int = 4,
               head_dims: Collection[int] = (2, 4), kinds: Collection[str] = ATTENTION_KINDS,
               min_spatial: int = 3, max_spatial: int = 6, in_channels: int = 3, batch_size: int = 2,
               out_features: int = 3) -> st.SearchStrategy[Drawn]:
    """Random hybrids (a :class:`MixedNet`): a convolutional stem whose feature map becomes
    tokens for attention and MLP blocks (pre-norm, LayerNorm, GELU, residuals).

    Parameters
    ----------
    blocks : collection of str
        Block kinds to draw from: ``"attention"`` (see :func:`attention_blocks`) and
        ``"mlp"``.
    min_blocks, max_blocks : int
        How many blocks follow the stem.
    widths : collection of int
        Stem channels, which are the token width.
    min_heads, max_heads, head_dims, kinds
        As in :func:`attention_blocks` (grouped-query kv heads, fused projections and
        rotary embeddings are drawn too).
    min_spatial, max_spatial : int
        Height and width of the input image (the stem's stride is 1 or 2).
    in_channels, batch_size, out_features : int
        Input channels, batch size and outputs.

    Returns
    -------
    SearchStrategy[Drawn]
        ``(module, (x,))`` with ``x`` of shape ``(batch_size, in_channels, s, s)``.
    """
    blocks = _check_choices("blocks", blocks, MIXED_BLOCKS)
    min_blocks, max_blocks = _check_range("blocks", min_blocks, max_blocks, 0)
    widths = _check_sizes("widths", widths)
    min_heads, max_heads = _check_range("heads", min_heads, max_heads, 1)
    head_dims = _check_sizes("head_dims", head_dims)
    kinds = _check_choices("kinds", kinds, ATTENTION_KINDS)
    min_spatial, max_spatial = _check_range("spatial", min_spatial, max_spatial, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("out_features", out_features, 1)
    return _mixed_nets(blocks, min_blocks, max_blocks, widths, min_heads, max_heads, head_dims, kinds,
                       min_spatial, max_spatial, in_channels, batch_size, out_features)


def networks(families: Collection[str] = FAMILIES) -> st.SearchStrategy[Drawn]:
    """Any of the families, with each strategy's defaults.

    Parameters
    ----------
    families : collection of str
        From ``"cnn"`` (:func:`cnn_dags`), ``"attention"`` (:func:`attention_blocks`),
        ``"recurrent"`` (:func:`recurrent_nets`) and ``"mixed"`` (:func:`mixed_nets`).

    Returns
    -------
    SearchStrategy[Drawn]
    """
    families = _check_choices("families", families, FAMILIES)
    make = {"cnn": cnn_dags, "attention": attention_blocks, "recurrent": recurrent_nets,
            "mixed": mixed_nets}
    return st.one_of(*[make[f]() for f in families])


# ---------------------------------------------------------------------------
# checks


def _as_inputs(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def assert_equivalent(before: Callable, after: Callable, inputs: Any, *, rtol: float = 1e-5,
                      atol: float = 1e-6) -> None:
    """Assert that two modules give the same outputs on ``inputs``.

    Both run under ``torch.no_grad()``. The outputs must have the same structure
    (tensors, tuples, lists, dicts, any registered pytree node such as a Hugging Face
    ``ModelOutput``); every floating-point tensor leaf must satisfy
    ``max |after - before| <= atol + rtol * max |before|`` (relative to that leaf's
    reference scale), every other tensor leaf must be equal, and non-tensor leaves must
    compare equal.

    Parameters
    ----------
    before : callable
        The reference (e.g. the original module).
    after : callable
        The module under test (e.g. the rewritten GraphModule).
    inputs : Tensor or tuple
        Positional inputs: one tensor, or a tuple/list of them.
    rtol, atol : float
        Relative (to the leaf's largest magnitude) and absolute tolerance.

    Raises
    ------
    AssertionError
        Naming the output (its pytree path, e.g. ``[1]['logits']``), the max error
        and the allowed error.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> assert_equivalent(lin, torch.fx.symbolic_trace(lin), torch.randn(4, 3))
    """
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
            raise ValueError(f"{name}={tol!r} must be a non-negative number")
    args = _as_inputs(inputs)
    with torch.no_grad():
        ref, got = before(*args), after(*args)
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(ref)
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    if ref_spec != got_spec:
        raise AssertionError(f"the outputs differ in structure:\n  reference: {ref_spec}\n  got:       {got_spec}")
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        where = f"output{pytree.keystr(path)}"
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise AssertionError(f"{where}: reference is {type(a).__name__}, got {type(b).__name__}")
        if not isinstance(a, torch.Tensor):
            if a != b:
                raise AssertionError(f"{where}: reference {a!r}, got {b!r}")
            continue
        if a.shape != b.shape:
            raise AssertionError(f"{where}: shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        if a.dtype != b.dtype:
            raise AssertionError(f"{where}: dtype {b.dtype}, expected {a.dtype}")
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                n = int((a != b).sum())
                raise AssertionError(f"{where}: {n} of {a.numel()} elements differ (exact dtype {a.dtype})")
            continue
        if not a.numel():
            continue
        wide = torch.complex128 if a.is_complex() else torch.float64
        a, b = a.to(wide), b.to(wide)
        finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
        same_nonfinite = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not bool((finite_a == finite_b).all()) or not bool(same_nonfinite[~finite_a].all()):
            raise AssertionError(f"{where}: non-finite values differ ({int((~finite_a).sum())} in the reference, "
                                 f"{int((~finite_b).sum())} in the output)")
        if not bool(finite_a.any()):
            continue
        scale = float(a[finite_a].abs().max())
        diff = (a - b).abs().where(finite_a, torch.zeros((), dtype=torch.float64))
        err = float(diff.max())
        allowed = atol + rtol * scale
        if not err <= allowed:
            at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise AssertionError(
                f"{where} differs: max |error| = {err:.3g} at index {at} (reference {a[at].item():.6g}, "
                f"got {b[at].item():.6g}); relative to the output's scale {scale:.3g} that is "
                f"{err / scale if scale else math.inf:.3g}; allowed {allowed:.3g} "
                f"(atol={atol:g} + rtol={rtol:g} * scale)")


def rewrite_property(rewrite: Callable[[torch.fx.GraphModule], torch.fx.GraphModule], *,
                     strategy: st.SearchStrategy | None = None, max_examples: int | None = None,
                     rtol: float = 1e-5, atol: float = 1e-6,
                     settings: hypothesis.settings | None = None) -> Callable[[], None]:
    """The Hypothesis property that ``rewrite`` preserves every drawn network's outputs.

    For each ``(model, inputs)`` drawn from ``strategy``, the property traces a deep copy
    of ``model`` with ``torch.fx.symbolic_trace``, calls ``rewrite`` on the GraphModule
    (which may change it in place), and checks that it returns a ``GraphModule`` whose
    graph lints and whose outputs match the model's (:func:`assert_equivalent`).

    Parameters
    ----------
    rewrite : callable
        ``GraphModule -> GraphModule``, the transformation under test.
    strategy : SearchStrategy of (module, inputs), optional
        Default :func:`networks` (every family).
    max_examples : int, optional
        Default: the current Hypothesis profile's.
    rtol, atol : float
        Passed to :func:`assert_equivalent`.
    settings : hypothesis.settings, optional
        Parent settings (default: the current profile without its explain phase); the
        property runs them without a deadline and without the too-slow health checks.

    Returns
    -------
    callable
        A test function without arguments (decorated with ``@given``): call it, or
        assign it to a ``test_*`` name for pytest to collect.
    """
    if not callable(rewrite):
        raise InvalidArgument(f"rewrite={rewrite!r} must be callable (GraphModule -> GraphModule)")
    strategy = networks() if strategy is None else strategy
    if not isinstance(strategy, st.SearchStrategy):
        raise InvalidArgument(f"strategy={strategy!r} must be a Hypothesis strategy of (module, inputs)")
    if max_examples is not None:
        _check_int("max_examples", max_examples, 1)
    if settings is not None and not isinstance(settings, hypothesis.settings):
        raise InvalidArgument(f"settings={settings!r} must be a hypothesis.settings")
    if settings is None:  # Hypothesis's explain phase re-runs a failure under a tracer: slow here
        settings = hypothesis.settings(phases=[p for p in hypothesis.settings.default.phases
                                               if p != hypothesis.Phase.explain])
    slow = {hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large,
            hypothesis.HealthCheck.large_base_example}
    options: dict[str, Any] = {"deadline": None,
                               "suppress_health_check": [*settings.suppress_health_check,
                                                         *(slow - set(settings.suppress_health_check))]}
    if max_examples is not None:
        options["max_examples"] = max_examples
    chosen = hypothesis.settings(settings, **options)

    def rewrite_preserves_outputs(example):
        model, inputs = example
        inputs = _as_inputs(inputs)
        model.eval()
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        out = rewrite(gm)
        if not isinstance(out, torch.fx.GraphModule):
            raise AssertionError(f"rewrite returned {type(out).__name__}, not a torch.fx.GraphModule")
        out.graph.lint()
        assert_equivalent(model, out, inputs, rtol=rtol, atol=atol)

    name = getattr(rewrite, "__name__", "rewrite")
    if name.isidentifier():  # Hypothesis reports the failing case as this function's call
        rewrite_preserves_outputs.__name__ = rewrite_preserves_outputs.__qualname__ = f"{name}_preserves_outputs"
    return chosen(hypothesis.given(example=strategy)(rewrite_preserves_outputs))


def assert_rewrite_preserves(rewrite: Callable[[torch.fx.GraphModule], torch.fx.GraphModule], *,
                             strategy: st.SearchStrategy | None = None, max_examples: int | None = None,
                             rtol: float = 1e-5, atol: float = 1e-6,
                             settings: hypothesis.settings | None = None) -> None:
    """Run :func:`rewrite_property` now: raise (after Hypothesis shrinks it) on the first
    network whose outputs ``rewrite`` changes, or whose graph it leaves broken.

    Parameters
    ----------
    rewrite, strategy, max_examples, rtol, atol, settings
        As in :func:`rewrite_property`.

    Raises
    ------
    AssertionError
        From :func:`assert_equivalent` or ``Graph.lint``, with Hypothesis's note of the
        falsifying example; or whatever ``rewrite`` raised.
    """
    rewrite_property(rewrite, strategy=strategy, max_examples=max_examples, rtol=rtol, atol=atol,
                     settings=settings)()
