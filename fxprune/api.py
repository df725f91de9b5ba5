"""The public API: ``analyze``, ``prune`` and their result types.

``prune`` is a pipeline of named, timed passes (capture, channel-deps, a
scoring pass, select, rewrite); ``pipeline=`` accepts the same pipeline as text.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._util import as_tuple
from .capture import Capture
from .channels import ChannelGroups
from .errors import ConfigError, InputError, RewriteError
from .meta import graph_inputs
from .passes_base import AnalysisPass, Pass, Pipeline, PruneState, known_passes, make_pass, parse_pipeline
from .plan import PrunePlan
from .report import PruneReport
from .scoring import ChannelScores


@dataclass(frozen=True, eq=False)
class PruneResult:
    """The outcome of :func:`prune`: the new module and how it was made."""

    module: torch.fx.GraphModule
    report: PruneReport
    groups: ChannelGroups
    plan: PrunePlan
    scores: ChannelScores | None
    timings: tuple[tuple[str, float], ...]
    pipeline: str
    frontend: str = "fx"
    stages: tuple["PruneResult", ...] = ()  # policy="both": heads, then head_dim

    @property
    def notes(self) -> tuple[str, ...]:
        """What capture changed about the model's outputs, and why (a Hugging Face model
        with ``use_cache=True`` is captured without its cache); empty when nothing."""
        from .hf import NOTES_KEY

        for r in (self, *self.stages):
            if r.module.meta.get(NOTES_KEY):
                return tuple(r.module.meta[NOTES_KEY])
        return ()

    def apply(self, model: nn.Module, example_inputs: Any = None, *, check: bool = True,
              strict_config: bool = False) -> nn.Module:
        """A pruned deep copy of ``model`` (the module this result was pruned from): its own
        classes, holding the kept slices of its tensors, with the attributes that describe
        sizes updated (``fxprune.apply``; see :mod:`fxprune.writeback`). ``model`` is
        never modified."""
        from .writeback import apply

        return apply(model, self, example_inputs, check=check, strict_config=strict_config)

    @property
    def budget(self) -> Any:
        """Where a ``target_macs``/``target_params`` search landed (None without a target)."""
        return getattr(self.plan, "budget", None)

    def __repr__(self) -> str:
        return (f"PruneResult(removed {self.plan.n_removed} of {self.groups.n_classes} channel "
                f"classes, front end {self.frontend}, pipeline {self.pipeline!r})")


# user-facing names of the analysis policies (which dim of a split view stays prunable)
POLICY_ALIASES = {"inner": "inner", "outer": "outer", "head_dim": "inner", "heads": "outer"}


def _policy(policy: str) -> str:
    if policy not in POLICY_ALIASES:
        raise ConfigError(f"policy={policy!r} is not one of {', '.join(POLICY_ALIASES)} or 'both' "
                          f"(fxprune.prune: whole heads, then head_dim)")
    return POLICY_ALIASES[policy]


def qualified_names(model: nn.Module, items: Iterable, option: str) -> tuple[str, ...]:
    """Module objects or qualified names to qualified names, checked against ``model``."""
    items = tuple(items)
    if not items:
        return ()
    by_id = {id(m): n for n, m in model.named_modules()}
    by_id.update({id(p): n for n, p in model.named_parameters()})
    known = set(by_id.values())
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in known:
                raise ConfigError(f"{option}: {item!r} is not a module or parameter of "
                                  f"{type(model).__name__}; use a name from model.named_modules()")
            out.append(item)
        elif id(item) in by_id:
            out.append(by_id[id(item)])
        else:
            raise ConfigError(f"{option}: the {type(item).__name__} passed is not part of "
                              f"{type(model).__name__}; pass a submodule of the model or its name")
    return tuple(out)


def scoring_pass(importance: Any, data: Any = None, loss_fn: Any = None, data_used: bool = False) -> Pass:
    """``importance`` as a scoring pass: 'l1', 'l2', a registered scoring pass name without
    its ``score-`` prefix ('bn-scale', 'taylor', ...), or a pass object. Data-driven passes
    (those with ``data``/``loss_fn`` options) receive ``data`` and ``loss_fn``."""
    from fxprune.passes.score_magnitude import ScoreMagnitude

    if isinstance(importance, Pass):
        chosen = importance
    elif isinstance(importance, str) and importance.lower() in ("l1", "l2"):
        chosen = ScoreMagnitude(p=1.0 if importance.lower() == "l1" else 2.0)
    elif isinstance(importance, str) and f"score-{importance.lower()}" in known_passes():
        chosen = make_pass(f"score-{importance.lower()}", {})
    else:
        names = ["l1", "l2"] + [p[len("score-"):] for p in known_passes() if p.startswith("score-")]
        raise ConfigError(f"unknown importance {importance!r}; use one of {', '.join(names)} "
                          f"or a scoring pass object")
    fields = {f.name for f in dataclasses.fields(chosen)}
    extra = {k: v for k, v in (("data", data), ("loss_fn", loss_fn)) if v is not None}
    if data_used and "data" not in fields:  # another pass (compensation) takes it
        extra.pop("data", None)
    unused = sorted(set(extra) - fields)
    if unused:
        raise ConfigError(f"importance {chosen.name!r} does not use {' or '.join(unused)}; "
                          f"pass it only to data-driven criteria")
    return dataclasses.replace(chosen, **extra) if extra else chosen


def _pipeline_with_data(body: Pipeline, data: Any, loss_fn: Any) -> Pipeline:
    """``data``/``loss_fn`` (which a pipeline string cannot hold) given to every pass of
    ``body`` with those options."""
    extra = {k: v for k, v in (("data", data), ("loss_fn", loss_fn)) if v is not None}
    if not extra:
        return body
    # a pass takes an option it has as a field, unless it says it will not use it as configured
    # (the rewrite uses data only to compensate)
    takes = [{f.name for f in dataclasses.fields(p)} - set(getattr(p, "unused_options", lambda: ())())
             for p in body.passes]
    unused = sorted(k for k in extra if not any(k in t for t in takes))
    if unused:
        raise ConfigError(f"pipeline {body} has no pass that uses {' or '.join(unused)}; add a "
                          f"data-driven scoring pass (score-taylor, score-wanda, ...) or drop the argument")
    return Pipeline(tuple(dataclasses.replace(p, **{k: v for k, v in extra.items() if k in t})
                          for p, t in zip(body.passes, takes)))


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def analyze(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable = (),
            concrete_args: Mapping | None = None, policy: str = "inner",
            frontend: str = "auto", gqa: str = "kv_groups") -> ChannelGroups:
    """Capture ``model`` and compute its channel groups.

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> groups = fxprune.analyze(net, torch.randn(1, 3, 16, 16))
    >>> [g.size for g in groups.prunable]
    [8]
    """
    from fxprune.passes.channel_deps import ChannelDeps

    check_model(model)
    if policy == "both":
        raise ConfigError("policy='both' prunes in two stages (heads, then head_dim); analyze with "
                          "policy='heads' or policy='head_dim'")
    state = PruneState(model=model, example_inputs=as_tuple(example_inputs))
    pipe = Pipeline((Capture(tuple(leaf_modules), concrete_args, frontend),
                     ChannelDeps(policy=_policy(policy), gqa=gqa)))
    return pipe.run(state).groups


def prune(model: nn.Module, example_inputs: Any, *, ratio: float | None = None,
          ratios: Mapping | None = None, ignore: Iterable = (), round_to: int = 1,
          importance: Any = "l2", global_ranking: bool = False, max_ratio: float = 1.0,
          isomorphic: bool = False, target_macs: float | None = None,
          target_params: float | None = None, policy: str = "inner", pipeline: str | Pipeline | None = None,
          leaf_modules: Iterable = (), concrete_args: Mapping | None = None, frontend: str = "auto",
          gqa: str = "kv_groups",
          data: Any = None, loss_fn: Any = None, report: bool = True,
          adaptive: bool = False, cost: str = "params", compensate: str | None = None,
          progress: bool | None = False) -> PruneResult:
    """Prune ``model`` structurally and return a new, smaller GraphModule.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    example_inputs : Tensor or tuple
        Positional example inputs; they fix the shapes the analysis sees.
    ratio : float in [0, 1), default 0.5
        Fraction of channels removed from each prunable group (of all ranked channels
        with ``global_ranking``/``isomorphic``).
    ratios : mapping of module (or qualified name) to ratio
        Ratio for the group holding that module's output channels.
    ignore : modules or qualified names whose output channels stay.
    round_to : kept channel counts become multiples of this.
    importance : 'l1', 'l2', another criterion's name or a scoring pass object.
    data, loss_fn : calibration batches and loss for data-driven criteria, also for the
        data-driven passes of a ``pipeline`` (a pipeline string cannot hold them).
    global_ranking : rank channels across groups (each group capped at ``max_ratio``).
    isomorphic : rank channels across structurally identical groups only.
    target_macs, target_params : a budget instead of ``ratio``: an absolute count or a
        float in (0, 1), a fraction of the original. The least-pruned plan that meets it
        is searched (``select-budget``); ``result.budget`` says where it landed.
    pipeline : text or Pipeline run after capture instead of the default passes.
    policy : where a view splits channels into blocks (attention heads x head_dim):
        'inner'/'head_dim' (default) prunes head_dim, the same channels in every head;
        'outer' prunes whole blocks; 'heads' is 'outer' that insists on attention heads
        (an error if the model has none, or if ``ratio`` is not a whole number of some
        layer's heads: the message gives the nearest ratios that are); 'both' prunes
        whole heads, then head_dim, each at ``1 - sqrt(1 - ratio)`` so the kept fraction
        is ``1 - ratio`` (``result.stages`` holds both results, ``verify`` checks both).
    gqa : grouped-query attention with whole heads: remove whole kv groups (a kv head and
        its query heads, 'kv_groups', default) or the same query heads inside every group
        ('q_heads', every kv head stays).
    frontend : 'auto' (symbolic tracing, falling back to non-strict ``torch.export`` when
        tracing fails), 'fx' or 'export'. ``result.frontend`` says which one captured.
    adaptive : per-group ratios from the scores (FLAP's allocation): scores standardized
        within each group, ranked together, channels removed until ``ratio`` of the
        ``cost`` ('params', 'macs', 'channels') is gone; composes with the targets.
    compensate : 'bias' folds each removed channel's calibration mean (from ``data``)
        into the biases of its linear/conv consumers (``fxprune.compensate``).
    progress : a progress bar over the passes on stderr (None: only on a terminal).

    Examples
    --------
    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> r = fxprune.prune(net, torch.randn(1, 3, 16, 16), ratio=0.5)
    >>> r.module.get_submodule("0").out_channels
    4
    """
    from fxprune.passes.channel_deps import ChannelDeps
    from fxprune.passes.rewrite import Rewrite
    from fxprune.passes.select import Select
    from fxprune.plan import check_ratio
    from fxprune.passes.select_budget import SelectBudget

    check_model(model)
    if policy == "both":
        return _prune_both(model, example_inputs, ratio=ratio, ratios=ratios, ignore=ignore,
                           round_to=round_to, importance=importance, leaf_modules=leaf_modules,
                           concrete_args=concrete_args, frontend=frontend, data=data, loss_fn=loss_fn,
                           gqa=gqa, progress=progress,
                           report=report, unsupported=dict(global_ranking=global_ranking, adaptive=adaptive,
                                                           compensate=compensate,
                                                           isomorphic=isomorphic, target_macs=target_macs,
                                                           target_params=target_params, pipeline=pipeline))
    exact_heads = policy == "heads"
    policy = _policy(policy)
    budget = target_macs is not None or target_params is not None
    if budget and ratio is not None:
        raise ConfigError("pass either ratio or target_macs/target_params, not both: with a "
                          "target the budget search chooses the ratio")
    if budget and pipeline is not None:
        raise ConfigError("target_macs/target_params build the default pipeline; with pipeline=, "
                          "write the budget into it: select-budget{target_macs=0.5}")
    ratio = 0.5 if ratio is None else check_ratio(ratio)
    inputs = as_tuple(example_inputs)
    ratio_items = tuple(zip(qualified_names(model, (ratios or {}).keys(), "ratios"), (ratios or {}).values()))
    ignored = qualified_names(model, ignore, "ignore")
    if pipeline is None:
        options = dict(ratios=ratio_items, ignore=ignored, round_to=round_to,
                       global_ranking=global_ranking, max_ratio=max_ratio, isomorphic=isomorphic,
                       adaptive=adaptive, cost=cost)
        select = (SelectBudget(target_macs=target_macs, target_params=target_params, **options) if budget
                  else Select(ratio=ratio, exact_heads=exact_heads, **options))
        scoring = scoring_pass(importance, data, loss_fn, data_used=compensate not in (None, "none"))
        if compensate not in (None, "none") and data is None:
            raise ConfigError(f"compensate={compensate!r} needs calibration data: pass data= (batches the "
                              f"model takes, as for the data-driven criteria)")
        rewrite = Rewrite(compensate=compensate, data=data if compensate not in (None, "none") else None)
        body = Pipeline((ChannelDeps(policy=policy, gqa=gqa), scoring, select, rewrite))
    else:
        body = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        body = _pipeline_with_data(body, data, loss_fn)
    capture = Capture(tuple(leaf_modules), concrete_args, frontend)
    passes = body.passes if any(isinstance(p, Capture) for p in body.passes) else (capture, *body.passes)
    pipe = Pipeline(tuple(passes))
    with _pass_bar(pipe, progress) as step:
        state = pipe.run(PruneState(model=model, example_inputs=inputs), progress=step)
    if state.module is None or state.plan is None:
        raise ConfigError(f"pipeline {pipe} produced no pruned module; it must end with "
                          f"select and rewrite")
    rep = prune_report(model, state, inputs) if report else None
    return PruneResult(state.module, rep, state.groups, state.plan, state.scores, state.timings,
                       str(pipe), state.frontend)


@contextlib.contextmanager
def _pass_bar(pipe: Pipeline, progress: bool | None):
    """A tqdm bar over ``pipe``'s passes, or no callback (``progress`` False, or None
    off a terminal)."""
    if progress is False:
        yield None
        return
    from tqdm.auto import tqdm

    names = [p.name for p in pipe.passes]
    with tqdm(total=len(names), desc=f"fxprune: {names[0]}", unit="pass", leave=False,
              disable=None if progress is None else not progress) as bar:
        def step(done: str) -> None:
            bar.update()
            if bar.n < len(names):
                bar.set_description(f"fxprune: {names[bar.n]}")

        yield None if bar.disable else step


def _prune_both(model, example_inputs, *, ratio, ratios, ignore, unsupported, report, **common):
    """Whole heads at ``1 - sqrt(1 - r)``, then head_dim of the result at the same step: every
    group keeps about ``1 - r`` of its channels (attention as heads x head_dim)."""
    import math

    given = sorted(k for k, v in unsupported.items() if v not in (None, False))
    if given:
        raise ConfigError(f"policy='both' takes ratio/ratios (each stage prunes 1 - sqrt(1 - r)), not "
                          f"{', '.join(given)}; use policy='heads' or 'head_dim' with those")
    from fxprune.plan import check_ratio

    step = lambda r: 1.0 - math.sqrt(1.0 - check_ratio(r))  # noqa: E731  (checks r first)
    ratio = step(0.5 if ratio is None else ratio)
    names = dict(zip(qualified_names(model, (ratios or {}).keys(), "ratios"), (ratios or {}).values()))
    ignored = qualified_names(model, ignore, "ignore")
    staged = dict(ratios={k: step(v) for k, v in names.items()}, ignore=ignored, **common)
    heads = prune(model, example_inputs, ratio=ratio, policy="outer", report=False, **staged)
    if not heads.groups.head_splits:
        raise ConfigError("policy='both' needs attention heads, and no view or reshape in this model "
                          "splits a channel dim into (heads, head_dim) blocks; use the default policy")
    inputs = graph_inputs(heads.groups.gm, as_tuple(example_inputs))
    staged["frontend"] = "auto"
    dims = prune(heads.module, inputs, ratio=ratio, policy="inner", report=False, **staged)
    rep = None
    if report:
        from fxprune.budget import meta_stats

        from .report import ModelStats, PruneReport, count_params
        rep = PruneReport(before=ModelStats(count_params(model), meta_stats(heads.groups.gm, inputs).macs),
                          after=meta_stats(dims.module, inputs),
                          channels_before=sum(g.size for g in heads.groups.groups),
                          channels_after=sum(g.size for g in dims.groups.groups) - dims.plan.n_removed,
                          groups_pruned=len(heads.plan.removed_per_group) + len(dims.plan.removed_per_group),
                          timings=heads.timings + dims.timings)
    return PruneResult(dims.module, rep, dims.groups, dims.plan, dims.scores, heads.timings + dims.timings,
                       f"{heads.pipeline} | then | {dims.pipeline}", heads.frontend, (heads, dims))


def prune_report(model, state: PruneState, inputs: tuple):
    """Before/after numbers, MACs counted on the meta device (the captured graph computes
    what the model computes; parameters are counted on the model itself)."""
    from fxprune.budget import meta_stats

    from .report import ModelStats, PruneReport, count_params

    groups, plan = state.groups, state.plan
    channels = sum(g.size for g in groups.groups)
    g_inputs = graph_inputs(state.gm, inputs)
    before = ModelStats(count_params(model), meta_stats(state.gm, g_inputs).macs)
    try:
        after = meta_stats(state.module, g_inputs)
    except InputError as exc:  # the model ran on these inputs: the pruned one must too
        raise RewriteError(_stale_shape_message(state.module, g_inputs, exc)) from exc
    return PruneReport(before=before, after=after,
                       channels_before=channels, channels_after=channels - plan.n_removed,
                       groups_pruned=len(plan.removed_per_group), timings=state.timings)


def _stale_shape_message(module: torch.fx.GraphModule, inputs: tuple, exc: Exception) -> str:
    """Which node of a pruned model fails on inputs the model itself accepted, and in
    which module of the user's model it sits."""
    from .capture import MetaProp as _MetaProp, NodeFailure as _NodeFailure

    where, failure = "", exc.__cause__ or exc
    try:
        with torch.no_grad():
            _MetaProp(module).run(*inputs)
    except _NodeFailure as node_failure:
        failure = node_failure.exc
        stack = node_failure.node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()), None) if stack else None
        where = f" at node {node_failure.node.format_node()}"
        if owner is not None:
            where += f" (in module '{owner[0]}'); keep that module with ignore=['{owner[0]}']"
    except Exception:
        pass
    return (f"the pruned model does not run on the example inputs the model accepted{where}: "
            f"{type(failure).__name__}: {failure}. A size there did not follow the removed "
            f"channels: this is a bug in fxprune's analysis, please report it with the model")


__all__ = ["AnalysisPass", "Capture", "PruneResult", "analyze", "prune"]
