"""Iterative pruning: a loop of (score, select one step of a schedule, rewrite,
fine-tune), each step re-tracing the previous step's module.

The schedule gives the cumulative fraction of every group's channels removed
after step ``k`` of ``n``: ``linear`` is ``ratio * k / n``; ``exponential``
keeps the same fraction of the remaining channels at every step,
``1 - (1 - ratio) ** (k / n)``; a sequence gives the fractions explicitly.
Channel counts are tracked against the *original* group sizes (groups are
matched across steps by their members' names), so after step ``k`` a group of
``n0`` removable channels has lost exactly ``floor(f_k * n0)`` of them and the
final model has the requested ratio, as one ``fxprune.prune(ratio=...)`` would.
``round_to`` and ``max_ratio`` apply at every step; global ranking hits the
pooled count exactly, isomorphic ranking up to rounding in each set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._util import as_tuple
from .api import PruneResult, check_model, qualified_names, analyze, prune
from .errors import ConfigError
from .report import PruneReport

SCHEDULES = ("linear", "exponential")


@dataclass(frozen=True, eq=False)
class IterativeStep:
    """One step: its number (1-based), the cumulative fraction ``ratio`` it targets,
    the step's module (after fine-tuning) and its :class:`~fxprune.PruneResult`
    (whose ``module`` is the same object unless ``finetune`` returned another)."""

    step: int
    ratio: float
    module: nn.Module
    result: PruneResult
    verified: Any = None

    @property
    def report(self) -> PruneReport:
        return self.result.report


@dataclass(frozen=True, eq=False)
class IterativeResult:
    """Every step of :func:`iterative`; ``module`` is the last step's."""

    steps: tuple[IterativeStep, ...]
    schedule: str
    ratio: float

    @property
    def module(self) -> nn.Module:
        return self.steps[-1].module

    @property
    def report(self) -> PruneReport:
        """The first step's input against the last step's output; timings per step."""
        first, last = self.steps[0].report, self.steps[-1].report
        timings = tuple((f"step {s.step}: {n}", t) for s in self.steps for n, t in s.report.timings)
        return PruneReport(first.before, last.after, first.channels_before, last.channels_after,
                           max(s.report.groups_pruned for s in self.steps), timings)

    def __repr__(self) -> str:
        return f"IterativeResult({len(self.steps)} steps, {self.schedule}, ratio {self.ratio:g})"


def schedule_fractions(ratio: float, steps: int, schedule: str | Sequence[float] = "linear") -> list[float]:
    """Cumulative fraction removed after each step.

    Examples
    --------
    >>> schedule_fractions(0.5, 2)
    [0.25, 0.5]
    >>> [round(f, 4) for f in schedule_fractions(0.75, 2, "exponential")]
    [0.5, 0.75]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(schedule, str):
        if schedule == "linear":
            return [ratio * k / steps for k in range(1, steps + 1)]
        if schedule == "exponential":
            return [1.0 - (1.0 - ratio) ** (k / steps) for k in range(1, steps + 1)]
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} or a "
                          f"sequence of cumulative fractions, one per step")
    fr = [float(f) for f in schedule]
    if len(fr) != steps or any(not 0.0 <= f < 1.0 for f in fr) or fr != sorted(fr):
        raise ConfigError(f"schedule must hold {steps} non-decreasing cumulative fractions in [0, 1), "
                          f"one per step, got {list(schedule)!r}")
    return fr


def _key(group) -> tuple:
    return tuple(sorted((m.path, m.role) for m in group.members))


def _name_of(groups, group) -> str | None:
    """A parameter path whose output channels are exactly in ``group`` (for ``ratios``)."""
    from fxprune.plan import classes_of_name

    for m in group.members:
        if m.role in ("out", "free"):
            cls = classes_of_name(groups, m.path)
            if cls is not None and bool((groups.group_of_class[cls] == group.id).all()):
                return m.path
    return None


def _step_options(groups, original: dict, fraction: Callable[[float], float], ratio: float,
                  own: dict, ignore: tuple, pooled: bool) -> tuple[float, dict]:
    """(default ratio, {name: ratio}) for one step: exact counts against the original sizes."""
    from fxprune.plan import candidates, own_ratios

    cand = candidates(groups, ignore)
    own_now = own_ratios(groups, tuple(own.items()))
    named: dict[str, float] = {}
    pool_now = pool_gone = pool_orig = 0
    for gid, c in cand.items():
        g = groups.groups[gid]
        n_cur = c.numel()
        n0 = original.get(_key(g), n_cur)
        name = _name_of(groups, g)
        if pooled and gid not in own_now:
            pool_now, pool_gone, pool_orig = pool_now + n_cur, pool_gone + n0 - n_cur, pool_orig + n0
            continue
        want = math.floor(fraction(own_now.get(gid, ratio)) * n0 + 1e-9) - (n0 - n_cur)
        if name is not None:
            named[name] = max(0, want) / n_cur
    if pooled:
        want = math.floor(fraction(ratio) * pool_orig + 1e-9) - pool_gone
        return (max(0, want) / pool_now if pool_now else 0.0), named
    return 0.0, named


def iterative(model: nn.Module, example_inputs: Any, *, steps: int, ratio: float = 0.5,
              schedule: str | Sequence[float] = "linear",
              finetune: Callable[[nn.Module, int], Any] | None = None, importance: Any = "l2",
              check: bool = False, progress: bool = False, **prune_options: Any) -> IterativeResult:
    """Prune ``model`` in ``steps`` steps to ``ratio`` of each group's channels removed.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    example_inputs : Tensor or tuple
    steps : number of prune steps.
    ratio : the overall fraction of each group's channels removed after the last step.
    schedule : 'linear', 'exponential' or a sequence of cumulative fractions (see module doc).
    finetune : called as ``finetune(module, step)`` (step 1..steps) after each step's
        rewrite; it trains ``module`` in place or returns the module to continue with.
        The step's module is put in eval mode afterwards.
    importance : as in :func:`fxprune.prune`; re-scored at every step.
    check : run :func:`fxprune.verify` on every step (before fine-tuning).
    progress : show a tqdm progress bar over the steps.
    prune_options : the other options of :func:`fxprune.prune` (ratios hold *final* ratios).

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    >>> res = fxprune.iterative(net, torch.randn(1, 3, 8, 8), steps=2, ratio=0.5)
    >>> [s.module.get_submodule("0").out_channels for s in res.steps]
    [12, 8]
    """
    from fxprune.plan import candidates, check_ratio

    from .verify import verify

    check_model(model)
    check_ratio(ratio)
    if finetune is not None and not callable(finetune):
        raise ConfigError(f"finetune must be a callable(module, step), got {type(finetune).__name__}")
    for bad in ("target_macs", "target_params", "pipeline", "ratio", "report"):
        if bad in prune_options:
            raise ConfigError(f"iterative does not take {bad}: it prunes each step by the schedule's "
                              f"ratio; call fxprune.prune for budgets and pipelines")
    fractions = schedule_fractions(ratio, steps, schedule)
    inputs = as_tuple(example_inputs)
    options = dict(prune_options)
    ratios = options.pop("ratios", None) or {}
    own = dict(zip(qualified_names(model, ratios.keys(), "ratios"), ratios.values()))
    options["ignore"] = qualified_names(model, options.pop("ignore", ()), "ignore")
    for r in own.values():
        check_ratio(r, "a ratio in ratios")
    pooled = bool(options.get("global_ranking") or options.get("isomorphic"))
    analysis = dict(leaf_modules=options.get("leaf_modules", ()), concrete_args=options.get("concrete_args"),
                    policy=options.get("policy", "inner"))
    first = analyze(model, inputs, **analysis)
    original = {_key(first.groups[gid]): c.numel() for gid, c in candidates(first, options["ignore"]).items()}
    done: list[IterativeStep] = []
    current: nn.Module = model
    bar = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="iterative pruning", unit="step")
    for k in bar:
        groups = analyze(current, inputs, **analysis)

        def fraction(r: float, k: int = k) -> float:  # the schedule of a group whose final ratio is r
            if isinstance(schedule, str):
                return schedule_fractions(r, steps, schedule)[k - 1]
            return fractions[k - 1] * (r / ratio) if ratio else 0.0

        default, named = _step_options(groups, original, fraction, ratio, own, options["ignore"], pooled)
        if not pooled:  # groups no name reaches: the step's share of what remains
            before = fractions[k - 2] if k > 1 else 0.0
            default = (fractions[k - 1] - before) / (1.0 - before)
        result = prune(current, inputs, ratio=default, ratios=named, importance=importance, **options)
        verified = verify(current, result, inputs) if check else None
        module: nn.Module = result.module
        if finetune is not None:
            returned = finetune(module, k)
            module = returned if isinstance(returned, nn.Module) else module
        module.eval()
        done.append(IterativeStep(k, fractions[k - 1], module, result, verified))
        current = module
    return IterativeResult(tuple(done), schedule if isinstance(schedule, str) else "custom", ratio)
