"""score-flap: FLAP's fluctuation; see :mod:`fxprune.activation_scores`.

A channel scores ``sample_var(x_j) * ||W[:, j]||^2`` summed over its consumers: the output
energy of its variation, which bias compensation cannot restore (An et al., "Fluctuation-based
Adaptive Structured Pruning for Large Language Models", 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.activation_scores import ActivationScorePass
from fxprune.passes_base import register_pass


@register_pass
@dataclass(frozen=True)
class ScoreFlap(ActivationScorePass):
    """FLAP's fluctuation: input variance times the squared consumer column norm."""

    name = "score-flap"
    criterion = "fluctuation"
