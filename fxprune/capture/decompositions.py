"""The symbolic tracer's hookup to :mod:`fxprune.decompose`.

``torch.fx`` keeps ``torch.nn`` modules whole, and the forwards of
``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers are not traceable; the
tracer calls their functional decompositions instead (unless the user asked for the
module to stay a leaf), so their heads are prunable. A decomposition whose ops depend on
the rank or dtype of a traced value (an attention mask) reads them with
:meth:`DecomposingTracer.example_meta`; ``careful`` says whether it may also read ranks
where a cheaper guess usually holds (an attention query is batched).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from ..decompose import decomposition
from ..meta import TensorMeta


class DecomposingTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` that traces the modules :func:`fxprune.decompose.decomposition`
    knows through their decompositions.

    The attributes :mod:`fxprune.decompose` reads on ``proxy.tracer`` are ``careful`` and
    :meth:`example_meta`. Subclasses provide :meth:`run_to` (the value of a traced node on
    the example inputs), :meth:`is_leaf_user` and :meth:`call_whole_module` (a module call
    kept as one node).
    """

    def __init__(self, example_inputs: tuple | None = None, careful: bool = False):
        super().__init__()
        # decompositions may read ranks on the example inputs where a cheaper guess usually
        # holds (an attention query is batched): a retrace after that guess failed
        self.careful = careful and example_inputs is not None
        self.example_inputs = example_inputs
        self._example_metas: dict[torch.fx.Node, TensorMeta | None] = {}

    def is_leaf_user(self, m: nn.Module, qualname: str) -> bool:
        """Whether the user asked for ``m`` to stay opaque (then it is not decomposed)."""
        return False

    def run_to(self, target: torch.fx.Node) -> TensorMeta | None:
        """Shape and dtype of the traced node ``target`` on the example inputs, None where
        not known."""
        return None

    def example_meta(self, value: Any) -> TensorMeta | None:
        """Shape and dtype of a traced value on the example inputs, or None where they are
        not known (no example inputs, or a value that cannot be computed from them alone).
        A decomposition whose ops depend on them (an attention mask's rank and dtype) asks
        here instead of branching on a Proxy; each node is computed once per trace."""
        if not isinstance(value, torch.fx.Proxy) or self.example_inputs is None:
            return None
        node = value.node
        if node not in self._example_metas:
            self._example_metas[node] = self.run_to(node)
        return self._example_metas[node]

    def call_module(self, m, forward, args, kwargs):
        replacement = decomposition(m, kwargs)
        if replacement is not None and not self.is_leaf_user(m, self.path_of_module(m)):
            return replacement(m, *args, **kwargs)  # traced through, made analyzable
        return self.call_whole_module(m, forward, args, kwargs)

    def call_whole_module(self, m, forward, args, kwargs):
        """A call of ``m`` that is not decomposed: ``torch.fx``'s (a leaf module becomes one
        node, any other is traced through)."""
        return super().call_module(m, forward, args, kwargs)
