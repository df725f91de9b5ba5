"""Fourier transforms (``torch.fft`` and export's ``_fft_*``): each channel's spectrum
stays apart along the dims a transform does not touch; channels along a transformed
dim are pinned."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..labels import const_like
from .context import AnalysisContext, op_name
from .registry import aten_ops, register


_FFT_1D = ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")
_FFT_2D = ("fft2", "ifft2", "rfft2", "irfft2", "hfft2", "ihfft2")
_FFT_ND = ("fftn", "ifftn", "rfftn", "irfftn", "hfftn", "ihfftn")
FFT_NAMES = _FFT_1D + _FFT_2D + _FFT_ND  # the torch.fft functions (aten.fft_<name>)


def _fft_names(node: torch.fx.Node) -> tuple[str, ...]:
    """The positional parameters of a transform torch.fx cannot bind."""
    name = op_name(node).removeprefix("fft_")  # aten.fft_rfft is torch.fft.rfft
    if name.startswith("_fft_"):  # _fft_r2c(self, dim, ...), _fft_c2r, _fft_c2c
        return "input", "dim"
    return "input", "n" if name in _FFT_1D else "s", "dim", "norm"


def _fft_dims(ctx: AnalysisContext, node: torch.fx.Node, ndim: int) -> list[int]:
    """The dims a torch.fft transform (or export's _fft_r2c/_fft_c2r/_fft_c2c) runs over."""
    name = op_name(node).removeprefix("fft_")
    a = ctx.named_args(_fft_names(node))
    if name.startswith("_fft_"):
        return [d % ndim for d in a["dim"]]
    one_d = name in _FFT_1D
    dim = ctx.value(a.get("dim", -1 if one_d else (-2, -1) if name in _FFT_2D else None))
    if dim is None:
        size = ctx.value(a.get("s"))
        return list(range(ndim - len(size), ndim)) if size is not None else list(range(ndim))
    return [d % ndim for d in ([dim] if isinstance(dim, int) else dim)]


def spectral(ctx: AnalysisContext, node: torch.fx.Node) -> Any:
    """A Fourier transform mixes every position along its dims and keeps the others
    apart: channels along a transformed dim are pinned (FNet mixing the hidden dim); a
    tensor whose labels vary along it besides (a learned filter, one per channel) moves
    those positions together; the transformed dims carry no channel in the output."""
    labels = ctx.labels(ctx.named_args(_fft_names(node))["input"])
    if labels is None:
        return None
    dims = _fft_dims(ctx, node, labels.ndim)
    varying = [d for d, n in enumerate(labels.shape) if n > 1]
    if varying and set(varying) <= set(dims):
        ctx.pin(labels, f"{node.name}: a Fourier transform along a channel dim")
        return const_like(labels.ndim)
    for d in dims:
        if labels.shape[d] > 1:  # positions along a transformed dim go with the rest of their row
            rows = labels.movedim(d, 0).reshape(labels.shape[d], -1)
            ctx.union(rows, rows[:1].expand_as(rows))
            labels = labels.narrow(d, 0, 1)
    return labels


register(*(getattr(torch.fft, n) for n in FFT_NAMES if hasattr(torch.fft, n)),
         *aten_ops("_fft_r2c", "_fft_c2r", "_fft_c2c", *("fft_" + n for n in FFT_NAMES)))(spectral)
