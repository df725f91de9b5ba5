"""Emit a GraphModule as a standalone Python module that needs only torch.

:func:`emit_module` turns a :class:`torch.fx.GraphModule` into the source of
one Python file (a ``torch.nn.Module`` subclass whose ``forward`` is the
graph's generated code, plus a ``load()`` function) and the tensors that file
loads. Submodules of ``torch.*`` classes are written as readable constructor
calls when calling that constructor reproduces the module's state exactly
(checked here, at save time); every other module is rebuilt attribute by
attribute from literals, which is exact for any module whose attributes are
plain Python values. The generated file imports torch and the modules that
define the classes and functions it uses, never fxprune.
"""

from __future__ import annotations

import inspect
import keyword
import re
import types
from dataclasses import dataclass, field

import torch

from fxprune.errors import SaveError
from fxprune._pysource import (FORBIDDEN_PACKAGES, TEMPLATE, Unsupported,
                               by_attributes, importable, literal, same)

__all__ = ["SaveError", "Emitted", "emit_module"]


# Attributes every nn.Module has; the rest of ``vars(module)`` is its own state.
_INTERNALS = frozenset(vars(torch.nn.Module())) | {"training"}
# state a module derives from its own parameters whenever they move: a recurrent layer's
# flat weight list (RNNBase._apply rebuilds it on load's to_empty)
_DERIVED = frozenset({"_flat_weights", "_flat_weight_refs"})
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
RESERVED = frozenset({"os", "torch", "load", "WEIGHTS", "_HERE", "_put",
                      "_blank", "_tie", "_assign", "_tie_weights"})


def _spec(module: torch.nn.Module) -> tuple:
    """Everything about `module` itself that a rebuild must reproduce."""
    tensors = lambda d: {k: None if v is None else (v.shape, v.dtype, v.requires_grad)
                         for k, v in d.items()}
    state = {k: v for k, v in vars(module).items() if k not in _INTERNALS}
    return (type(module), state, tensors(module._parameters), tensors(module._buffers),
            set(module._non_persistent_buffers_set))


@dataclass
class Emitted:
    """The generated source and the tensors ``weights.pt`` must hold."""

    source: str
    class_name: str
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class _Writer:
    """Accumulates imports, global bindings and ``__init__`` lines."""

    def __init__(self) -> None:
        self.imports: set[str] = {"torch"}
        self.bindings: list[str] = []
        self.init: list[str] = []
        self.ties: list[str] = []
        self.extra: dict[str, torch.Tensor] = {}
        self.aliases: dict[tuple[str, str], str] = {}

    def ref(self, obj, what: str) -> str:
        """Source text that names class or function `obj`."""
        mod, qual = importable(obj, what)
        if mod.startswith("torch.nn") and getattr(torch.nn, qual, None) is obj:
            return f"torch.nn.{qual}"
        if mod == "builtins":
            return qual
        if by_attributes(mod, qual) is obj:
            self.imports.add(mod)
            return f"{mod}.{qual}"
        # a package attribute shadows the submodule (torchvision.ops.stochastic_depth
        # is a function): import the name from its module instead
        head, _, rest = qual.partition(".")
        alias = self.aliases.get((mod, head))
        if alias is None:
            alias = f"_imp_{head}" + (f"_{len(self.aliases)}" if self.aliases else "")
            self.aliases[(mod, head)] = alias
        return f"{alias}.{rest}" if rest else alias

    def src(self, obj) -> str:
        """Source text for a function or class found in a module attribute."""
        return self.ref(obj, "attribute value")

    def constructor(self, module: torch.nn.Module) -> str | None:
        """A checked ``cls(args)`` call for a torch class, or None."""
        cls = type(module)
        if not cls.__module__.startswith("torch.") or cls.__module__.startswith("torch.fx"):
            return None
        try:
            params = list(inspect.signature(cls).parameters.values())
        except (TypeError, ValueError):
            return None
        for simplify in (True, False):
            args = []
            try:
                for p in params:
                    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
                        continue
                    own = vars(module).get(p.name)
                    if p.name in module._parameters and isinstance(p.default, bool):
                        value = module._parameters[p.name] is not None
                    elif p.name in vars(module) and not isinstance(own, torch.Tensor):
                        value = own
                    elif p.default is p.empty:
                        return None
                    else:
                        continue
                    if p.default is p.empty:
                        args.append((None if p.kind != p.KEYWORD_ONLY else p.name, value))
                    elif simplify and isinstance(value, tuple) and value and all(
                            same(v, p.default) for v in value):
                        continue
                    elif not same(value, p.default):
                        args.append((p.name, value))
                text = ", ".join(literal(v, self.src) if k is None else
                                 f"{k}={literal(v, self.src)}" for k, v in args)
                # on the meta device: no init time, and the caller's RNG is untouched
                with torch.random.fork_rng(devices=[]), torch.device("meta"):
                    candidate = cls(*[v for k, v in args if k is None],
                                    **{k: v for k, v in args if k is not None})
            except Exception:  # the constructor rejected our guess: rebuild generically
                continue
            if _same_spec(candidate, module) and set(candidate._modules) <= set(module._modules):
                return f"{self.ref(cls, 'module class')}({text})"
        return None

    def generic(self, module: torch.nn.Module, path: str) -> str:
        """A ``_blank(cls, attrs, params, buffers)`` call that rebuilds `module` exactly."""
        attrs = {}
        for key, value in vars(module).items():
            if key in _INTERNALS or key in _DERIVED and hasattr(module, "_init_flat_weights"):
                continue
            if isinstance(value, torch.Tensor):  # restored by load() from the extras
                attrs[key] = None
                continue
            try:
                literal(value, self.src)
            except Unsupported:
                raise SaveError(f"module {path!r} ({type(module).__name__}) has attribute "
                                f"{key!r} of type {type(value).__name__}, which cannot be "
                                "written as source; only plain Python values, tensors and "
                                "importable functions or classes can be saved") from None
            attrs[key] = value
        params = {k: None if v is None else (tuple(v.shape), v.dtype, v.requires_grad)
                  for k, v in module._parameters.items()}
        buffers = {k: None if v is None else (tuple(v.shape), v.dtype,
                                              k not in module._non_persistent_buffers_set)
                   for k, v in module._buffers.items()}
        cls = self.ref(type(module), "module class")
        return (f"_blank({cls}, {literal(attrs, self.src)}, {literal(params)}, "
                f"{literal(buffers)})")


def _same_spec(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = _spec(a), _spec(b)
    return (sa[0] is sb[0] and same(sa[1], sb[1]) and sa[2] == sb[2] and sa[3] == sb[3]
            and sa[4] == sb[4])


def _check_module(module: torch.nn.Module, path: str) -> None:
    if any(getattr(module, h, None) for h in _HOOKS):
        raise SaveError(f"module {path or '<root>'!r} has forward/backward hooks, which a "
                        "saved folder cannot hold; remove them before saving")
    if isinstance(module, torch.fx.GraphModule) and path:
        raise SaveError(f"submodule {path!r} is itself a GraphModule; nested GraphModules "
                        "are not supported: inline it (e.g. re-trace the parent) first")


def _walk(w: _Writer, parent: torch.nn.Module, prefix: str, seen: dict) -> None:
    for name, child in parent._modules.items():
        path = prefix + name
        if child is None:
            w.init.append(f"_put(self, {path!r}, None)")
            continue
        if id(child) in seen:
            w.init.append(f"_put(self, {path!r}, self.get_submodule({seen[id(child)]!r}))")
            continue
        seen[id(child)] = path
        if _weight_normed(w, child, path, seen):
            continue
        _check_module(child, path)
        expr = w.constructor(child) or w.generic(child, path)
        w.init.append(f"_put(self, {path!r}, {expr})")
        _record_tensors(w, child, path, seen)
        _walk(w, child, path + ".", seen)


def _weight_normed(w: _Writer, module: torch.nn.Module, path: str, seen: dict) -> bool:
    """Write a weight-normalized layer as its plain layer wrapped by the torch call that
    made it (``parametrizations.weight_norm(Conv1d(...), dim=0)``), so the saved file
    rebuilds the same parameters (g and v, which the weights then fill); False for any
    other module."""
    from torch.nn.utils import parametrizations

    from fxprune.weight_norm import weight_norm_of

    norm = weight_norm_of(module)
    if norm is None:
        return False
    base = type(module).__bases__[0] if not norm.hooked else type(module)
    plain = base.__new__(base)
    direction = module.get_parameter(norm.v)  # the plain layer's weight has its shape
    own = {k: t for k, t in module._parameters.items() if k not in ("weight_g", "weight_v")}
    plain.__dict__.update({k: a for k, a in vars(module).items() if k != "weight"},
                          _modules={}, _forward_pre_hooks={}, _parameters={"weight": direction, **own})
    _check_module(plain, path)
    expr = w.constructor(plain) or w.generic(plain, path)
    wrap = parametrizations.weight_norm if not norm.hooked else torch.nn.utils.weight_norm
    w.init.append(f"_put(self, {path!r}, {w.ref(wrap, 'function')}({expr}, dim={norm.dim}))")
    for name, m in module.named_modules(prefix=path):
        _record_tensors(w, m, name, seen)
    if norm.hooked:  # recomputed from g and v before every forward, not loaded
        w.extra.pop(f"{path}.weight", None)
    return True


def _record_tensors(w: _Writer, module: torch.nn.Module, path: str, seen: dict) -> None:
    """Note tied tensors and the tensors a state dict leaves out (extras)."""
    prefix = path + "." if path else ""
    for kind in ("_parameters", "_buffers"):
        for name, tensor in getattr(module, kind).items():
            if tensor is None:
                continue
            if id(tensor) in seen:
                w.ties.append(f"_tie(self, {prefix + name!r}, {seen[id(tensor)]!r})")
                continue
            seen[id(tensor)] = prefix + name
            if kind == "_buffers" and name in module._non_persistent_buffers_set:
                w.extra[prefix + name] = tensor.detach()
    for key, value in vars(module).items():
        if key not in _INTERNALS and isinstance(value, torch.Tensor) and path:
            w.extra[prefix + key] = value.detach()


def _class_name(gm: torch.fx.GraphModule, taken: set[str]) -> str:
    name = type(gm).__name__
    bad = not name.isidentifier() or keyword.iskeyword(name) or name in taken
    return "PrunedModel" if bad or name in ("GraphModule", "GraphModuleImpl") else name


def _bind_globals(w: _Writer, globals_: dict, src: str) -> None:
    """Write an import or assignment for every global the forward code uses."""
    for name, obj in globals_.items():
        if not re.search(rf"\b{re.escape(name)}\b", src):
            continue
        if isinstance(obj, types.ModuleType):
            if obj.__name__.split(".")[0] in FORBIDDEN_PACKAGES:
                raise SaveError(f"the forward code uses module {obj.__name__!r}, which a "
                                "saved folder cannot import")
            if name == obj.__name__:
                w.imports.add(name)
            else:
                w.imports.add(f"{obj.__name__} as {name}")
            continue
        if name in RESERVED:
            raise SaveError(f"the forward code uses a global named {name!r}, which the "
                            "saved module reserves; rename that function")
        portable = getattr(obj, "__fxprune_source__", None)
        if isinstance(portable, str):  # a function of fxprune's graphs, written out in full
            w.bindings.append(portable.format(name=name))
        elif obj is type(None):
            w.bindings.append(f"{name} = type(None)")
        elif obj is None or isinstance(obj, (bool, int, float, str)):
            w.bindings.append(f"{name} = {literal(obj)}")
        else:
            text = w.ref(obj, "function or class")
            if text != name:
                w.bindings.append(f"{name} = {text}")


def _root_tensors(w: _Writer, gm: torch.fx.GraphModule) -> None:
    """Declare the root's own parameters, buffers and tensor constants."""
    for name, p in gm._parameters.items():
        rhs = "None" if p is None else (f"torch.nn.Parameter(torch.empty({literal(tuple(p.shape))}"
                                        f", dtype={p.dtype}), requires_grad={p.requires_grad})")
        w.init.append(f"self.register_parameter({name!r}, {rhs})")
    for name, b in gm._buffers.items():
        rhs = "None" if b is None else f"torch.empty({literal(tuple(b.shape))}, dtype={b.dtype})"
        persistent = name not in gm._non_persistent_buffers_set
        w.init.append(f"self.register_buffer({name!r}, {rhs}, persistent={persistent})")
        if b is not None and not persistent:
            w.extra[name] = b.detach()
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, leaf = node.target.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path)
            value = getattr(owner, leaf)
        except AttributeError:
            raise SaveError(f"{node.format_node()} reads {node.target!r}, which the module "
                            "does not have; run graph.lint() and fix the graph") from None
        if (leaf in owner._parameters or leaf in owner._buffers
                or isinstance(value, torch.nn.Module)):
            continue
        if not isinstance(value, torch.Tensor):
            raise SaveError(f"{node.format_node()} reads a {type(value).__name__}; only "
                            "tensors, parameters and submodules can be saved")
        if owner is gm and node.target not in w.extra:
            w.init.append(f"_assign(self, {node.target!r}, torch.empty("
                          f"{literal(tuple(value.shape))}, dtype={value.dtype}))")
            w.extra[node.target] = value.detach()


def _spec_types(spec) -> set[type]:
    found = {spec.type} if getattr(spec, "type", None) is not None else set()
    for child in spec.children() if hasattr(spec, "children") else spec.children_specs:
        found |= _spec_types(child)
    return found


def _pytree_specs(w: _Writer, gm: torch.fx.GraphModule) -> None:
    """An exported graph takes and returns pytrees (a Hugging Face ``ModelOutput``):
    its specs are written as serialized text and rebuilt in ``__init__``; the modules
    that define (and register) the container types are imported."""
    import torch.utils._pytree as pytree

    w.imports.add("torch.utils._pytree")
    for attr in ("_in_spec", "_out_spec"):
        spec = getattr(gm, attr, None)
        if spec is None:
            continue
        try:
            text = pytree.treespec_dumps(spec)
        except Exception as exc:
            raise SaveError(f"the graph's {attr} cannot be serialized ({exc}); register its container "
                            f"types with torch.utils._pytree and a serialized_type_name") from exc
        for t in _spec_types(spec):
            if t.__module__ not in ("builtins", "collections"):
                w.imports.add(t.__module__)
        w.init.append(f"self.{attr} = torch.utils._pytree.treespec_loads({text!r})")


def emit_module(gm: torch.fx.GraphModule) -> Emitted:
    """Generate the standalone source of `gm` and the tensors it loads.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The module to write out; it is not modified.

    Returns
    -------
    Emitted
        ``source`` (the text of ``module.py``), the generated class name, and
        the ``state_dict`` and ``extra`` tensors for ``weights.pt``.

    Raises
    ------
    SaveError
        If the module uses a class, function or attribute that cannot be
        written as importable source (the message names it and the fix).
    """
    from .capture import OrderedDictOutput as _OrderedDictOutput

    pytree_io = type(gm.graph._codegen) is torch.fx.graph._PyTreeCodeGen
    if type(gm.graph._codegen) not in (torch.fx.graph.CodeGen, _OrderedDictOutput) and not pytree_io:
        raise SaveError(f"the graph uses a custom code generator "
                        f"({type(gm.graph._codegen).__name__}), which cannot be saved; "
                        "save a graph traced with torch.fx.symbolic_trace")
    _check_module(gm, "")
    w = _Writer()
    if pytree_io:
        _pytree_specs(w, gm)
    seen: dict[int, str] = {}
    _root_tensors(w, gm)
    _record_tensors(w, gm, "", seen)
    _walk(w, gm, "", seen)
    code = gm.graph.python_code(root_module="self")
    _bind_globals(w, code.globals, code.src)
    # plain torch.nn.Module containers have no forward, so their mode is not kept
    lines = w.init + ["self._tie_weights()", f"self.train({gm.training})"]
    for path, module in gm.named_modules():
        if path and module.training != gm.training and type(module) is not torch.nn.Module:
            lines.append(f"self.get_submodule({path!r}).training = {module.training}")
    taken = ({b.split(" = ")[0] for b in w.bindings} | {i.split()[-1] for i in w.imports}
             | set(w.aliases.values()))
    cls = _class_name(gm, taken | RESERVED)
    # fx may put statements before ``def forward`` (torch.fx.wrap calls): module level
    src = code.src.strip().splitlines()
    start = next(i for i, line in enumerate(src) if line.startswith("def forward"))
    prologue = [line for line in src[:start] if line.strip()]
    forward = "\n".join(("    " + line).rstrip() for line in src[start:])
    source = TEMPLATE.format(
        cls=cls, torch_version=torch.__version__,
        imports="\n".join([f"import {i}" for i in sorted(w.imports)] + [
            f"from {mod} import {head} as {alias}" for (mod, head), alias in w.aliases.items()]),
        bindings="".join(f"{b}\n" for b in w.bindings + prologue),
        init="\n".join(" " * 8 + line for line in lines), forward=forward,
        ties="\n".join(" " * 8 + line for line in w.ties or ["pass"]),
    )
    return Emitted(source=source, class_name=cls, state_dict=dict(gm.state_dict()),
                   extra=w.extra)
