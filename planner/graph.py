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

>>> from kql.planner import annotator, ir, tracer
>>> trace is tracer.trace and Layer is ir.Layer and CNNGraph is ir.CNNGraph
True
>>> sorted(n for n in dir(annotator.Annotator) if n.startswith("fn_"))[:4]
['fn_adaptive', 'fn_arith', 'fn_avg_pool', 'fn_batch_norm']
"""
from __future__ import annotations

from kql.planner.ir import CNNGraph, Kind, Layer, Pair
from kql.planner.tracer import trace

__all__ = ["CNNGraph", "Kind", "Layer", "Pair", "trace"]
