"""score-activation: activation magnitude (Minitron); see :mod:`fxprune.activation_scores`.

A channel scores the RMS over samples of its mean |activation| where its consumers read it
(Minitron, Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", 2024), summed over its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.activation_scores import ActivationScorePass
from fxprune.passes_base import register_pass


@register_pass
@dataclass(frozen=True)
class ScoreActivation(ActivationScorePass):
    """Minitron's activation magnitude at the channel's consumers."""

    name = "score-activation"
    criterion = "activation"
