"""The passes of fxprune, one per file. Importing this package imports every module in
it, which registers its passes: a new pass is a new file here, nothing else."""

import importlib as _importlib
import pkgutil as _pkgutil

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_info.name}")
