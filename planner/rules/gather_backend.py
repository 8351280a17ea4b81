"""Rule: choose, per layer, the kernel that gathers its read-in windows.

Incremental inference prepares every local layer's input by copying, for each
position of a batch, a window of the materialized view with the changed patch
written over it (``kernels.gather``). Three physical operators do that and all
give identical results:

- ``torch``: indexing with torch ops; any device; lowest fixed cost.
- ``numba``: a parallel Numba CPU kernel, one pass over the batch; from
  ``kernels.NUMBA_MIN_CELLS`` output cells on it beats torch 2-5x
  (benchmarks/bench_kernels.py), below that its launch cost dominates.
- ``cuda``: a Numba CUDA kernel on CUDA tensors (no host copies).

The choice is made here, once per layer, from the device, what is installed
and the size of the layer's windows for a full batch, so EXPLAIN can name it.
``SET gather_backend`` forces one backend for every layer.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

from kql.errors import PlanError
from kql.planner.geometry import window_size
from kql.planner.ir import Kind


def gather_backend(plan, settings=None):
    """Set the schedule's ``layer_backends`` and its summary ``gather_backend``
    (changes the plan in place; a no-op for naive plans)."""
    if not plan.incremental:
        return plan
    from kql import kernels
    forced = settings.gather_backend if settings is not None else "auto"
    available = kernels.available_backends()
    cuda = plan.device == "cuda"
    if forced != "auto":
        if forced not in available:
            raise PlanError(f"gather_backend '{forced}' is not available here (available: "
                            f"{', '.join(available)})")
        if (forced == "cuda") != cuda and forced != "torch":
            raise PlanError(f"gather_backend '{forced}' cannot run on device '{plan.device}'")
    choice = {}
    for layer in plan.graph.layers():
        if layer.kind != Kind.LOCAL or layer.name in plan.full_layers or not layer.spatial:
            continue
        if forced != "auto":
            choice[layer.name] = forced
        elif cuda:
            choice[layer.name] = kernels.choose_backend("cuda", 0)
        else:
            cells = plan.batch_size * layer.in_shapes[0][0] * _window_cells(plan, layer)
            choice[layer.name] = kernels.choose_backend("cpu", cells, len(layer.in_shapes[0]) - 1)
    counts = Counter(choice.values())
    plan.schedule = dataclasses.replace(plan.schedule, layer_backends=choice, gather_backend=(
        forced if forced != "auto" else (max(counts, key=counts.get) if counts else "torch")))
    summary = gather_summary(choice)
    why = ("forced by SET gather_backend" if forced != "auto" else
           "CUDA device" if cuda else
           f"numba from {kernels.numba_min_cells(plan.ndim)} window cells per batch, torch below"
           + ("" if "numba" in available else " (numba not installed)"))
    if choice:
        plan.record("gather_backend", f"{summary} ({why})")
    return plan


def gather_summary(choice: dict) -> str:
    """'numba for 9 layers, torch for 4 layers': the kernels in use, most used first."""
    return ", ".join(f"{name} for {n} layer{'s' * (n != 1)}" for name, n in Counter(choice.values()).most_common())


def _window_cells(plan, layer) -> int:
    """Cells of the layer's largest read-in window for one position."""
    window = window_size(layer, *(n.max() for n in plan.regions[layer.name].sizes))
    return int(math.prod(int(n) for n in window))
