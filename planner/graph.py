"""The CNN as a DAG of layers, traced once with torch.fx and annotated once.

The public face of three modules, kept so that ``kql.planner.graph`` imports
as it always has (``from kql.planner.graph import trace, CNNGraph, Layer, Kind``):

- :mod:`kql.planner.ir`: the graph IR, :class:`Layer` and :class:`CNNGraph`,
  the kinds (point / local / merge / global) and the layouts;
- :mod:`kql.planner.tracer`: :func:`trace`, torch.fx symbolic tracing and one
  shape-propagation pass;
- :mod:`kql.planner.ops` and :mod:`kql.planner.annotator`: the op tables and
  the handlers that classify every traced call.

Code inside KQL imports from those modules directly.

>>> import torch.nn as nn
>>> g = trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (3, 32, 32))
>>> [(l.name, l.op, str(l.kind), l.out_shape) for l in g]  # doctest: +NORMALIZE_WHITESPACE
[('input_1', 'input', 'input', (3, 32, 32)), ('_0', 'conv2d', 'local', (8, 32, 32)),
 ('_1', 'relu', 'point', (8, 32, 32)), ('_2', 'max_pool2d', 'local', (8, 16, 16)),
 ('output', 'output', 'output', (8, 16, 16))]
>>> g["_0"].padding, g["_0"].flops == 8 * 32 * 32 * 3 * 3 * 3
(((1, 1), (1, 1)), True)
"""
from __future__ import annotations

from kql.planner.ir import CNNGraph, Kind, Layer, Pair
from kql.planner.tracer import trace

__all__ = ["CNNGraph", "Kind", "Layer", "Pair", "trace"]
