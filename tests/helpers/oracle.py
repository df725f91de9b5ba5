"""Shared checks for tests that prune: every pruned model goes through fxprune.verify,
the check is shown to be sensitive (a slightly perturbed pruned model fails it), and
the user's model is left bit-for-bit as it was (it still runs and pickles)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import io
import pickle

import pytest
import torch
import torch.utils._pytree as pytree

import fxprune
from fxprune.errors import VerificationError
from .healthy import make_healthy


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t  # a sparse buffer (torch.equal needs strided)


def _digest(t: torch.Tensor) -> tuple:
    """Shape, dtype and a hash of the bytes of ``t``: bit-for-bit identity without holding
    a second copy of a multi-GB model."""
    t = _dense(t.detach()).contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return tuple(t.shape), t.dtype, hashlib.blake2b(data, digest_size=16).hexdigest()


def snapshot(model: torch.nn.Module) -> dict:
    return {k: _digest(v) for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert _digest(after[k]) == v, f"{k} was modified"


class _Sink(io.RawIOBase):
    """A file that forgets what is written: pickling a multi-GB model into it costs no
    memory."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


def pickles(model: torch.nn.Module) -> bool:
    """Whether ``model`` pickles (a class defined inside a test function never does)."""
    try:
        pickle.dump(model, _Sink())
    except Exception:  # noqa: BLE001 (local classes, parametrized modules: any reason counts)
        return False
    return True


def assert_still_usable(model: torch.nn.Module, inputs: tuple, expected, pickled: bool) -> None:
    """The user's model runs with the same outputs and, if it pickled before, still pickles
    (nothing fxprune made during capture was left on it)."""
    with torch.no_grad():
        again = model(*inputs)
    for a, b in zip(pytree.tree_leaves(expected), pytree.tree_leaves(again)):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and torch.equal(a, b), "the user's model changed its outputs"
    if pickled:
        pickle.dump(model, _Sink())
        torch.save(model, _Sink())


def perturbed(module: torch.nn.Module, rel: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """A copy of ``module`` whose floating parameters moved by ``rel`` of their spread."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(module)
    with torch.no_grad():
        for t in out.parameters():
            if t.is_floating_point() and t.numel() > 1 and t.layout == torch.strided:
                spread = float(t.double().std()) or float(t.double().abs().mean()) or 1.0
                t.add_(rel * spread * torch.randn(t.shape, generator=gen).to(t.dtype))
    return out


def assert_sensitive(model, result, x, rel: float = 0.05) -> None:
    """The oracle rejects the pruned module with its weights slightly perturbed: a pass
    means something."""
    if not any(t.is_floating_point() and t.numel() > 1 for t in result.module.parameters()):
        return
    bad = dataclasses.replace(result, module=perturbed(result.module, rel))
    with pytest.raises(VerificationError):
        fxprune.verify(model, bad, x, name_failing_group=False)
    del bad
    gc.collect()  # the caught error's frames form cycles that hold the copies until collected


def prune_and_verify(model, x, *, min_effect: float = 1e-4, healthy: bool = True,
                     expect_removed: bool = True, allow_unchecked: bool = False,
                     sensitive: bool = True, save_to=None, **kwargs):
    """Prune, check the pruned graph (lint, smaller), the oracle on every removed channel
    (unless ``allow_unchecked``), that the oracle fails on a perturbed copy, and that the
    user's model is bit-for-bit untouched, runs and pickles. With ``save_to`` (a folder)
    ``fxprune.analyze`` and ``fxprune.save`` run too, and the user's model is checked after
    them as well. Returns (result, verify_result)."""
    inputs = x if isinstance(x, tuple) else (x,)
    if healthy:
        make_healthy(model, inputs[0].shape)
    model.eval()
    before = snapshot(model)
    pickled = pickles(model)
    with torch.no_grad():
        out_ref = model(*inputs)
    result = fxprune.prune(model, x, **kwargs)
    assert_untouched(model, before)
    result.module.graph.lint()
    if expect_removed:
        assert result.plan.n_removed > 0, "nothing was pruned"
        assert result.report.after.params < result.report.before.params
    v = fxprune.verify(model, result, x)
    assert v.max_rel_err < 1e-4
    assert v.groups_removed == 0 or v.groups_checked > 0, v.summary()
    if not allow_unchecked:
        assert v.complete and not v.unchecked, v.summary()
    if expect_removed and v.exact_groups + v.inexact_groups:
        assert v.effect > min_effect, "removed channels had no effect: the oracle proves nothing"
    if sensitive:
        assert_sensitive(model, result, x)
    if save_to is not None:
        fxprune.analyze(model, x, **{k: v for k, v in kwargs.items() if k in ("frontend", "gqa", "leaf_modules")})
        fxprune.save(result, save_to, example_inputs=x)
    with torch.no_grad():
        out = result.module(*inputs)
    assert type(out) is type(out_ref)  # a Hugging Face ModelOutput stays one
    ref_list, got_list = pytree.tree_leaves(out_ref), pytree.tree_leaves(out)
    assert [t.shape for t in ref_list] == [t.shape for t in got_list]
    assert_untouched(model, before)
    assert_still_usable(model, inputs, out_ref, pickled)
    return result, v
