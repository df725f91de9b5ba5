"""Pass machinery: passes are frozen dataclasses with a kebab-case ``name``; they
compose in a :class:`Pipeline` that names and times each step, and a pipeline
can be written as text::

    channel-deps,score-magnitude{p=2},select{ratio=0.5},rewrite
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gc
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .errors import PipelineError

if TYPE_CHECKING:
    from .channels import ChannelGroups
    from .plan import PrunePlan
    from .scoring import ChannelScores
    from .statistics import ActivationStats


@dataclass(frozen=True)
class PruneState:
    """What flows between passes. Analyses add results; transforms add a module."""

    model: torch.nn.Module | None = None
    example_inputs: tuple = ()
    gm: torch.fx.GraphModule | None = None
    groups: ChannelGroups | None = None
    scores: ChannelScores | None = None
    plan: PrunePlan | None = None
    stats: ActivationStats | None = None  # calibration statistics, shared by the passes that use them
    module: torch.fx.GraphModule | None = None
    frontend: str = "fx"
    timings: tuple[tuple[str, float], ...] = ()

    def replace(self, **changes: Any) -> "PruneState":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Pass:
    """A pass: options are dataclass fields, the work is ``run``. ``requires`` names the
    :class:`PruneState` fields it reads, ``produces`` those it sets: a :class:`Pipeline`
    checks that every field a pass requires is set by the time it runs."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()

    def run(self, state: PruneState) -> PruneState:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        opts = ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                        if f.repr and getattr(self, f.name) != _default(f))  # not data, loss_fn
        return f"{self.name}{{{opts}}}" if opts else self.name


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


class AnalysisPass(Pass):
    """Computes a result; never touches the graph."""


class TransformPass(Pass):
    """Returns a new GraphModule; never mutates its input."""


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _PASSES:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    _PASSES[cls.name] = cls
    return cls


def known_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(_PASSES)


def _load_builtin_passes() -> None:
    import fxprune.passes  # noqa: F401  (registers the built-in passes)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while the passes run: they allocate many
    long-lived objects (graph nodes, label tensors), and every full collection walks all
    of them (about a third of a 10,000-node prune). Reference counting still frees
    everything else; the collector resumes, as it was, when the pipeline ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes, run with per-pass wall-clock timing."""

    passes: tuple[Pass, ...] = field(default_factory=tuple)

    def check(self, state: PruneState) -> None:
        """Raise :class:`PipelineError` when a pass requires a state field that neither
        ``state`` nor a pass before it provides."""
        have = {f.name for f in dataclasses.fields(state) if getattr(state, f.name) not in (None, ())}
        for p in self.passes:
            missing = [r for r in getattr(p, "requires", ()) if r not in have]
            if missing:
                _load_builtin_passes()
                makers = sorted(q.name for q in _PASSES.values() if set(missing) & set(q.produces))
                hint = f"; put one of {', '.join(makers)} before it" if makers else ""
                raise PipelineError(f"pass {p.name!r} needs {', '.join(missing)}, which no pass before it "
                                    f"produces{hint} (pipeline: {self})")
            have.update(getattr(p, "produces", ()))

    def run(self, state: PruneState, *, progress: Any = None) -> PruneState:
        self.check(state)
        with _gc_paused():
            for p in self.passes:
                start = time.perf_counter()
                with torch.no_grad():
                    state = p.run(state)
                state = state.replace(timings=state.timings + ((p.name, time.perf_counter() - start),))
                if progress is not None:
                    progress(p.name)
        return state

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def make_pass(name: str, options: dict[str, Any]) -> Pass:
    """Build the pass ``name`` with ``options``; unknown names and options list the known ones."""
    _load_builtin_passes()
    cls = _PASSES.get(name)
    if cls is None:
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(known_passes())}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise PipelineError(f"pass {name!r} has no option(s) {', '.join(unknown)}; "
                            f"its options are: {', '.join(sorted(fields)) or '(none)'}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"bad options for pass {name!r}: {exc}") from exc


def parse_pipeline(text: str) -> Pipeline:
    """Parse ``"channel-deps,score-magnitude{p=2},select{ratio=0.5},rewrite"``.

    Examples
    --------
    >>> str(parse_pipeline("channel-deps, select{ratio=0.25}"))
    'channel-deps,select{ratio=0.25}'
    """
    text = text.strip()
    pos, out = 0, []
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline at {text[pos:]!r}; expected "
                                f"name or name{{key=value,...}} items separated by commas")
        opts: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise PipelineError(f"option {item!r} of pass {m.group(1)!r} must be key=value")
            opts[key.strip().replace("-", "_")] = _parse_value(value.strip())
        out.append(make_pass(m.group(1), opts))
        pos = m.end()
    return Pipeline(tuple(out))
