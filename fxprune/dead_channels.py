"""Lossless dead-channel elimination: remove the channels that provably carry nothing
but a constant, and fold the constant into their consumers' biases.

A channel class is *dead* when

1. a structural reason makes its value independent of the input: every weight row
   that produces it is zero (its value is its bias), or a norm scale of it is zero
   (its value is the norm's shift), as slimming, group lasso and growing
   regularization leave channels; with ``threshold > 0``, rows and scales at most
   ``threshold`` times the largest of their tensor count as zero; and
2. its value is constant at every linear consumer input where it is read, on the
   example inputs and on random probes around them (a channel a residual path
   carries as well is not constant there, and stays); and
3. its group has no op that mixes channel values (a norm over the channels would
   see it), and every consumer that reads a non-zero constant can fold it into a
   bias (a linear layer, a conv without padding).

The constant each removed channel takes at each consumer is folded in by bias
compensation (:mod:`fxprune.compensate`), so the result computes what the model
computes. The oracle checks it like any pruning result, and the elimination
additionally measures the pruned model against the original model itself.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ._util import as_tuple
from .channels import ChannelGroups
from .compensate import apply_compensation, compensation_fills, why_not_affine
from .errors import ConfigError, VerificationError
from .meta import graph_inputs
from .plan import PrunePlan
from .rules.context import get_tensor
from .scoring import ChannelScores
from .statistics import collect_statistics, consumer_sites

__all__ = ["dead_classes", "eliminate", "eliminate_dead_channels", "structurally_dead"]


def _zero(values: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    return values <= threshold * scale if threshold > 0 else values == 0


def structurally_dead(groups: ChannelGroups, threshold: float = 0.0) -> torch.Tensor:
    """Per class: whether a structural reason makes its value constant (all producing
    rows zero, or a zero norm scale)."""
    n = groups.n_classes
    rows_seen = torch.zeros(n, dtype=torch.bool)
    rows_live = torch.zeros(n, dtype=torch.bool)
    scale_zero = torch.zeros(n, dtype=torch.bool)
    for a in groups.alignments:
        if a.dim is None:
            continue
        t = get_tensor(groups.gm, a.path).detach()
        if not t.is_floating_point():
            continue
        cls = groups.class_of[a.labels.reshape(-1)]
        flat = t.double().movedim(a.dim, 0).reshape(t.shape[a.dim], -1).abs()
        per = flat.amax(1)
        scale = float(per.max()) if per.numel() else 0.0
        if a.role == "out" and t.ndim >= 2:  # weight rows (a bias is what the channel keeps)
            rows_seen[cls] = True
            live = ~_zero(per, threshold, scale)
            rows_live.index_put_((cls,), live, accumulate=True)
        elif a.role == "norm" and a.path.rsplit(".", 1)[-1] in ("weight", "scale", "gamma"):
            scale_zero[cls[_zero(per, threshold, scale)]] = True
    return (rows_seen & ~rows_live) | scale_zero


def _probes(inputs: tuple, n: int, seed: int) -> list[tuple]:
    """The example inputs and ``n`` random batches around them: floats perturbed at
    several scales, integers (token ids) redrawn in the range the example spans."""
    g = torch.Generator().manual_seed(seed)
    out = [inputs]
    for k in range(n):
        batch = []
        for v in inputs:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                spread = float(v.double().std()) if v.numel() > 1 else 1.0
                noise = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
                batch.append(v + noise * (spread or 1.0) * (0.5 * (k + 1)))
            elif isinstance(v, torch.Tensor) and v.dtype in (torch.int32, torch.int64) and v.numel():
                lo, hi = int(v.min()), int(v.max())
                batch.append(torch.randint(lo, hi + 1, v.shape, generator=g, dtype=v.dtype))
            else:
                batch.append(v)
        out.append(tuple(batch))
    return out


def dead_classes(groups: ChannelGroups, example_inputs: Any, *, threshold: float = 0.0, probes: int = 4,
                 seed: int = 0, progress: bool | None = False) -> tuple[torch.Tensor, Any]:
    """The channel classes to remove (a bool per class) and the calibration statistics of
    the probes (the constants to fold)."""
    candidate = structurally_dead(groups, threshold)
    candidate &= ~groups.class_pinned & ~groups.class_inexact
    inputs = as_tuple(example_inputs)
    if not bool(candidate.any()):
        return torch.zeros(groups.n_classes, dtype=torch.bool), None
    batches = [graph_inputs(groups.gm, b) for b in _probes(inputs, probes, seed)]
    stats = collect_statistics(groups, [[b] for b in batches], producers=False, progress=progress,
                               criterion="eliminate-dead-channels")
    constant = candidate.clone()
    read = torch.zeros_like(candidate)
    nodes = {n.name: n for n in groups.gm.graph.nodes}
    for (name, pos), site in consumer_sites(groups).items():
        st = stats.stats.get(site.key)
        if st is None or st.count == 0:
            continue
        cls = groups.class_of[site.labels.reshape(-1)]
        std = st.var.clamp_min(0).sqrt()
        tiny = max(threshold, 1e-7) * max(float(std.max()) + float(st.mean.abs().max()), 1e-30)
        constant[cls[std > tiny]] = False
        read[cls] = True
        # a consumer that cannot fold a constant into a bias must read zero
        if not (pos in (0, "input") and why_not_affine(nodes[name], groups.gm) is None):
            constant[cls[st.mean.abs() > tiny]] = False
    return constant & read, stats


def eliminate(groups: ChannelGroups, example_inputs: Any, *, threshold: float = 0.0, probes: int = 4,
              seed: int = 0, progress: bool | None = False):
    """(plan, pruned module, scores) of dead-channel elimination on an analysis."""
    import dataclasses

    from .rewrite import rewrite_graph

    dead, stats = dead_classes(groups, example_inputs, threshold=threshold, probes=probes, seed=seed,
                                    progress=progress)
    plan = PrunePlan(~dead, _per_group(groups, dead))
    module = rewrite_graph(groups, plan.kept)
    if stats is not None and bool(dead.any()):
        comp = compensation_fills(groups, plan.kept, stats)
        apply_compensation(module, groups, plan.kept, comp)
        plan = dataclasses.replace(plan, compensation=comp)
    return plan, module, ChannelScores((~dead).double(), "dead-channels")


def eliminate_dead_channels(model: nn.Module, example_inputs: Any, *, threshold: float = 0.0,
                            probes: int = 4, seed: int = 0, check: bool = True, frontend: str = "auto",
                            leaf_modules=(), concrete_args=None, progress: bool | None = False):
    """Remove the dead channels of ``model`` (see the module docstring) and return an
    :class:`fxprune.PruneResult` whose ``module`` computes what ``model`` computes.

    With ``check`` (default) the result goes through :func:`fxprune.verify` and is
    compared with ``model`` on the probes; with ``threshold=0`` it must match to float
    tolerance, else :class:`fxprune.errors.VerificationError`.

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight[:2].zero_()  # channels 0 and 1 output their bias only
    >>> r = fxprune.eliminate_dead_channels(net, torch.randn(8, 4))
    >>> r.module.get_submodule("0").out_features, r.plan.n_removed
    (4, 2)
    """
    from .api import PruneResult, analyze, prune_report
    from .passes_base import PruneState

    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold must be a number in [0, 1), got {threshold!r}: weights at most "
                          f"threshold x the largest of their tensor count as zero")
    t0 = time.perf_counter()
    groups = analyze(model, example_inputs, frontend=frontend, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
    t1 = time.perf_counter()
    plan, module, scores = eliminate(groups, example_inputs, threshold=threshold, probes=probes, seed=seed,
                                     progress=progress)
    timings = (("analyze", t1 - t0), ("eliminate-dead-channels", time.perf_counter() - t1))
    state = PruneState(model=model, example_inputs=as_tuple(example_inputs), gm=groups.gm, groups=groups,
                       plan=plan, module=module, timings=timings)
    report = prune_report(model, state, as_tuple(example_inputs))
    result = PruneResult(module, report, groups, plan, scores, timings, "capture,channel-deps,"
                         f"eliminate-dead-channels{{threshold={threshold}}},rewrite", groups.frontend)
    if check and plan.n_removed:
        from .verify import verify

        verify(model, result, example_inputs)
        if threshold == 0:
            _check_equal(model, module, groups, example_inputs, probes, seed)
    return result


def _per_group(groups: ChannelGroups, dead: torch.Tensor) -> tuple[tuple[int, int], ...]:
    gone = groups.group_of_class[dead]
    counts = torch.bincount(gone[gone >= 0], minlength=len(groups.groups)).tolist()
    return tuple((g.id, counts[g.id]) for g in groups.groups if counts[g.id])


def _check_equal(model, module, groups, example_inputs, probes, seed) -> None:
    """The pruned module against the model itself on every probe."""
    import torch.utils._pytree as pytree

    def floats(out):
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    for batch in _probes(as_tuple(example_inputs), probes, seed):
        with torch.no_grad():
            want = floats(model(*batch))
            got = floats(module(*graph_inputs(groups.gm, batch)))
        eps = max((torch.finfo(t.dtype).eps for t in want), default=0.0)
        want, got = [t.double() for t in want], [t.double() for t in got]
        scale = max((float(t.abs().max()) for t in want if t.numel()), default=0.0) or 1.0
        err = max((float((a - b).abs().max()) for a, b in zip(got, want) if a.numel()), default=0.0) / scale
        if len(got) != len(want) or not err <= max(1e-5, 64 * eps):
            raise VerificationError(f"dead-channel elimination changed the model's output (relative error "
                                    f"{err:.3g}); this is a bug, please report it with the model")
