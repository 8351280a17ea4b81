"""Rule: validate patch, stride and region, and lay out the grid of positions."""
from __future__ import annotations

import math

from kql.ast import Region
from kql.errors import PlanError
from kql.planner.geometry import grid_positions  # noqa: F401  (re-exported: the grid rule lives here)
from kql.planner.plan import Grid

_AXES = {2: ("row", "column"), 3: ("slice", "row", "column")}


def _x(sizes) -> str:
    return "x".join(map(str, sizes))


def region_bounds(region, ndim: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per spatial axis of a query's REGION, in tensor order."""
    bounds = tuple((int(a), int(b)) for a, b in region.bounds)
    if len(bounds) != ndim:
        kind = {2: "an image", 3: "a volume"}[ndim]
        raise PlanError(f"REGION {region.text()} has {len(bounds)} axes; "
                        f"the model takes {kind}: REGION takes "
                        + ("(x0, y0, x1, y1)" if ndim == 2 else "(x0, y0, z0, x1, y1, z1)"))
    return bounds


def whole_region(shape) -> Region:
    """The REGION of the whole input of spatial ``shape``."""
    return Region.from_bounds(tuple((0, n) for n in shape))


def resolve_region(plan):
    """Check PATCH/STRIDE/REGION against the model input and set ``plan.grid``
    (changes the plan in place).

    Coordinates are pixels (voxels) of the model's input (after resizing).
    Every spatial axis is laid out alone (``geometry.grid_positions``).
    """
    q = plan.query
    ndim = plan.ndim
    patch, stride = plan.patch, plan.stride   # PlanError on a rank mismatch
    shape = plan.input_hw
    if any(p < 1 for p in patch):
        raise PlanError(f"patch must be at least {_x((1,) * ndim)}, got {_x(patch)}")
    if any(s < 1 for s in stride):
        bad = next(s for s in stride if s < 1)
        raise PlanError(f"stride must be at least 1, got {bad}")
    if q.region is None:
        region = whole_region(shape)
        bounds = region.bounds
    else:
        region = q.region
        bounds = region_bounds(region, ndim)
        text = region.text()
        if ndim == 2:
            r = region
            if r.x1 <= r.x0 or r.y1 <= r.y0:
                raise PlanError(
                    f"region {text} is empty: REGION takes (x0, y0, x1, y1), "
                    f"the left, top, right and bottom edges, with x0 < x1 and y0 < y1")
            H, W = shape
            if not (0 <= r.x0 < r.x1 <= W and 0 <= r.y0 < r.y1 <= H):
                raise PlanError(
                    f"region {text} does not lie inside the image {H}x{W} "
                    f"(REGION takes (x0, y0, x1, y1) with 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H})")
        else:
            if any(b <= a for a, b in bounds):
                raise PlanError(f"region {text} is empty: REGION takes (x0, y0, z0, x1, y1, z1), "
                                f"with x0 < x1, y0 < y1 and z0 < z1")
            if not all(0 <= a < b <= n for (a, b), n in zip(bounds, shape)):
                D, H, W = shape
                raise PlanError(f"region {text} does not lie inside the volume {_x(shape)} (REGION takes "
                                f"(x0, y0, z0, x1, y1, z1) with 0 <= x0 < x1 <= {W}, 0 <= y0 < y1 <= {H} "
                                f"and 0 <= z0 < z1 <= {D})")
    sizes = region.shape
    if any(p > m for p, m in zip(patch, sizes)):
        what = "image" if ndim == 2 else "volume"
        where = f"{what} {_x(shape)}" if q.region is None else f"region {_x(sizes)}"
        raise PlanError(f"patch {_x(patch)} does not fit {where}")
    starts = [grid_positions(a, b, p, s) for (a, b), p, s in zip(bounds, patch, stride)]
    plan.grid = Grid(region, *starts, bounds=bounds)
    uneven = [f"last {name}" for name, m, p, s in zip(_AXES[ndim], sizes, patch, stride) if (m - p) % s]
    note = f" ({' and '.join(uneven)} aligned to the region's edge)" if uneven else ""
    counts = _x(len(a) for a in starts)
    plan.record("resolve_region", f"grid {counts} = {math.prod(len(a) for a in starts)} positions{note}")
    return plan
