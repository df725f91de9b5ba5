"""State restore: a user's model is never modified by a capture.

A forward run during capture (symbolic tracing or torch.export) may set attributes,
fill caches, and assign or register parameters, buffers and submodules. Everything
here records the model's state before such a run and puts it back after it, so that
the model holds exactly the objects it held before (no Proxy, no fake tensor, no
assigned data). A captured graph that writes a buffer gets its own copy of it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from typing import Any

import torch
import torch.fx
from torch import nn


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_CONTAINERS = (dict, list, set, collections.OrderedDict)
REGISTRIES = ("_parameters", "_buffers", "_modules")
ABSENT = object()  # an entry a module does not have


class Registered:
    """The parameters, buffers and submodules of every module of a model, as a capture
    found them, and the data each parameter and buffer holds (references and aliases: no
    tensor is copied)."""

    def __init__(self, model: nn.Module):
        self.saved = [(name, m, {k: (m.__dict__[k], dict(m.__dict__[k])) for k in REGISTRIES},
                       (m._non_persistent_buffers_set, set(m._non_persistent_buffers_set)))
                      for name, m in model.named_modules()]
        tensors = {id(t): t for m in model.modules() for registry in ("_parameters", "_buffers")
                   for t in m.__dict__[registry].values() if isinstance(t, torch.Tensor)}
        self.data = [(t, t.data) for t in tensors.values()]

    def changes(self) -> list[tuple[str, str, Any, Any]]:
        """(qualified name, registry, value before, value now) of each entry a forward
        assigned since, added (before: ``ABSENT``) or removed (now: ``ABSENT``)."""
        out = []
        for prefix, m, registries, _ in self.saved:
            for kind, (_, before) in registries.items():
                now = m.__dict__[kind]
                for k in dict.fromkeys([*before, *now]):
                    old, new = before.get(k, ABSENT), now.get(k, ABSENT)
                    if old is not new:
                        out.append((f"{prefix}.{k}" if prefix else k, kind, old, new))
        return out

    def restore(self) -> None:
        """Put every saved entry back, in the dicts the modules had."""
        for _, m, registries, (nonpersistent, names) in self.saved:
            for kind, (box, before) in registries.items():
                box.clear()
                box.update(before)
                m.__dict__[kind] = box
            nonpersistent.clear()
            nonpersistent.update(names)
            m.__dict__["_non_persistent_buffers_set"] = nonpersistent
        for t, data in self.data:  # ``t.data = ...`` in an eager forward
            if not _same_data(t.data, data):
                t.data = data


def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same data the same way (True where that cannot be
    told: a layout without strides)."""
    if (a.dtype, a.shape, a.device, a.layout) != (b.dtype, b.shape, b.device, b.layout):
        return False
    try:
        return a.stride() == b.stride() and a.storage_offset() == b.storage_offset() and a.data_ptr() == b.data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other layouts
        return True


@contextlib.contextmanager
def state_restored(model: nn.Module):
    """Undo what a forward run during capture leaves on the model's modules: attributes
    it sets, caches it fills (timm's LeViT keeps its attention biases in a dict keyed by
    device: a trace left a Proxy there, and the user's model no longer pickled), the
    parameters, buffers and submodules it assigns or registers (a rotary cache refreshed in
    forward, ``self.table = self.table * 1.0``: they would hold a Proxy or a fake tensor),
    and the data it assigns them (``self.w.data = ...``, run eagerly). Yields the
    :class:`Registered` state, whose ``restore()`` puts those back before the context ends."""
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
        saved.append((m, attrs, {k: copy.copy(v) for k, v in attrs.items() if type(v) in _CONTAINERS}))
    registered = Registered(model)
    try:
        yield registered
    finally:
        registered.restore()
        for m, attrs, contents in saved:
            d = m.__dict__
            for k in [k for k in d if k not in _MODULE_INTERNALS and k not in attrs]:
                del d[k]  # set during the capture
            d.update(attrs)
            for k, old in contents.items():  # refilled in place: the container may be shared
                box = attrs[k]
                box.clear()
                if isinstance(box, list):
                    box.extend(old)
                else:
                    box.update(old)

def resolve(root: nn.Module, target: str) -> Any:
    """The object ``target`` names under ``root`` now (``ABSENT`` if none), read from the
    modules' own dicts: the symbolic trace patches ``nn.Module.__getattr__``."""
    obj: Any = root
    for atom in target.split("."):
        if isinstance(obj, nn.Module):
            d = obj.__dict__
            if atom in d:
                obj = d[atom]
                continue
            for registry in REGISTRIES:
                if atom in d[registry]:
                    obj = d[registry][atom]
                    break
            else:
                return ABSENT
        else:
            obj = getattr(obj, atom, ABSENT)
            if obj is ABSENT:
                return ABSENT
    return obj


def buffer_writes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The in-place copies into an attribute of ``gm`` (a forward's buffer assignment as
    the symbolic trace and torch.export keep it): (the copy, the get_attr node it writes)."""
    out = []
    for n in gm.graph.nodes:
        if (n.op == "call_method" and n.target == "copy_") or \
                (n.op == "call_function" and n.target is torch.ops.aten.copy_.default):
            dst = n.args[0] if n.args else None
            if isinstance(dst, torch.fx.Node) and dst.op == "get_attr":
                out.append((n, dst))
    return out


def own_written_buffers(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` its own copy of each buffer its graph writes: a GraphModule shares the
    model's tensors (and its called submodules), and running the captured graph (as the
    oracle does) must not write into the user's model."""
    user = {id(m) for m in model.modules()}
    for _, node in buffer_writes(gm):
        *path, name = node.target.split(".")
        owner: nn.Module = gm
        for atom in path:
            child = owner._modules.get(atom)
            if child is None:
                break
            if id(child) in user:  # the user's module itself: a shallow copy holds the copy
                child = copy.copy(child)
                for registry in (*REGISTRIES, "_non_persistent_buffers_set"):
                    child.__dict__[registry] = copy.copy(child.__dict__[registry])
                owner._modules[atom] = child
            owner = child
        else:
            if owner._buffers.get(name) is not None:
                owner._buffers[name] = owner._buffers[name].clone()
