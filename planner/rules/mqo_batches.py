"""Rule: split the positions of an exact plan into batches that keep the border savings.

A batch holds one patch size per layer, the largest of its positions
(Krypton's MQO, eqs. 29-34). Near the image border a position's changed
region is clipped, so it is cheaper than a central one; batching it with
central positions throws that saving away. On VGG16 at 224x224 with a 16-pixel
patch the grid-wide speedup R is about 9 but one uniform size per layer only
reaches about 6.5.

Two observations make the best batching cheap to find:

- Geometry is separable: a position's region height at every layer depends
  only on its row ``y`` and its width only on its column ``x``. Sorting the
  positions by (row profile, column profile) puts every set of positions with
  identical regions at all layers next to each other.
- In a fixed order, the cheapest split into contiguous batches of at most
  ``plan.batch_size`` is a 1-D partition problem, solved exactly by dynamic
  programming: ``best[j] = min_i best[i] + cost(i, j)``, where ``cost`` is the
  batch's incremental FLOPs at its per-layer maximum sizes, plus the gather
  cost, plus a fixed cost per batch: a call per layer and one pass over the
  weights (``incremental.batch_overhead``), so small batches must pay for
  themselves.

The rule tries the (row, column) order and the order by descending cost and
keeps the cheaper; the schedule's ``order`` and ``bounds`` (batch start offsets
into ``order``, with ``len(order)`` appended) describe the result.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from kql.planner.ir import Kind
from kql.planner.geometry import window_extent
from kql.planner.rules.incremental import GATHER_COST, batch_overhead, gathered_channels


def mqo_batches(plan):
    """Choose the schedule's ``order`` and ``bounds`` (changes the plan in
    place; a no-op for naive plans)."""
    if not plan.incremental:
        return plan
    n = plan.n_positions
    cap = max(1, int(plan.batch_size))
    model = _BatchCost(plan)
    candidates = [("cost order", plan.order),  # set by the incremental rule
                  ("row/column order", model.row_column_order())]
    best = None
    for name, order in candidates:
        bounds, total = model.partition(order, cap)
        if best is None or total < best[2] - 1e-9 * total:
            best = (name, order, total, bounds)
    name, order, total, bounds = best
    plan.schedule = dataclasses.replace(plan.schedule, order=order, bounds=bounds)
    sizes = np.diff(bounds)
    uniform = -(-n // cap)
    plan.record("mqo_batches", f"{len(sizes)} batches of {sizes.min()}..{sizes.max()} positions in {name} "
                               f"(vs {uniform} uniform batches of {cap}): each batch is one call per layer "
                               f"at its own largest patch size")
    return plan


def batches_for(plan, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, bounds)`` for running only ``positions`` (flat grid indices)
    of an incremental plan, as drill-down's stage two does: the plan's order
    restricted to them, split into batches by the same partition."""
    keep = np.zeros(plan.n_positions, bool)
    keep[positions] = True
    order = plan.order[keep[plan.order]]
    if len(order) == 0:
        return order, np.zeros(1, dtype=np.int64)
    bounds, _ = _BatchCost(plan).partition(order, max(1, int(plan.batch_size)))
    return order, bounds


class _BatchCost:
    """Cost of running a set of positions as one batch, from the layers that
    run incrementally: FLOPs at the batch's largest size per layer, the
    elements gathered for local and merge layers, and a fixed per-call cost."""

    def __init__(self, plan):
        graph, regions = plan.graph, plan.regions
        layers = [l for l in graph.layers()
                  if l.kind in (Kind.POINT, Kind.LOCAL, Kind.MERGE) and l.spatial
                  and l.name not in plan.full_layers]
        nd = plan.ndim
        # per axis: (positions, layers) extents of every position's region
        self.sizes = [np.stack([regions[l.name].size(a) for l in layers], 1) if layers
                      else np.zeros((plan.n_positions, 0), np.int64) for a in range(nd)]
        self.per_pixel = np.array([float(l.flops) / math.prod(l.out_hw) for l in layers])
        # Gathered elements: the read-in window a*n + b per axis (geometry.window_extent).
        self.gather = np.array([GATHER_COST * gathered_channels(l) for l in layers])
        extents = np.array([window_extent(l) for l in layers], dtype=np.int64).reshape(-1, nd, 2)
        self.a, self.b = extents[:, :, 0].T, extents[:, :, 1].T  # (axes, layers)
        self.overhead = batch_overhead(graph)
        self.plan = plan

    @property
    def h(self) -> np.ndarray:
        return self.sizes[-2]

    @property
    def w(self) -> np.ndarray:
        return self.sizes[-1]

    def row_column_order(self) -> np.ndarray:
        """Positions sorted by (row profile, column profile), largest first, so
        positions with equal regions at every layer are contiguous; on a
        volume by (slice, row, column) profile: the geometry is separable
        along every axis."""
        ranks = [_profile_rank(n, self.per_pixel) for n in self.sizes]
        return np.lexsort((np.arange(len(ranks[0])), *ranks[::-1]))

    def batch_costs(self, *largest_and_counts) -> np.ndarray:
        """Cost of batches of ``counts`` positions whose per-layer largest
        sizes along each axis are rows of the arrays before it
        (``batch_costs(hmax, wmax, counts)``; ``dmax`` first on a volume)."""
        *largest, counts = largest_and_counts
        cells = math.prod(largest)
        flops = cells @ self.per_pixel
        window = math.prod(np.where(m > 0, m * a + b, 0) for m, a, b in zip(largest, self.a, self.b))
        gathered = window @ self.gather
        return counts * (flops + gathered) + self.overhead

    def partition(self, order: np.ndarray, cap: int) -> tuple[np.ndarray, float]:
        """Cheapest split of ``order`` into contiguous batches of at most
        ``cap`` positions: (bounds, total cost)."""
        n = len(order)
        sizes = [m[order] for m in self.sizes]
        best = np.full(n + 1, np.inf)
        best[0] = 0.0
        back = np.zeros(n + 1, dtype=np.int64)
        counts = np.arange(1, cap + 1, dtype=np.float64)
        for i in range(n):
            j = min(n, i + cap)
            largest = [np.maximum.accumulate(m[i:j], axis=0) for m in sizes]
            cand = best[i] + self.batch_costs(*largest, counts[:j - i])
            better = cand < best[i + 1:j + 1]
            best[i + 1:j + 1] = np.where(better, cand, best[i + 1:j + 1])
            back[i + 1:j + 1] = np.where(better, i, back[i + 1:j + 1])
        cuts = [n]
        while cuts[-1] > 0:
            cuts.append(int(back[cuts[-1]]))
        return np.array(cuts[::-1], dtype=np.int64), float(best[n])


def _profile_rank(sizes: np.ndarray, per_pixel: np.ndarray) -> np.ndarray:
    """Rank of each position's size profile along one axis (0 = the most
    expensive): positions with the same profile get the same rank."""
    profiles, inverse = np.unique(sizes, axis=0, return_inverse=True)
    weight = profiles.astype(np.float64) @ per_pixel if len(per_pixel) else np.zeros(len(profiles))
    # Most expensive first; ties broken by the profile itself so ranks are distinct per profile.
    by_cost = np.lexsort((np.arange(len(profiles)), -weight))
    rank = np.empty(len(profiles), dtype=np.int64)
    rank[by_cost] = np.arange(len(profiles))
    return rank[inverse.reshape(-1)]
