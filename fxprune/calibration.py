"""Calibration data for the data-driven scoring passes (``score-taylor``,
``score-hessian``): reading batches, the default loss, and per-batch gradients of
the traced graph's parameters.

Gradients are taken with :func:`torch.autograd.grad` on detached aliases of the
parameters, through :func:`torch.func.functional_call` with copies of the buffers
and every module in eval mode. The user's parameters, buffers, ``.grad`` fields,
``requires_grad`` flags and training flags are left exactly as they were, and no
autograd graph outlives its batch.

A batch is a tensor (the single input, no target) or a tuple/list whose first
element is the input (a tensor, or a tuple/list of positional inputs) and whose
second, if present, is the target; further elements (sample ids, ...) are ignored.
A ``DataLoader`` over a ``TensorDataset(x, y)`` fits as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .channels import ChannelGroups
from .errors import ConfigError
from .meta import graph_inputs
from .rules.context import get_tensor


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """``(inputs, target)`` of one batch; ``target`` is None when the batch has none.

    Examples
    --------
    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> [len(split_batch(b)[0]) for b in (x, (x, y), [(x, x), y])]
    [1, 1, 2]
    >>> split_batch(x)[1] is None, split_batch((x, y))[1] is y
    (True, True)
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        inputs = tuple(first) if isinstance(first, (tuple, list)) else (first,)
        return inputs, (batch[1] if len(batch) > 1 else None)
    raise ConfigError(f"a batch of data must be a tensor or a tuple/list (inputs, target), got "
                      f"{type(batch).__name__}; yield x or (x, y) from the data iterable")


def _floats(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _floats(v)]
    return []


def default_loss(output: Any, target: Any = None) -> torch.Tensor:
    """The loss used when ``loss_fn`` is None.

    Integer targets: cross-entropy of the (logit) output against them. Floating
    targets: ``0.5 * mean((output - target)**2)``. No target: ``0.5 * mean(output**2)``
    summed over the floating outputs (the sensitivity of the output energy).

    Examples
    --------
    >>> float(default_loss(torch.tensor([[1.0, 3.0]])))
    2.5
    >>> round(float(default_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))), 4)
    0.6931
    """
    if target is None:
        outs = _floats(output)
        if not outs:
            raise ConfigError("the default loss needs a floating-point model output; pass loss_fn=")
        return sum(0.5 * o.pow(2).mean() for o in outs)
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"the default loss with targets needs a single tensor output, the model "
                          f"returns {type(output).__name__}; pass loss_fn=lambda output, target: ...")
    try:
        if not torch.is_floating_point(target):
            return F.cross_entropy(output, target)
        if target.shape != output.shape:
            raise ValueError("a floating target must have the output's shape")
        return 0.5 * F.mse_loss(output, target)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ConfigError(f"the default loss (cross-entropy for integer targets, half mean squared "
                          f"error for floating ones) failed on output {tuple(output.shape)} and target "
                          f"{tuple(target.shape)}: {exc}; pass loss_fn=") from exc


def check_data(data: Any, criterion: str) -> None:
    """Raise :class:`ConfigError` unless ``data`` is an iterable of batches."""
    if data is None:
        raise ConfigError(f"{criterion} needs calibration data: pass data=<iterable of batches> "
                          f"(fxprune.prune(..., importance=..., data=batches), also with pipeline=)")
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ConfigError(f"data for {criterion} must be an iterable of batches (a list, a DataLoader), "
                          f"got {type(data).__name__}; wrap a single batch as data=[x] or [(x, y)]")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def calibrate(groups: ChannelGroups, data: Iterable, loss_fn: Callable | None, paths: Iterable[str],
              update: Callable[[dict[str, torch.Tensor]], None], *, criterion: str,
              progress: bool | None = None, max_batches: int | None = None) -> int:
    """Call ``update(grads)`` once per batch with float64 gradients of the loss with respect
    to the tensors at ``paths`` of ``groups.gm``; return the number of batches.

    ``loss_fn(output, target)`` gets ``target=None`` for batches without one (default:
    :func:`default_loss`). ``progress``: a tqdm bar over batches (None: only on a terminal).
    """
    check_data(data, criterion)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    gm = groups.gm
    loss_fn = default_loss if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
    leaf_of: dict[int, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    for p in dict.fromkeys(paths):
        t = get_tensor(gm, p)
        if t.is_floating_point():  # a tied tensor gets one leaf under each of its names
            if id(t) not in leaf_of:
                leaf_of[id(t)] = t.detach().requires_grad_(True)
            leaves[p] = leaf_of[id(t)]
    names, tensors = list(leaves), list(dict.fromkeys(leaves.values()))
    device = tensors[0].device if tensors else torch.device("cpu")
    buffers = {n: b.clone() for n, b in gm.named_buffers()}
    modes = [(m, m.training) for m in gm.modules()]
    total = data_length(data)
    if max_batches is not None:
        data, total = islice(data, max_batches), (max_batches if total is None else min(total, max_batches))
    bar = tqdm(data, desc=f"{criterion} calibration", unit="batch", total=total, leave=False,
               disable=None if progress is None else not progress)
    n = 0
    try:
        gm.eval()
        for batch in bar:
            inputs, target = split_batch(to_device(batch, device))
            with torch.enable_grad():
                out = torch.func.functional_call(gm, {**buffers, **leaves}, graph_inputs(gm, inputs),
                                                 strict=False)
                loss = loss_fn(out, target)
                _check_loss(loss, criterion)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors else ()
            by_id = {id(t): (torch.zeros_like(t, dtype=torch.float64) if g is None else g.detach().double())
                     for t, g in zip(tensors, grads)}
            del out, loss, grads
            update({p: by_id[id(leaves[p])] for p in names})
            n += 1
    finally:
        bar.close()
        for m, mode in modes:
            m.training = mode
    if n == 0:
        raise ConfigError(f"data for {criterion} yielded no batches; pass a non-empty iterable "
                          f"(a DataLoader that is not exhausted, a list of batches)")
    return n


def data_length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:  # a generator, an iterable-style DataLoader
        return None


def _check_loss(loss: Any, criterion: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"loss_fn for {criterion} must return a scalar tensor, got {shape}; "
                          f"reduce it (e.g. .mean()) inside loss_fn")
    if not loss.requires_grad:
        raise ConfigError(f"loss_fn for {criterion} returned a loss that does not depend on the model "
                          f"output (no gradient); do not detach or compute it under torch.no_grad()")
