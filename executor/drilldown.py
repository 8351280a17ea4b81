"""Adaptive drill-down execution: stage one on the coarse grid, stage two on
the selected positions of the query's grid (``planner.drilldown``)."""
from __future__ import annotations

import numpy as np

from kql.planner.drilldown import interpolate, select


def occlusion_probabilities(plan, model, label: int, executor, progress: str = "auto"):
    """Probabilities on the query's grid (flat, row-major), the seconds
    taken, and what each stage did: ``{"stage one": seconds, "stage two":
    seconds, "positions": (stage one, stage two), "computed": mask}``.

    ``executor(mode)`` returns the module that runs a plan of that mode.
    """
    dd = plan.drilldown
    one = dd.stage_one
    coarse, t1 = executor(one.mode).occlusion_probabilities(one, model, label, progress)
    coarse = coarse.reshape(len(one.ys), len(one.xs))
    estimate = interpolate(one.ys, one.xs, coarse, plan.ys, plan.xs).astype(np.float32)
    # Positions of the coarse grid are on the fine grid: keep their computed
    # values exactly (interpolation at a node returns it, up to rounding).
    estimate[dd.on_coarse] = coarse.ravel()
    chosen = select(estimate, dd.n_select)
    todo = chosen[~dd.on_coarse.ravel()[chosen]]
    fine, t2 = executor(plan.mode).occlusion_probabilities(plan, model, label, progress, positions=todo)
    out = estimate.ravel().copy()
    out[todo] = fine[todo]
    computed = dd.on_coarse.ravel().copy()
    computed[todo] = True
    info = {"stage one": t1, "stage two": t2, "positions": (one.n_positions, len(todo)),
            "computed": computed.reshape(dd.on_coarse.shape)}
    return out, t1 + t2, info
