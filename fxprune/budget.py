"""select-budget: the plan that meets a MACs and/or parameter budget.

Instead of a hand-tuned ratio the user gives ``target_macs`` and/or
``target_params`` (an absolute count, or a float in (0, 1): a fraction of the
captured model's). The pass searches the ratio of :func:`select_channels`:

- the *steps* are the ratios at which the plan changes: ``j / n`` for every
  group size ``n`` (local ranking), for the pooled channel count (global
  ranking: one step removes one more channel), or for each isomorphic set;
- each candidate plan is rewritten and measured on the ``meta`` device
  (shapes only: no FLOPs, no memory), which takes milliseconds;
- bisection over the steps keeps ``cost(lo) > target >= cost(hi)`` and stops
  when ``hi`` is the step right after ``lo``.

So the plan found meets the budget and the plan one step less pruned does not
(reported as ``previous``). A budget below what the largest step reaches is a
:class:`~fxprune.errors.ConfigError` naming the smallest reachable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fxprune.capture import MetaProp as _MetaProp, to_meta as _to_meta
from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.meta import graph_inputs
from fxprune.report import ModelStats, count_params, human, measure
from fxprune.plan import candidates, isomorphic_sets, own_ratios, segment_parts, select_channels
from fxprune.rewrite import rewrite_graph
from fxprune.rules.registry import OpSpec


@dataclass(frozen=True)
class BudgetResult:
    """Where a budget search landed.

    ``targets`` holds ``(metric, target)`` pairs with the absolute targets;
    ``original``/``achieved`` are the captured model's numbers before and after;
    ``ratio`` the selection ratio found; ``previous`` the numbers of the plan one
    step less pruned (``previous_ratio``), which misses the budget (None when the
    unpruned model already meets it).
    """

    targets: tuple[tuple[str, float], ...]
    original: ModelStats
    achieved: ModelStats
    ratio: float
    previous_ratio: float | None
    previous: ModelStats | None
    evaluations: int

    def __str__(self) -> str:
        parts = []
        for metric, target in self.targets:
            got, base = getattr(self.achieved, metric), getattr(self.original, metric)
            parts.append(f"{metric} {human(got)} <= target {human(target)} "
                         f"({got / max(base, 1):.3f} of {human(base)})")
        return f"budget: {'; '.join(parts)}; ratio {self.ratio:.4f}, {self.evaluations} plans measured"


# -- pure helpers ---------------------------------------------------------------
def resolve_target(value: Any, original: int, name: str) -> float | None:
    """An absolute target from ``value`` (a count, or a float in (0, 1): a fraction)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or \
            math.isinf(value):
        raise ConfigError(f"{name} must be a positive count or a float in (0, 1) (a fraction of the "
                          f"original model's), got {value!r}")
    if isinstance(value, float) and value < 1.0:
        return value * original
    return float(value)


def meta_stats(gm: torch.fx.GraphModule, inputs: tuple) -> ModelStats:
    """Parameters and MACs of ``gm``, run on the meta device (real tensors as a fallback)."""
    counter = FlopCounterMode(display=False)
    run = _Count(gm)
    try:
        with torch.no_grad(), counter:
            run.run(*(_to_meta(t) for t in inputs))
    except Exception:  # an op without a meta kernel: measure for real
        return measure(gm, inputs)
    return ModelStats(params=count_params(gm), macs=(counter.get_total_flops() + run.flops) // 2)


class _Count(_MetaProp):
    """Runs a graph on meta tensors (under a FLOP counter) without recording shapes on its
    nodes. Convs, linears, attention and recurrent layers whose output shape the shape
    shortcuts of their op specs know are not run: their FLOPs come from the specs' FLOP
    counts (``OpSpec.flops``: ``torch.utils.flop_counter``'s own formulas for the matmuls
    and convolutions the counter would have seen; a third to a tenth of the time of
    running them on meta; an LSTM's meta kernel runs step by step in Python)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, on_meta=True)
        self.flops = 0

    def run_node(self, n: torch.fx.Node) -> Any:
        return torch.fx.Interpreter.run_node(self, n)

    def skipped(self, spec: OpSpec, op: Any, args: tuple, out: Any) -> None:
        assert spec.flops is not None  # MetaProp calls this only for specs that count FLOPs
        self.flops += spec.flops(op, args, out)


def ratio_steps(groups: ChannelGroups, *, ignore=(), ratios=(), global_ranking=False,
                isomorphic=False) -> list[float]:
    """The ratios at which the plan of :func:`select_channels` can change, ascending from 0."""
    own = own_ratios(groups, ratios)
    free = {gid: c for gid, c in candidates(groups, ignore).items() if gid not in own}
    sizes = [c.numel() for c in free.values()]
    if isomorphic:
        sizes = [sum(free[gid].numel() for gid in s) for s in isomorphic_sets(groups, list(free))]
    elif global_ranking:
        sizes = [sum(sizes)] if sizes else []
    else:  # local ranking's caps on the tensors that hold part of a group
        sizes += [p.numel() for parts in segment_parts(groups, free).values() for p in parts]
    steps = {Fraction(j, n) for n in sizes for j in range(n)} | {Fraction(0)}
    return [float(s) for s in sorted(steps)]


# -- the work -------------------------------------------------------------------
def select_for_budget(groups: ChannelGroups, scores, example_inputs: tuple, *,
                      target_macs: Any = None, target_params: Any = None,
                      **select_options: Any) -> Any:
    """The least-pruned plan of :func:`select_channels` (over its ratio) that meets the budget.

    Parameters
    ----------
    groups, scores : the analysis and the channel scores.
    example_inputs : the model's positional inputs (only their shapes matter).
    target_macs, target_params : absolute counts or fractions in (0, 1); at least one.
    select_options : the other options of :func:`select_channels` (not ``ratio``).

    Returns
    -------
    PrunePlan whose ``budget`` is a :class:`BudgetResult`.
    """
    if target_macs is None and target_params is None:
        raise ConfigError("select-budget needs target_macs or target_params")
    if "ratio" in select_options:
        raise ConfigError("pass either ratio or a target (target_macs/target_params), not both: "
                          "the budget search chooses the ratio")
    inputs = graph_inputs(groups.gm, example_inputs)
    original = meta_stats(groups.gm, inputs)
    targets = tuple((m, t) for m, t in (("macs", resolve_target(target_macs, original.macs, "target_macs")),
                                        ("params", resolve_target(target_params, original.params,
                                                                  "target_params")))
                    if t is not None)
    steps = ratio_steps(groups, ignore=select_options.get("ignore", ()),
                        ratios=select_options.get("ratios", ()),
                        global_ranking=select_options.get("global_ranking", False)
                        or select_options.get("adaptive", False),
                        isomorphic=select_options.get("isomorphic", False))
    cache: dict[int, tuple[Any, ModelStats]] = {}
    by_plan: dict[bytes, ModelStats] = {}

    def evaluate(i: int):
        if i not in cache:
            plan = select_channels(groups, scores, ratio=steps[i], **select_options)
            key = plan.kept.numpy().tobytes()
            if key not in by_plan:
                by_plan[key] = meta_stats(rewrite_graph(groups, plan.kept), inputs)
            cache[i] = (plan, by_plan[key])
        return cache[i]

    def meets(stats: ModelStats) -> bool:
        return all(getattr(stats, m) <= t for m, t in targets)

    lo, hi = 0, len(steps) - 1
    if not meets(evaluate(hi)[1]):
        best = evaluate(hi)[1]
        reach = ", ".join(f"{m} {getattr(best, m)} ({getattr(best, m) / max(getattr(original, m), 1):.3f} "
                          f"of the original)" for m, _ in targets)
        raise ConfigError(f"the budget ({', '.join(f'{m} <= {t:.0f}' for m, t in targets)}) is unreachable "
                          f"with these options: the smallest reachable is {reach}. Raise the target, or "
                          f"allow more pruning (max_ratio, ignore, ratios, round_to)")
    if meets(evaluate(lo)[1]):
        hi, previous = lo, None
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if meets(evaluate(mid)[1]):
                hi = mid
            else:
                lo = mid
        previous = evaluate(lo)[1]
    plan, achieved = evaluate(hi)
    budget = BudgetResult(targets, original, achieved, steps[hi], None if previous is None else steps[lo],
                          previous, len(by_plan))
    return type(plan)(plan.kept, plan.removed_per_group, budget)
