"""score-random: seeded random importance, the baseline every criterion must beat.

Each member of a group draws one uniform value in [0, 1) per channel class from a
``torch.Generator`` seeded with ``seed`` (members in alignment order), and the
values are reduced over the group like any other criterion's, so ``reduction``
and ``normalizer`` behave as they do elsewhere. The same graph and seed give the
same scores; the user's global random state is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.channels import ChannelGroups
from fxprune.errors import ConfigError
from fxprune.passes_base import AnalysisPass, PruneState, register_pass
from fxprune.scoring import WEIGHT_ROLES, ChannelScores, check_options, group_scores, member_classes


def random_scores(groups: ChannelGroups, *, seed: int = 0, reduction: str = "mean",
                  normalizer: str = "none") -> ChannelScores:
    """Seeded uniform random importance of every channel class.

    Examples
    --------
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 1, 1))
    >>> g = fxprune.analyze(m, torch.randn(1, 1, 4, 4))
    >>> c = list(g.prunable[0].classes)
    >>> a, b, other = (random_scores(g, seed=s).values[c] for s in (1, 1, 2))
    >>> bool(torch.equal(a, b)), bool(torch.equal(a, other))
    (True, False)
    """
    check_options(reduction, normalizer)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"random seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for i, a in enumerate(groups.alignments):
        if a.dim is not None and a.role in WEIGHT_ROLES:
            c = torch.unique(member_classes(groups, i))
            entries.append((i, c, torch.rand(c.numel(), generator=gen, dtype=torch.float64)))
    return group_scores(groups, entries, f"random-{seed}", reduction=reduction, normalizer=normalizer)


@register_pass
@dataclass(frozen=True)
class ScoreRandom(AnalysisPass):
    """Seeded random importance (a baseline)."""

    name = "score-random"
    requires = ("groups",)
    produces = ("scores",)
    seed: int = 0
    reduction: str = "mean"
    normalizer: str = "none"

    def run(self, state: PruneState) -> PruneState:
        return state.replace(scores=random_scores(state.groups, seed=self.seed, reduction=self.reduction,
                                                  normalizer=self.normalizer))
