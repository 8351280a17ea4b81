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
        self.h = np.stack([regions[l.name].h for l in layers], 1) if layers else np.zeros((plan.n_positions, 0))
        self.w = np.stack([regions[l.name].w for l in layers], 1) if layers else np.zeros((plan.n_positions, 0))
        self.per_pixel = np.array([float(l.flops) / (l.out_hw[0] * l.out_hw[1]) for l in layers])
        # Gathered elements: the read-in window a*n + b per axis (geometry.window_extent).
        self.gather = np.array([GATHER_COST * gathered_channels(l) for l in layers])
        extents = np.array([window_extent(l) for l in layers], dtype=np.int64).reshape(-1, 2, 2)
        self.ah, self.bh = extents[:, 0, 0], extents[:, 0, 1]
        self.aw, self.bw = extents[:, 1, 0], extents[:, 1, 1]
        self.overhead = batch_overhead(graph)
        self.plan = plan

    def row_column_order(self) -> np.ndarray:
        """Positions sorted by (row profile, column profile), largest first, so
        positions with equal regions at every layer are contiguous."""
        row_rank = _profile_rank(self.h, self.per_pixel)
        col_rank = _profile_rank(self.w, self.per_pixel)
        return np.lexsort((np.arange(len(row_rank)), col_rank, row_rank))

    def batch_costs(self, hmax: np.ndarray, wmax: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Cost of batches of ``counts`` positions whose per-layer largest
        sizes are rows of ``hmax``/``wmax``."""
        flops = (hmax * wmax) @ self.per_pixel
        win_h = np.where(hmax > 0, hmax * self.ah + self.bh, 0)
        win_w = np.where(wmax > 0, wmax * self.aw + self.bw, 0)
        gathered = (win_h * win_w) @ self.gather
        return counts * (flops + gathered) + self.overhead

    def partition(self, order: np.ndarray, cap: int) -> tuple[np.ndarray, float]:
        """Cheapest split of ``order`` into contiguous batches of at most
        ``cap`` positions: (bounds, total cost)."""
        n = len(order)
        h, w = self.h[order], self.w[order]
        best = np.full(n + 1, np.inf)
        best[0] = 0.0
        back = np.zeros(n + 1, dtype=np.int64)
        counts = np.arange(1, cap + 1, dtype=np.float64)
        for i in range(n):
            j = min(n, i + cap)
            hmax = np.maximum.accumulate(h[i:j], axis=0)
            wmax = np.maximum.accumulate(w[i:j], axis=0)
            cand = best[i] + self.batch_costs(hmax, wmax, counts[:j - i])
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
