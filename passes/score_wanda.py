"""score-wanda: structured Wanda (Wanda-sp); see :mod:`fxprune.activation_scores`.

A channel scores ``mean_rows |W[:, j]| * rms(x_j)`` summed over its consumers: the weights
that read it, weighted by how large it is on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.activation_scores import ActivationScorePass
from fxprune.passes_base import register_pass


@register_pass
@dataclass(frozen=True)
class ScoreWanda(ActivationScorePass):
    """Structured Wanda: consumer weight magnitude times the input channel's RMS."""

    name = "score-wanda"
    criterion = "wanda"
