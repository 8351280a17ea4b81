"""Adaptive drill-down execution: stage one on the coarse grid, stage two on
the positions of the query's grid the planner picks from stage one's values
(``planner.drilldown``: ``plan.drilldown.stage_two``, handed in with the plan)."""
from __future__ import annotations


def occlusion_probabilities(plan, model, label: int, executor_for, progress: str = "auto"):
    """Probabilities on the query's grid (flat, row-major), the seconds
    taken, and what each stage did: ``{"stage one": seconds, "stage two":
    seconds, "positions": (stage one, stage two), "computed": mask}``.

    ``executor_for(mode)`` returns the module that runs a plan of that mode.
    """
    dd = plan.drilldown
    one = dd.stage_one
    coarse, t1 = executor_for(one.mode).occlusion_probabilities(one, model, label, progress)
    two = dd.stage_two(plan, coarse)  # the planner's decision, made now that stage one's values exist
    fine, t2 = executor_for(plan.mode).occlusion_probabilities(plan, model, label, progress,
                                                               batches=(two.order, two.bounds))
    out = two.estimate.ravel().copy()
    out[two.positions] = fine[two.positions]
    info = {"stage one": t1, "stage two": t2, "positions": (one.n_positions, len(two.positions)),
            "computed": two.computed}
    return out, t1 + t2, info
