"""Shared checks for tests that prune: every pruned model goes through fxprune.verify."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

import fxprune
from healthy import make_healthy


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t  # a sparse buffer (torch.equal needs strided)


def snapshot(model: torch.nn.Module) -> dict:
    return {k: _dense(v.detach()).clone() for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(_dense(after[k]), v), f"{k} was modified"


def prune_and_verify(model, x, *, min_effect: float = 1e-4, healthy: bool = True,
                     expect_removed: bool = True, **kwargs):
    """Prune, check the pruned graph (lint, smaller), the oracle, and that the user's
    model is bit-for-bit untouched. Returns (result, verify_result)."""
    inputs = x if isinstance(x, tuple) else (x,)
    if healthy:
        make_healthy(model, inputs[0].shape)
    model.eval()
    before = snapshot(model)
    result = fxprune.prune(model, x, **kwargs)
    assert_untouched(model, before)
    result.module.graph.lint()
    if expect_removed:
        assert result.plan.n_removed > 0, "nothing was pruned"
        assert result.report.after.params < result.report.before.params
    v = fxprune.verify(model, result, x)
    assert v.max_rel_err < 1e-4
    if expect_removed and v.exact_groups:
        assert v.effect > min_effect, "removed channels had no effect: the oracle proves nothing"
    with torch.no_grad():
        out_ref, out = model(*inputs), result.module(*inputs)
    assert type(out) is type(out_ref)  # a Hugging Face ModelOutput stays one
    ref_list, got_list = pytree.tree_leaves(out_ref), pytree.tree_leaves(out)
    assert [t.shape for t in ref_list] == [t.shape for t in got_list]
    assert_untouched(model, before)
    return result, v
