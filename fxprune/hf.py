"""Hugging Face transformers: capturing models as users build them, and the config side
of write-back.

Capture (:func:`capture_settings`): a ``PreTrainedModel`` whose configs have
``use_cache=True`` (the default of every causal LM and of T5) is captured with
``use_cache=False`` on every config object of its module tree, restored when capture
ends. A cache object (``DynamicCache``, ``EncoderDecoderCache``) is no tensor output a
graph can return, and its key/value tensors, were they returned, would pin every
attention channel. The note saying so is stored on the captured graph
(``gm.meta[NOTES_KEY]``) and reaches ``PruneResult.notes``.

Config (:func:`update_config`): after write-back, the size fields of the model's configs
(``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim`` under whatever names the family uses) are set
from the written-back modules when every layer has the same sizes, and kept only if
building the model's class from the new config gives exactly the written-back model
(same tensor shapes, same non-persistent buffers, same scalar attributes): then
``save_pretrained`` and ``from_pretrained`` round-trip it. Otherwise the configs stay
as they were (so that ``from_pretrained`` fails loudly on the sizes instead of loading a
different model) and a :class:`ConfigWarning` says why and what works.

transformers is imported only when a model comes from it (``sys.modules`` is checked
first): fxprune does not depend on it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

NOTES_KEY = "fxprune_notes"  # gm.meta: what capture changed about the model's outputs, and why

CACHE_NOTE = ("use_cache: captured with use_cache=False (the config of {cls} has use_cache=True). A cache "
              "object ({cache}) is no tensor output a graph can return, and its key/value tensors would pin "
              "every attention channel; result.module returns the model's other outputs, its cache field "
              "None. For generate() with a KV cache, write the pruned weights back into the model's own "
              "classes: result.apply(model)")


class ConfigWarning(UserWarning):
    """A written-back Hugging Face model whose config cannot express its sizes: it works in
    memory (``generate()`` included), but ``save_pretrained``/``from_pretrained`` would not
    give it back."""


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing
    transformers when nothing imported it yet)."""
    if "transformers" not in sys.modules or not isinstance(model, nn.Module):
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:  # noqa: BLE001 (a broken install is no Hugging Face model)
        return False
    return isinstance(model, PreTrainedModel)


def configs(model: nn.Module) -> list[Any]:
    """The distinct config objects of ``model``'s module tree, the root's first (T5's
    encoder and decoder stacks hold copies of their own)."""
    if "transformers" not in sys.modules:
        return []
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def _returns_cache(model: nn.Module) -> bool:
    """Whether ``model`` returns a cache when ``use_cache`` is on: a model that generates, a
    decoder (BERT's config has ``use_cache=True`` too, and its encoder returns none)."""
    cfg = model.config
    can_generate = getattr(type(model), "can_generate", None)
    return bool((can_generate() if callable(can_generate) else False) or getattr(cfg, "is_decoder", False)
                or getattr(cfg, "is_encoder_decoder", False))


def _cache_name(model: nn.Module) -> str:
    return "EncoderDecoderCache" if getattr(model.config, "is_encoder_decoder", False) else "DynamicCache"


@contextlib.contextmanager
def capture_settings(model: Any) -> Iterator[list[str]]:
    """While the context runs, every config of a Hugging Face ``model`` that has
    ``use_cache=True`` has it False; yields the list of notes on what that changes (empty
    for any other model). The configs are restored on exit, also after an error."""
    notes: list[str] = []
    changed = []
    if is_hf_model(model):
        changed = [cfg for cfg in configs(model) if getattr(cfg, "use_cache", False) is True]
    if changed and _returns_cache(model):
        notes.append(CACHE_NOTE.format(cls=type(model).__name__, cache=_cache_name(model)))
    try:
        for cfg in changed:
            cfg.use_cache = False
        yield notes
    finally:
        for cfg in changed:
            cfg.use_cache = True


# -- config after write-back ------------------------------------------------------------------
_INTERMEDIATE = ("intermediate_size", "n_inner", "d_ff", "ffn_dim")


def _has(cfg: Any, field: str) -> bool:
    return field in getattr(cfg, "attribute_map", {}) or field in cfg.__dict__


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (transformers' Conv1D holds its weight transposed)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    if isinstance(m, nn.Linear):
        return w.shape[1], w.shape[0]
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return w.shape[0], w.shape[1]
    return None


def _per_layer(out: nn.Module, original: nn.Module, heads: dict) -> tuple[dict[str, Any], list[str]]:
    """The config fields the written-back modules determine, and why others cannot be set
    (sizes that differ per layer)."""
    from .writeback import head_counts

    cfg, original_cfg = out.config, original.config
    fields: dict[str, set] = {}
    emb = out.get_input_embeddings() if hasattr(out, "get_input_embeddings") else None
    hidden0 = getattr(original_cfg, "hidden_size", None)
    if isinstance(emb, nn.Embedding) and _has(cfg, "hidden_size"):
        fields["hidden_size"] = {emb.embedding_dim}
    attention = []
    for path, m in original.named_modules():
        counts = head_counts(m)
        if counts is None:
            continue
        attention.append(path)
        h, kv, d = heads.get(path, (counts[0], counts[1] or counts[0], counts[2]))
        for field, value in (("num_attention_heads", h), ("num_key_value_heads", kv), ("head_dim", d)):
            if value is not None and _has(cfg, field):
                fields.setdefault(field, set()).add(value)
    field = next((f for f in _INTERMEDIATE if _has(cfg, f)), None)
    if field is not None and isinstance(hidden0, int):
        width0 = getattr(original_cfg, field) or (4 * hidden0 if field == "n_inner" else None)
        for path, m in original.named_modules():
            shape = _linear_shape(m)
            if shape != (hidden0, width0) or any(path.startswith(a + ".") for a in attention):
                continue
            fields.setdefault(field, set()).add(_linear_shape(out.get_submodule(path))[1])
    updates, problems = {}, []
    for name, values in fields.items():
        if len(values) > 1:
            problems.append(f"{name} differs across layers ({', '.join(map(str, sorted(values)))})")
        elif values and values != {getattr(original_cfg, name)}:
            updates[name] = values.pop()
    return updates, problems


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built in the context get their parameters on the meta device (no memory,
    no initialization cost) and their buffers as computed (a rotary table)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build(cls: type, cfg: Any) -> nn.Module:
    with _parameters_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(copy.deepcopy(cfg))


def _numbers(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return bool(v) and all(_numbers(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _differences(model: nn.Module, fresh: nn.Module) -> dict[str, str]:
    """What ``fresh`` (built from a config) holds differently from ``model``: tensor names
    and shapes, the values of buffers a checkpoint does not hold, size attributes."""
    out = {}
    saved = set(model.state_dict().keys())
    mine = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    theirs = dict(fresh.named_parameters(remove_duplicate=False)) | dict(fresh.named_buffers(remove_duplicate=False))
    for name, t in mine.items():
        f = theirs.get(name)
        if f is None:
            out[name] = "not built from the config"
        elif f.shape != t.shape:
            out[name] = f"shape {tuple(f.shape)} from the config, {tuple(t.shape)} in the model"
        elif name not in saved and not f.is_meta and not torch.equal(f.to(t.dtype), t):
            out[name] = "computed from the config with other values (no checkpoint holds it)"
    modules = dict(fresh.named_modules())
    for path, m in model.named_modules():
        f = modules.get(path)
        for key, value in m.__dict__.items():
            if key.startswith("_") or not _numbers(value):
                continue
            got = f.__dict__.get(key) if f is not None else None
            if not _same(got, value):
                out[f"{path}.{key}" if path else key] = f"{got!r} from the config, {value!r} in the model"
    return out


def _rebuild_differences(out: nn.Module, cfg: Any, original: nn.Module) -> list[str]:
    """How the model built from ``cfg`` differs from ``out``, less what already differed
    between ``original`` and its own config."""
    try:
        fresh, base = _build(type(out), cfg), _build(type(original), original.config)
    except Exception as exc:  # noqa: BLE001 (a config the class rejects)
        return [f"{type(out).__name__} cannot be built from the updated config: {type(exc).__name__}: {exc}"]
    known = _differences(original, base)
    return [f"{k}: {v}" for k, v in _differences(out, fresh).items() if k not in known]


def update_config(out: nn.Module, original: nn.Module, heads: dict, *, strict: bool = False) -> dict[str, Any]:
    """Set the size fields of every config of the written-back ``out`` (hidden size,
    intermediate size, head counts, head size, under the family's names) when each is
    the same in every layer and the model's class, built from the updated config, is
    ``out`` (tensor shapes, non-persistent buffers, size attributes): then
    ``save_pretrained`` and ``from_pretrained`` round-trip it. Otherwise the configs are
    left as they were and a :class:`ConfigWarning` (``strict``: a ``ConfigError``) says
    why and what works. ``heads``: {attention module path: (heads, kv heads, head size)}
    as write-back set them. Returns the fields set."""
    updates, problems = _per_layer(out, original, heads)
    cfg = copy.deepcopy(out.config)
    for name, value in updates.items():
        setattr(cfg, name, value)
    if not problems:
        problems = _rebuild_differences(out, cfg, original)
    if not problems:
        for c in configs(out):
            for name, value in updates.items():
                if _has(c, name):
                    setattr(c, name, value)
        return updates
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
    message = (f"the config of {type(out).__name__} cannot express the pruned model: {shown}. The written-back "
               f"model works in memory (generate() included), and its config keeps the original sizes, so "
               f"from_pretrained on a save_pretrained folder fails on the tensor shapes instead of loading another "
               f"model. What round-trips: the same sizes in every layer (the default local ranking, or "
               f"isomorphic=True with global ranking), whole heads (policy='heads': a head size computed into "
               f"rotary tables and attention scales stays), or fxprune.save(result, folder) for any plan")
    if strict:
        raise ConfigError(message)
    warnings.warn(message, ConfigWarning, stacklevel=3)
    return {}
