"""The passes of fxprune, one per file; importing this package registers them."""

from . import channel_deps, rewrite, score_magnitude, select  # noqa: F401
