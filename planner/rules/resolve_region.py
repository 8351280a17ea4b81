"""Rule: validate patch, stride and region, and lay out the grid of positions."""
from __future__ import annotations

from kql.ast import Region
from kql.errors import PlanError
from kql.planner.geometry import grid_positions  # noqa: F401  (re-exported: the grid rule lives here)
from kql.planner.plan import Grid


def resolve_region(plan):
    """Check PATCH/STRIDE/REGION against the model input and set ``plan.grid``
    (changes the plan in place).

    Coordinates are pixels of the model's input (after resizing).
    """
    q = plan.query
    (ph, pw), (sy, sx) = plan.patch, plan.stride
    H, W = plan.input_hw
    if ph < 1 or pw < 1:
        raise PlanError(f"patch must be at least 1x1, got {ph}x{pw}")
    if sy < 1 or sx < 1:
        bad = sy if sy < 1 else sx
        raise PlanError(f"stride must be at least 1, got {bad}")
    if q.region is None:
        region = Region(0, 0, W, H)
    else:
        region = q.region
        r = region
        if r.x1 <= r.x0 or r.y1 <= r.y0:
            raise PlanError(
                f"region ({r.x0}, {r.y0}, {r.x1}, {r.y1}) is empty: REGION takes (x0, y0, x1, y1), "
                f"the left, top, right and bottom edges, with x0 < x1 and y0 < y1")
        if not (0 <= r.x0 < r.x1 <= W and 0 <= r.y0 < r.y1 <= H):
            raise PlanError(
                f"region ({r.x0}, {r.y0}, {r.x1}, {r.y1}) does not lie inside the image {H}x{W} "
                f"(REGION takes (x0, y0, x1, y1) with 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H})")
    rh, rw = region.y1 - region.y0, region.x1 - region.x0
    if ph > rh or pw > rw:
        where = f"image {H}x{W}" if q.region is None else f"region {rh}x{rw}"
        raise PlanError(f"patch {ph}x{pw} does not fit {where}")
    plan.grid = Grid(region, grid_positions(region.y0, region.y1, ph, sy),
                     grid_positions(region.x0, region.x1, pw, sx))
    uneven = []
    if (rh - ph) % sy:
        uneven.append("last row")
    if (rw - pw) % sx:
        uneven.append("last column")
    note = f" ({' and '.join(uneven)} aligned to the region's edge)" if uneven else ""
    plan.record("resolve_region", f"grid {len(plan.ys)}x{len(plan.xs)} = {plan.n_positions} positions{note}")
    return plan
