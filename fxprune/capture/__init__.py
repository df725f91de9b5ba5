"""Capture: a model and example inputs become a torch.fx GraphModule whose every node
carries its shape (``fxprune.meta``).

One module per job:

* :mod:`.frontends`: :func:`trace`, the front-end fallback order, and the ``capture`` pass.
* :mod:`.tracer`: the torch.fx front end (:func:`symbolic_trace`).
* :mod:`.decompositions`: the tracer's hookup to :mod:`fxprune.decompose`.
* :mod:`.torch_export`: the torch.export front end (:func:`export_capture`).
* :mod:`.state`: the user's model is left as it was (state restore).
* :mod:`.shapes`: shape propagation (:func:`propagate_shapes`, :class:`MetaProp`).
* :mod:`.graphs`, :mod:`.source`: graph-building helpers, the user's source line of a failure.

Examples
--------
>>> import torch
>>> from fxprune.capture import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.randn(2, 3))
>>> gm.meta["fxprune_frontend"]
'fx'
"""

from .frontends import FRONTENDS, Capture, opaque_calls, trace
from .graphs import copy_graph, copy_node
from .shapes import (MetaProp, NodeFailure, function_shape, module_shape, propagate_shapes, recurrent_outputs,
                     to_meta)
from .source import user_frame
from .torch_export import export_capture
from .tracer import OrderedDictOutput, Tracer, symbolic_trace

__all__ = ["FRONTENDS", "Capture", "MetaProp", "NodeFailure", "OrderedDictOutput", "Tracer", "copy_graph", "copy_node",
           "export_capture", "function_shape", "module_shape", "opaque_calls", "propagate_shapes",
           "recurrent_outputs", "symbolic_trace", "to_meta", "trace", "user_frame"]
