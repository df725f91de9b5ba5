"""Small helpers shared by fxprune modules."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_tuple", "mutable_args"]


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


def mutable_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A node's arguments with torch.fx's immutable lists and dicts made plain, as the
    generated code passes them (a list literal there is a fresh list, and a wrapped
    function may mutate it, as torchvision's video Swin does)."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    def plain(a: Any) -> Any:
        if isinstance(a, immutable_list):
            return [plain(v) for v in a]
        if isinstance(a, immutable_dict):
            return {k: plain(v) for k, v in a.items()}
        if type(a) is tuple:
            return tuple(plain(v) for v in a)
        return a

    if not any(isinstance(a, (list, tuple, dict)) for a in (*args, *kwargs.values())):
        return args, kwargs
    return plain(args), plain(kwargs)
