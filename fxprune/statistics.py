"""Calibration statistics of channel activations: one pass over calibration batches
of the captured graph, per channel, in float64.

Statistics are taken where channels enter their *consumers* (the inputs of the ops
the analysis records as linear consumers: a linear or conv layer's input, a sum over
channels) and where *producers* emit them (the outputs of the ops whose weight rows
make a group's channels). Each site is one value of the graph, reduced over every
dim but its channel dim: count, mean and M2 (Chan's parallel update, so batches and
ranks merge exactly), mean |x| and, per sample, the mean |x| squared (Minitron's
"mean over the sequence, L2 over the batch"). On request, the Gram matrix
``sum x x^T`` (with the bias column) of chosen consumers' inputs.

Under ``torch.distributed`` (an initialized process group), every statistic is
all-reduced once at the end, so data-parallel ranks calibrating on their own
shards all get the statistics of the union of their data, and the same plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from .calibration import check_data, data_length, split_batch, to_device
from .channels import ChannelGroups
from .errors import ConfigError
from .labels import channel_dim
from .meta import graph_inputs

__all__ = ["ChannelStats", "ActivationStats", "Site", "collect_statistics", "consumer_sites"]


@dataclass(frozen=True)
class Site:
    """Where channels are observed: the value of node ``node`` (entry ``entry`` of a
    tuple-valued node), whose labels ``labels`` vary along ``dim``."""

    node: str
    entry: int | None
    labels: torch.Tensor = field(repr=False, compare=False)
    dim: int = field(compare=False)

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.node, self.entry)


class ChannelStats:
    """Streaming per-channel statistics of one site (float64, exact merges)."""

    def __init__(self, n_channels: int, gram: bool = False):
        z = lambda: torch.zeros(n_channels, dtype=torch.float64)  # noqa: E731
        self.count = 0
        self.mean, self.m2, self.abs_sum = z(), z(), z()
        self.samples = 0
        self.sample_abs_sq = z()
        self.gram = torch.zeros(n_channels + 1, n_channels + 1, dtype=torch.float64) if gram else None

    @property
    def n_channels(self) -> int:
        return self.mean.numel()

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel."""
        return self.m2 / max(self.count, 1)

    @property
    def sample_var(self) -> torch.Tensor:
        """Unbiased (sample) variance per channel."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.var + self.mean.pow(2)

    @property
    def rms(self) -> torch.Tensor:
        return self.mean_square.clamp_min(0).sqrt()

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def sample_abs_rms(self) -> torch.Tensor:
        """sqrt(mean over samples of (mean over the sample's positions of |x|)^2)."""
        return (self.sample_abs_sq / max(self.samples, 1)).sqrt()

    @property
    def nbytes(self) -> int:
        return 8 * (5 * self.n_channels + (0 if self.gram is None else self.gram.numel()))

    def update(self, x: torch.Tensor, dim: int) -> None:
        c = self.n_channels
        rows = x.detach().movedim(dim, -1).reshape(-1, c).to(torch.float64)
        n = rows.shape[0]
        if n == 0:
            return
        mean_b = rows.mean(0)
        m2_b = (rows - mean_b).pow(2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.count * n / total)
        self.count = total
        absolute = rows.abs()
        self.abs_sum += absolute.sum(0)
        if dim != 0 and x.ndim > 1:  # dim 0 is the batch: one sample at a time
            per_sample = absolute.reshape(x.shape[0], -1, c).mean(1)
            self.sample_abs_sq += per_sample.pow(2).sum(0)
            self.samples += x.shape[0]
        if self.gram is not None:
            ext = torch.cat([rows, torch.ones(n, 1, dtype=torch.float64)], 1)
            self.gram += ext.T @ ext

    def all_reduce(self) -> None:
        """Merge the statistics of every rank of the default process group."""
        import torch.distributed as dist

        count = torch.tensor([float(self.count), float(self.samples)], dtype=torch.float64)
        dist.all_reduce(count)
        total = float(count[0])
        weighted = self.mean * self.count
        dist.all_reduce(weighted)
        mean = weighted / max(total, 1.0)
        m2 = self.m2 + (self.mean - mean).pow(2) * self.count  # each rank's M2 about the global mean
        for t in (m2, self.abs_sum, self.sample_abs_sq):
            dist.all_reduce(t)
        if self.gram is not None:
            dist.all_reduce(self.gram)
        self.count, self.samples = int(total), int(count[1])
        self.mean, self.m2 = mean, m2


@dataclass(frozen=True, eq=False)
class ActivationStats:
    """Statistics by site key ``(node, entry)``; ``batches`` calibrated on (all ranks)."""

    sites: dict[tuple[str, int | None], Site]
    stats: dict[tuple[str, int | None], ChannelStats]
    batches: int

    def of(self, site: Site) -> ChannelStats:
        return self.stats[site.key]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stats.values())


def _site_of(groups: ChannelGroups, node: torch.fx.Node, entry: int | None) -> Site | None:
    labels = groups.node_labels.get(node.name)
    if entry is not None:
        labels = labels[entry] if isinstance(labels, tuple) and entry < len(labels) else None
    if not isinstance(labels, torch.Tensor):
        return None
    dim = channel_dim(labels)
    if dim is None or bool(groups.class_pinned[groups.class_of[labels.reshape(-1)]].all()):
        return None  # no channel there can be removed: nothing to score or compensate
    return Site(node.name, entry, labels, dim)


def consumer_sites(groups: ChannelGroups) -> dict[tuple[str, Any], Site]:
    """For every linear consumer input ``(node, position or keyword)`` of the analysis:
    the site of the value it reads."""
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    out: dict[tuple[str, Any], Site] = {}
    for name, pos in groups.consumers:
        node = nodes[name]
        if isinstance(pos, tuple):
            arg, entry = node.args[pos[0]] if pos[0] < len(node.args) else None, pos[1]
            if isinstance(arg, (list, tuple)):  # an entry of a list argument: its own node
                arg, entry = arg[pos[1]], None
        elif isinstance(pos, int) and pos < len(node.args):
            arg, entry = node.args[pos], None
        else:
            arg, entry = node.kwargs.get(pos if isinstance(pos, str) else "input"), None
        if isinstance(arg, torch.fx.Node):
            site = _site_of(groups, arg, entry)
            if site is not None:
                out[(name, pos)] = site
    return out


def producer_sites(groups: ChannelGroups) -> dict[str, Site]:
    """For every node whose weight rows make channels (an ``out`` alignment): its output."""
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    out: dict[str, Site] = {}
    for a in groups.alignments:
        if a.role == "out" and a.node in nodes and a.node not in out:
            site = _site_of(groups, nodes[a.node], None)
            if site is not None:
                out[a.node] = site
    return out


class _Collector(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict[str, list[Site]], stats: dict):
        super().__init__(gm)
        self.watch, self.stats = watch, stats

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        for site in self.watch.get(n.name, ()):
            v = value if site.entry is None else value[site.entry]
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                self.stats[site.key].update(v, site.dim)
        return value


class _Runner(torch.nn.Module):
    """``gm`` run by the collecting interpreter (a module, so that ``functional_call``
    can swap its buffers for copies)."""

    def __init__(self, gm, watch, stats):
        super().__init__()
        self.gm, self.watch, self.stats = gm, watch, stats

    def forward(self, *inputs):
        return _Collector(self.gm, self.watch, self.stats).run(*inputs)


def collect_statistics(groups: ChannelGroups, data: Iterable, *, consumers: bool = True,
                       producers: bool = True, gram: Iterable[tuple[str, Any]] = (),
                       max_batches: int | None = None, progress: bool | None = None,
                       criterion: str = "calibration") -> ActivationStats:
    """Per-channel statistics of every consumer input and producer output of ``groups``
    over the batches of ``data`` (see :func:`fxprune.calibration.split_batch` for what a
    batch is), under ``torch.no_grad``, on the device of the graph's parameters.

    ``gram``: consumer keys ``(node, position)`` whose input Gram matrix to accumulate.
    The graph is never modified; the user's model is not run.

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> g = fxprune.analyze(net, torch.randn(4, 2))
    >>> st = collect_statistics(g, [torch.randn(8, 2) for _ in range(3)])
    >>> st.batches, sorted({s.count for s in st.stats.values()})
    (3, [24])
    """
    check_data(data, criterion)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    csites = consumer_sites(groups) if consumers or gram else {}
    sites: dict[tuple[str, int | None], Site] = {}
    if consumers:
        sites.update({s.key: s for s in csites.values()})
    if producers:
        sites.update({s.key: s for s in producer_sites(groups).values()})
    want_gram = set()
    for key in gram:
        key = (key[0], key[1])
        if key not in csites:
            raise ConfigError(f"no linear consumer input {key!r} in the analysis to take a Gram matrix of; "
                              f"consumers are e.g. {list(csites)[:6]}")
        sites[csites[key].key] = csites[key]
        want_gram.add(csites[key].key)
    gm = groups.gm
    stats: dict[tuple[str, int | None], ChannelStats] = {}
    for key, site in sites.items():
        n_channels = int(site.labels.shape[site.dim])
        stats[key] = ChannelStats(n_channels, gram=key in want_gram)
    watch: dict[str, list[Site]] = {}
    for site in sites.values():
        watch.setdefault(site.node, []).append(site)
    param = next(iter(gm.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    total = data_length(data)
    batches = data if max_batches is None else islice(data, max_batches)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    runner = _Runner(gm, watch, stats)
    # a graph that writes its buffers (running statistics, caches) writes copies
    buffers = {f"gm.{name}": b.clone() for name, b in gm.named_buffers()}
    modes = [(m, m.training) for m in gm.modules()]
    n = 0
    try:
        gm.eval()
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc=f"fxprune: {criterion}", unit="batch", leave=False,
                              disable=None if progress is None else not progress):
                inputs, _ = split_batch(to_device(batch, device))
                try:
                    torch.func.functional_call(runner, buffers, graph_inputs(gm, inputs), strict=False)
                except Exception as exc:
                    shapes_given = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                                    for v in inputs]
                    raise ConfigError(f"calibration batch {n} (inputs {shapes_given}) does not fit the model: "
                                      f"{type(exc).__name__}: {exc}. Batches must be what the model's "
                                      f"forward takes, as the example inputs were") from exc
                n += 1
    finally:
        for m, mode in modes:
            m.training = mode
    if n == 0:
        raise ConfigError(f"{criterion}: the calibration data yielded no batch")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([float(n)], dtype=torch.float64)
        dist.all_reduce(count)
        n = int(count)
        for s in stats.values():
            s.all_reduce()
    return ActivationStats(sites, stats, n)
