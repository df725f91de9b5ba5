"""The passes of fxprune, one per file; importing this package registers them."""

from . import (channel_deps, rewrite, score_bn_scale, score_fpgm, score_hessian, score_lamp,  # noqa: F401
               score_magnitude, score_random, score_taylor, select, select_budget)
