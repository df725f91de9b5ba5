"""Model size and cost measurement, and the report a pruning run returns.

:func:`measure` counts unique parameter elements and multiply-accumulates
(MACs) of one forward pass; MACs come from
:class:`torch.utils.flop_counter.FlopCounterMode` as ``flops // 2``, so they
cover the matrix and convolution ops (``mm``, ``addmm``, ``bmm``,
``convolution``, attention kernels) and leave out bias adds, normalization and
activations, which is the convention of the pruning literature (DepGraph,
Torch-Pruning, thop).

:class:`PruneReport` holds the before/after numbers of one pruning run and
renders them as a fixed-width table.

Examples
--------
>>> import torch
>>> net = torch.nn.Linear(4, 3)
>>> measure(net, torch.zeros(2, 4))
ModelStats(params=15, macs=24)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fxprune._util import as_tuple
from fxprune.errors import ConfigError, InputError

__all__ = ["ModelStats", "PruneReport", "measure", "human"]


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model on given example inputs.

    Parameters
    ----------
    params : int
        Number of unique parameter elements (tied parameters count once).
    macs : int
        Multiply-accumulates of one forward pass on the example inputs.
    """

    params: int
    macs: int

    def __post_init__(self) -> None:
        for name in ("params", "macs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"ModelStats.{name} must be a non-negative int, got {value!r}"
                )


def count_params(module: torch.nn.Module) -> int:
    """Return the number of unique parameter elements of `module`.

    A parameter shared by several submodules counts once.

    Examples
    --------
    >>> count_params(torch.nn.Conv2d(3, 8, 3, bias=False))
    216
    """
    return sum(p.numel() for p in module.parameters())


def measure(module: torch.nn.Module, example_inputs: Any) -> ModelStats:
    """Count parameters and MACs of `module` on `example_inputs`.

    The forward pass runs under :func:`torch.no_grad` with every submodule in
    eval mode; each submodule's ``training`` flag is restored afterwards, so
    the caller's module is left as it was (BatchNorm running statistics are
    not updated either).

    Parameters
    ----------
    module : torch.nn.Module
        The model to measure.
    example_inputs : torch.Tensor or tuple
        One tensor or a tuple of positional inputs.

    Returns
    -------
    ModelStats

    Raises
    ------
    InputError
        If the forward pass fails on `example_inputs`.

    Examples
    --------
    >>> conv = torch.nn.Conv2d(3, 8, kernel_size=1, bias=False)
    >>> measure(conv, torch.zeros(1, 3, 4, 4)).macs  # 8*4*4 outputs x 3 inputs
    384
    """
    inputs = as_tuple(example_inputs)
    flags = [(m, m.training) for m in module.modules()]
    counter = FlopCounterMode(display=False)
    try:
        module.eval()
        with torch.no_grad(), counter:
            module(*inputs)
    except Exception as exc:
        raise InputError(
            f"running {type(module).__name__} on the example inputs failed "
            f"({type(exc).__name__}: {exc}); pass inputs the model accepts"
        ) from exc
    finally:
        for m, training in flags:
            m.training = training
    return ModelStats(params=count_params(module), macs=counter.get_total_flops() // 2)


_UNITS = ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K"))


def human(n: float) -> str:
    """Format a count with a metric suffix and three significant digits.

    Examples
    --------
    >>> [human(n) for n in (0, 999, 855770, 23_500_000, 4_090_000_000)]
    ['0', '999', '856K', '23.5M', '4.09G']
    """
    for scale, suffix in _UNITS:
        if abs(n) >= scale:
            value = n / scale
            if abs(value) >= 100:
                return f"{value:.0f}{suffix}"
            if abs(value) >= 10:
                return f"{value:.1f}{suffix}"
            return f"{value:.2f}{suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _ratio(after: float, before: float) -> float:
    if before == 0:
        return 1.0 if after == 0 else math.inf
    return after / before


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class PruneReport:
    """Before/after size, cost and timings of one pruning run.

    Parameters
    ----------
    before, after : ModelStats
        Measurements of the original and the pruned model.
    channels_before, channels_after : int
        Prunable channels (labels) before and after.
    groups_pruned : int
        Number of channel groups that lost at least one channel.
    timings : tuple of (str, float)
        ``(pass name, seconds)`` for every pass that ran, in order.

    Examples
    --------
    >>> r = PruneReport(ModelStats(100, 1000), ModelStats(50, 250), 32, 16, 3,
    ...                 (("rewrite", 0.5),))
    >>> r.params_ratio, r.macs_ratio, r.speedup
    (0.5, 0.25, 4.0)
    """

    before: ModelStats
    after: ModelStats
    channels_before: int
    channels_after: int
    groups_pruned: int
    timings: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "timings", tuple((str(n), float(s)) for n, s in self.timings)
        )

    @property
    def params_ratio(self) -> float:
        """Parameters after / before (the fraction kept)."""
        return _ratio(self.after.params, self.before.params)

    @property
    def macs_ratio(self) -> float:
        """MACs after / before (the fraction kept)."""
        return _ratio(self.after.macs, self.before.macs)

    @property
    def channels_ratio(self) -> float:
        """Channels after / before (the fraction kept)."""
        return _ratio(self.channels_after, self.channels_before)

    @property
    def speedup(self) -> float:
        """MACs before / after, the speed-up figure of the pruning literature."""
        return _ratio(self.before.macs, self.after.macs)

    @property
    def total_seconds(self) -> float:
        """Sum of all pass timings."""
        return sum(s for _, s in self.timings)

    def __str__(self) -> str:
        rows = [
            ("params", human(self.before.params), human(self.after.params),
             self.params_ratio),
            ("MACs", human(self.before.macs), human(self.after.macs), self.macs_ratio),
            ("channels", str(self.channels_before), str(self.channels_after),
             self.channels_ratio),
        ]
        lines = [f"{'':<10}{'before':>10}{'after':>10}{'ratio':>9}"]
        for name, before, after, ratio in rows:
            lines.append(f"{name:<10}{before:>10}{after:>10}{ratio:>9.3f}")
        lines.append(f"groups pruned: {self.groups_pruned}    "
                     f"speed-up (MACs): {self.speedup:.2f}x")
        if self.timings:
            width = max(20, *(len(n) for n, _ in self.timings))
            lines.append("")
            lines.append(f"{'pass':<{width}}{'seconds':>10}")
            for name, seconds in self.timings:
                lines.append(f"{name:<{width}}{seconds:>10.3f}")
            lines.append(f"{'total':<{width}}{self.total_seconds:>10.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (undefined ratios become ``None``).

        Examples
        --------
        >>> r = PruneReport(ModelStats(4, 8), ModelStats(2, 4), 4, 2, 1)
        >>> r.to_dict()["after"]
        {'params': 2, 'macs': 4}
        """
        return {
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "groups_pruned": self.groups_pruned,
            "timings": [{"pass": n, "seconds": s} for n, s in self.timings],
            "params_ratio": _finite_or_none(self.params_ratio),
            "macs_ratio": _finite_or_none(self.macs_ratio),
            "channels_ratio": _finite_or_none(self.channels_ratio),
            "speedup": _finite_or_none(self.speedup),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneReport:
        """Rebuild a report from :meth:`to_dict` output (derived ratios are ignored).

        Raises
        ------
        ConfigError
            If a required key is missing or malformed.
        """
        try:
            return cls(
                before=ModelStats(**data["before"]),
                after=ModelStats(**data["after"]),
                channels_before=int(data["channels_before"]),
                channels_after=int(data["channels_after"]),
                groups_pruned=int(data["groups_pruned"]),
                timings=tuple((t["pass"], t["seconds"]) for t in data.get("timings", ())),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"not a PruneReport dict ({type(exc).__name__}: {exc}); "
                "pass the output of PruneReport.to_dict()"
            ) from exc
