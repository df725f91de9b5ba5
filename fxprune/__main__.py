"""``python -m fxprune``: the command line (see :mod:`fxprune.cli`)."""

from fxprune.cli import main

raise SystemExit(main())
