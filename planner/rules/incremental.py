"""Rule: rewrite Infer over occluded images into incremental inference.

For incremental plans (``plan.mode`` 'exact' or 'approx') this rule decides everything the incremental
executor (``executor/incremental.py``) needs, once for the whole grid:

- ``regions``: each layer's changed region for every position
  (``geometry.propagate``): exact, or capped by the projective-field
  threshold ``plan.tau`` in approximate plans.
- ``order``: the order positions are batched in (MQO). A batch tensor
  has one patch size per layer, the largest in the batch, so positions whose
  regions are cut by the border (cheaper) are batched with each other rather
  than with central ones: positions are sorted by their incremental cost.
- ``full_layers``: the cost-based IVM cutoff. Past some depth the
  changed region covers so much of a layer that gathering windows and running
  a conv on them costs more than recomputing the layer in full; from the
  cheapest cut on, every layer runs in full.

They go into ``plan.schedule`` (an :class:`~kql.planner.plan.IncrementalSchedule`,
completed by the batch and kernel rules); the rule also sets
``plan.per_position_bytes`` for the batch-size rule.
"""
from __future__ import annotations

import math

import numpy as np

from kql.planner.geometry import Rects, propagate, read_region, window_size
from kql.planner.ir import Kind
from kql.planner.memory import BYTES_PER_ELEMENT, numel, peak_elements
from kql.planner.plan import IncrementalSchedule, batch_bounds

#: Cost of gathering one element into a window, in multiply-add equivalents.
#: A conv output pixel costs C_in*k*k multiply-adds at ~100-150 GFLOP/s on this
#: class of CPU, a gathered element one read and one write at a few GB/s; the
#: ratio of the two throughputs measured by benchmarks/bench_kernels.py is
#: about this.
GATHER_COST = 4.0

#: Per layer and batch, fixed cost of running a layer once more (Python,
#: dispatch, index arithmetic, small-tensor allocation), in multiply-add
#: equivalents: ~0.2 ms at ~150 GFLOP/s, measured on VGG16 with batches of one.
CALL_OVERHEAD = 3e7

#: Per model parameter and batch: every batch streams every weight from
#: memory once (~20 GB/s against ~150 GFLOP/s of compute). This is what makes
#: a batch of one position cost VGG16 ~45 ms instead of ~10 ms: its 124M
#: classifier weights are read for a single row of activations.
WEIGHT_COST = 30.0


def batch_overhead(graph, full_layers=frozenset()) -> float:
    """Fixed cost of one more batch, in multiply-add equivalents: one call per
    layer plus streaming every parameter once."""
    params = sum(p.numel() for p in graph.module.parameters())
    return CALL_OVERHEAD * len(graph.layers()) + WEIGHT_COST * params


def _incremental_layers(graph):
    return [layer for layer in graph.layers() if layer.kind in (Kind.POINT, Kind.LOCAL, Kind.MERGE)
            and layer.spatial]


def layer_costs(graph, regions, order, batch):
    """Per layer: multiply-adds of the incremental executor over the whole grid
    with this batching (largest region per batch), gathered elements, and
    full-recompute multiply-adds. Returns three dicts keyed by layer name.

    ``batch`` is a batch size (consecutive batches of ``order``) or an array
    of batch bounds (starts into ``order``, then ``len(order)``)."""
    n = len(order)
    bounds = batch_bounds(n, batch)
    starts, sizes = bounds[:-1], np.diff(bounds)
    inc, gathered, full = {}, {}, {}
    for layer in graph.layers():
        full[layer.name] = float(layer.flops) * n
        r = regions[layer.name]
        if not layer.spatial or layer.kind not in (Kind.POINT, Kind.LOCAL, Kind.MERGE):
            inc[layer.name] = float(layer.flops) * n
            gathered[layer.name] = 0.0
            continue
        # the batch's largest extent along every axis (depth too, on a volume)
        largest = [np.maximum.reduceat(n[order], starts) for n in r.sizes]
        per_pixel = float(layer.flops) / math.prod(layer.out_hw)
        inc[layer.name] = float((sizes * math.prod(largest)).sum()) * per_pixel
        window = window_size(layer, *largest)
        gathered[layer.name] = float((sizes * math.prod(window)).sum()) * gathered_channels(layer)
    return inc, gathered, full


def gathered_channels(layer) -> int:
    """Channels the incremental executor gathers per window cell: a local
    layer's input, every spatial input of a merge, none for point layers."""
    if layer.kind == Kind.LOCAL:
        return layer.in_channels(0)
    if layer.kind == Kind.MERGE:
        return sum(layer.in_channels(i) for i in range(len(layer.in_shapes)) if layer.input_hw(i))
    return 0


def choose_cutoff(graph, inc, gathered, full):
    """Index into ``graph.layers()`` from which everything runs in full, chosen
    to minimise incremental cost before + full cost after (len = no cutoff)."""
    layers = graph.layers()
    # The per-batch overhead is paid whichever way a layer runs, so it does
    # not move the cut; what does is gathering and the clipped regions.
    cost_inc = np.array([inc[l.name] + GATHER_COST * gathered[l.name] for l in layers])
    cost_full = np.array([full[l.name] for l in layers])
    # total(c) = sum(inc[:c]) + sum(full[c:]); pasting the patch states into
    # full tensors at the cut costs about one gather of every live tensor, small.
    prefix_inc = np.concatenate([[0.0], np.cumsum(cost_inc)])
    suffix_full = np.concatenate([np.cumsum(cost_full[::-1])[::-1], [0.0]])
    total = prefix_inc + suffix_full
    c = int(np.argmin(total))
    return c, total


def sort_positions(graph, regions) -> np.ndarray:
    """MQO order: positions by descending incremental cost, so a batch's
    largest region is close to every member's (ties keep row-major order)."""
    from kql.planner.cost import incremental_flops
    per_layer = incremental_flops(graph, regions)
    total = np.sum(list(per_layer.values()), axis=0)
    return np.argsort(-total, kind="stable")


def incremental(plan, settings=None):
    """Plan exact incremental inference (changes the plan in place; a no-op
    for naive plans)."""
    if not plan.incremental:
        return plan
    graph = plan.graph
    regions = propagate(graph, Rects.from_patches(*plan.positions(), plan.patch), plan.tau, plan.gates)
    order = sort_positions(graph, regions)

    # Cutoff with a provisional batch (the batch rule runs next; the choice
    # hardly depends on it beyond the call overhead).
    provisional = max(1, min(64, plan.n_positions))
    inc, gathered, full = layer_costs(graph, regions, order, provisional)
    cut, _ = choose_cutoff(graph, inc, gathered, full)
    layers = graph.layers()
    full_layers = frozenset(l.name for l in layers[cut:] if l.kind != Kind.OUTPUT)
    first_global = next((l for l in layers if l.kind == Kind.GLOBAL), None)
    if cut < len(layers) and layers[cut].kind not in (Kind.GLOBAL, Kind.OUTPUT):
        cutoff = layers[cut].name
        plan.record("incremental", f"IVM cutoff at {layers[cut].name} ({layers[cut].op}): from there "
                                   f"on full recompute is cheaper than incremental")
    else:
        cutoff = None
        where = f"the first global layer {first_global.name} ({first_global.op})" if first_global else "the output"
        plan.record("incremental", f"incremental up to {where}; no earlier cutoff pays off")

    plan.per_position_bytes = BYTES_PER_ELEMENT * _peak_patch_elements(graph, regions, full_layers)
    view_bytes = BYTES_PER_ELEMENT * sum(numel(l.out_shape) for l in layers
                                         if l.kind != Kind.GLOBAL and l.spatial and l.name not in full_layers)
    plan.schedule = IncrementalSchedule(regions, order, full_layers, cutoff, view_bytes)
    return plan


def _peak_patch_elements(graph, regions, full_layers) -> int:
    """Peak elements one position needs in a batch: each layer's largest patch
    (its full output past the cutoff), plus the window a local layer gathers."""
    def size(layer):
        if layer.name in full_layers or not layer.spatial or layer.kind in (Kind.GLOBAL, Kind.OUTPUT):
            return numel(layer.out_shape)
        return int(layer.channels * math.prod(int(n.max()) for n in regions[layer.name].sizes))

    def transient(layer):
        if layer.kind != Kind.LOCAL or layer.name in full_layers or not layer.spatial:
            return 0
        largest = [int(n.max()) for n in regions[layer.name].sizes]
        rr = read_region(layer, Rects(*(0,) * len(largest), *largest))
        return int(layer.in_channels(0) * math.prod(int(n[0]) for n in rr.sizes))

    return peak_elements(graph, size, transient)
