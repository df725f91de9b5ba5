"""Python-source helpers for saving models: literals and the module template.

:func:`literal` writes a plain Python value as source; :func:`same` is the
exact equality the save path checks rebuilt modules with; :func:`importable`
finds the import path of a class or function (never one inside fxprune);
:data:`TEMPLATE` is the text of a saved folder's ``module.py``, which must
import nothing but torch and the modules that define the model's classes.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch

from fxprune.errors import SaveError


__all__ = ["SaveError", "Unsupported", "literal", "same", "importable", "by_attributes",
           "TEMPLATE"]




FORBIDDEN_PACKAGES = ("fxprune", "__main__")


class Unsupported(Exception):
    """A value has no literal source form."""


def literal(value, ref=None) -> str:
    """Return Python source that evaluates to `value` (with ``torch`` in scope).

    `ref`, if given, writes a function or class as source (an import path).

    Raises
    ------
    Unsupported
        If `value` (or an element of it) is not a plain Python value, a
        ``torch.dtype``, ``torch.device``, ``torch.Size``, or (with `ref`) a
        function or class.

    Examples
    --------
    >>> literal({"k": (3, 3), "eps": 1e-05, "p": float("inf"), "d": torch.float16})
    "{'k': (3, 3), 'eps': 1e-05, 'p': float('inf'), 'd': torch.float16}"
    >>> literal((1,))
    '(1,)'
    """
    if value is None or type(value) in (bool, int, str):
        return repr(value)
    if type(value) is float:
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, torch.Size):
        return f"torch.Size({literal(list(value))})"
    if type(value) is tuple:
        inner = ", ".join(literal(v, ref) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if type(value) is list:
        return "[" + ", ".join(literal(v, ref) for v in value) + "]"
    if type(value) is dict:
        items = (f"{literal(k, ref)}: {literal(v, ref)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if type(value) in (set, frozenset):
        items = sorted((literal(v, ref) for v in value))
        body = "{" + ", ".join(items) + "}" if items else "()"
        return f"{type(value).__name__}({body})"
    if ref is not None and (inspect.isfunction(value) or inspect.isbuiltin(value)
                            or isinstance(value, type)):
        return ref(value)
    raise Unsupported(type(value).__name__)


def same(a, b) -> bool:
    """Exact structural equality (types included; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype
    return a == b


def importable(obj, what: str) -> tuple[str, str]:
    """Return ``(module, qualname)`` under which `obj` imports; raise SaveError if none."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or "<" in qual:
        raise SaveError(f"{what} {obj!r} is defined inside a function and cannot be "
                        "imported when the saved folder loads; define it at module level")
    if mod.split(".")[0] in FORBIDDEN_PACKAGES:
        raise SaveError(f"{what} {mod}.{qual} lives in {mod!r}, which a saved folder "
                        "cannot import; use a class or function from an importable "
                        "module other than fxprune")
    try:
        target = importlib.import_module(mod)
        for part in qual.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        target = None
    if target is not obj:
        raise SaveError(f"{what} {obj!r} is not reachable as {mod}.{qual}; "
                        "define it at module level of an importable module")
    return mod, qual


def by_attributes(mod: str, qual: str):
    """What ``import mod`` followed by the expression ``mod.qual`` evaluates to."""
    importlib.import_module(mod)
    parts = mod.split(".") + qual.split(".")
    target = importlib.import_module(parts[0])
    try:
        for part in parts[1:]:
            target = getattr(target, part)
    except AttributeError:
        return None
    return target


TEMPLATE = '''"""{cls}: a model saved by fxprune (torch {torch_version}).

This folder loads with plain PyTorch; fxprune is not needed::

    import sys
    sys.path.insert(0, "<the folder that holds this folder>")
    import <this folder's name> as saved
    model = saved.load()  # an ordinary torch.nn.Module

or, without a package import::

    import importlib.util
    spec = importlib.util.spec_from_file_location("saved_model", "<folder>/module.py")
    saved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saved)
    model = saved.load()
"""

import os

{imports}
{bindings}
_HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(_HERE, "weights.pt")


def _put(root, path, module):
    parent, _, name = path.rpartition(".")
    root.get_submodule(parent).add_module(name, module)


def _blank(cls, attrs, params, buffers):
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.__dict__.update(attrs)
    for name, spec in params.items():
        value = None if spec is None else torch.nn.Parameter(
            torch.empty(spec[0], dtype=spec[1]), requires_grad=spec[2])
        module.register_parameter(name, value)
    for name, spec in buffers.items():
        value = None if spec is None else torch.empty(spec[0], dtype=spec[1])
        module.register_buffer(name, value, persistent=spec is None or spec[2])
    return module


def _tie(root, path, source):
    src_parent, _, src_name = source.rpartition(".")
    src = root.get_submodule(src_parent)
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent)
    if src_name in src._parameters:
        owner._parameters[name] = src._parameters[src_name]
    else:
        owner._buffers[name] = src._buffers[src_name]


def _assign(root, path, tensor):
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent)
    if name in owner._buffers:
        owner._buffers[name] = tensor
    else:
        setattr(owner, name, tensor)


class {cls}(torch.nn.Module):
    def __init__(self):
        super().__init__()
{init}

    def _tie_weights(self):
{ties}

{forward}


def load(device="cpu", tensors=None):
    """Build {cls}, load weights.pt (beside this file) into it and move it to `device`.

    `tensors` may be the already loaded contents of weights.pt.
    """
    if tensors is None:
        tensors = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # build without spending time on random init
        model = {cls}()
    model = model.to_empty(device=device)
    model._tie_weights()
    model.load_state_dict(tensors["state_dict"], strict=True)
    for path, tensor in tensors["extra"].items():
        _assign(model, path, tensor.to(device))
    return model
'''
