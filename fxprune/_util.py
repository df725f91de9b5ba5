"""Small helpers shared by fxprune modules."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_tuple"]


def as_tuple(example_inputs: Any) -> tuple:
    """Normalize example inputs to a tuple of positional arguments.

    Parameters
    ----------
    example_inputs : torch.Tensor, tuple or list
        One tensor, or a tuple/list of positional inputs.

    Returns
    -------
    tuple
        ``(example_inputs,)`` for a single tensor (or any non-sequence
        object), ``tuple(example_inputs)`` for a tuple or list.

    Examples
    --------
    >>> import torch
    >>> len(as_tuple(torch.zeros(1)))
    1
    >>> as_tuple([1, 2])
    (1, 2)
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)
