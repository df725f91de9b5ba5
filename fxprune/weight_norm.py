"""Weight normalization (Salimans & Kingma): a layer whose weight is
``g * v / ||v||``, the norm taken over every dim but ``dim`` (over all of ``v`` when
``dim`` is -1), as ``torch.nn.utils.parametrizations.weight_norm`` and the older
hook-based ``torch.nn.utils.weight_norm`` make it.

The analysis aligns ``v`` as the weight would be and ``g`` along ``dim``. Slicing
``v`` along another dim shrinks the norm of what is kept, so the rewrite folds the
ratio of the norms into ``g``: the pruned layer's weight is then exactly the kept
part of the original weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm as _HookWeightNorm


@dataclass(frozen=True)
class WeightNorm:
    """Where a weight-normalized layer keeps ``g`` and ``v`` (names relative to the
    layer), and the dim ``g`` varies along (-1: one ``g`` for the whole weight)."""

    g: str
    v: str
    dim: int
    hooked: bool  # the old hook-based form: ``weight`` is a plain attribute recomputed before forward


def weight_norm_of(module: nn.Module) -> WeightNorm | None:
    """The weight normalization of ``module``'s ``weight`` when that is all that computes
    its tensors (no other parametrization, no other hook); else None."""
    if module._forward_hooks or not (module._forward_pre_hooks or "parametrizations" in module._modules):
        return None
    pre_hooks = list(module._forward_pre_hooks.values())
    if parametrize.is_parametrized(module):
        plist = module.parametrizations
        if pre_hooks or set(plist) != {"weight"} or len(plist.weight) != 1 \
                or not isinstance(plist.weight[0], _WeightNorm):
            return None
        return WeightNorm("parametrizations.weight.original0", "parametrizations.weight.original1",
                          plist.weight[0].dim, hooked=False)
    if len(pre_hooks) == 1 and isinstance(pre_hooks[0], _HookWeightNorm) and pre_hooks[0].name == "weight":
        return WeightNorm("weight_g", "weight_v", pre_hooks[0].dim, hooked=True)
    return None


def _norms(v: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.norm_except_dim(v.detach(), 2, dim)


def fold_gain(g_new: torch.Tensor, v_old: torch.Tensor, v_new: torch.Tensor, kept_along_dim: torch.Tensor | None,
              dim: int) -> None:
    """Scale ``g_new`` in place so that ``g_new * v_new / ||v_new||`` is the kept part of
    ``g * v_old / ||v_old||`` (``kept_along_dim``: the indices kept along ``dim``, None for
    all)."""
    v_ref = v_old if kept_along_dim is None or dim == -1 else v_old.index_select(dim, kept_along_dim)
    if v_ref.shape == v_new.shape:
        return  # only sliced along ``dim``: every kept norm is unchanged
    with torch.no_grad():
        g_new.mul_((_norms(v_new, dim) / _norms(v_ref, dim)).to(g_new.dtype).reshape(g_new.shape))


def recompute_hooked_weight(module: nn.Module, norm: WeightNorm) -> None:
    """The plain ``weight`` attribute of the hook-based form, from its (new) ``g`` and ``v``."""
    with torch.no_grad():
        weight = torch._weight_norm(module.weight_v, module.weight_g, norm.dim)
    module.__dict__["weight"] = weight
