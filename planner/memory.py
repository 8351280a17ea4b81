"""Memory estimates used to size batches.

Under ``torch.inference_mode`` a layer's output lives from the moment it is
computed until its last consumer has run. Walking the layers in execution
order with that rule gives the peak number of activation elements one image
(or one position's patches) needs; a batch needs that many times its size
(activations scale linearly in the batch, the weights and views do not).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

BYTES_PER_ELEMENT = 4  # float32


def numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def peak_elements(graph, size: Optional[Callable] = None, transient: Optional[Callable] = None) -> int:
    """Peak number of elements alive at once while the layers run in order.

    Args:
        graph: a ``CNNGraph``.
        size: elements of a layer's output (default: its full output shape).
        transient: extra elements a layer needs only while it runs (the
            gathered window of an incremental conv).

    A layer's inputs are still alive while it runs, and so is its output.
    """
    size = size or (lambda layer: numel(layer.out_shape))
    transient = transient or (lambda layer: 0)
    layers = graph.layers()
    position = {layer.name: i for i, layer in enumerate(layers)}
    last_use = dict(position)
    for layer in layers:
        for src in layer.inputs:
            last_use[src] = max(last_use[src], position[layer.name])
    alive: dict[str, int] = {}
    peak = 0
    for i, layer in enumerate(layers):
        alive[layer.name] = size(layer)
        peak = max(peak, sum(alive.values()) + transient(layer))
        for name in [n for n in alive if last_use[n] <= i]:
            del alive[name]
    return peak


def bytes_per_position(graph) -> int:
    """Bytes one occluded image costs in a naive batch (input + peak activations)."""
    return BYTES_PER_ELEMENT * peak_elements(graph)
