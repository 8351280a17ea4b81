"""Rule: choose between naive, exact (incremental) and approximate inference."""
from __future__ import annotations

from kql.planner.memory import bytes_per_position


def choose_mode(plan, settings=None):
    """Set ``plan.mode`` to 'naive', 'exact' or 'approx' (changes the plan in place).

    With no mode given (``SET mode = 'auto'``) the fastest mode with exact
    results, exact incremental inference, is chosen: the incremental executor
    runs every traced graph (a layer it cannot run incrementally is computed
    in full, with everything after it). The threshold of an approximate plan
    is the next rule's (``approximate``).

    >>> # SELECT ... NAIVE           -> naive
    >>> # SELECT ... APPROX TAU 0.5  -> approx
    >>> # SELECT ... (no mode, auto) -> exact
    """
    asked = plan.query.mode or (settings.mode if settings is not None else "auto")
    if asked == "naive":
        plan.mode = "naive"
        plan.record("choose_mode", "NAIVE: batched full re-inference")
    elif asked in ("exact", "approx"):
        plan.mode = asked
        plan.record("choose_mode", "EXACT: incremental inference" if asked == "exact"
                    else "APPROX: incremental inference with projective-field thresholding")
    else:
        plan.mode = "exact"
        plan.record("choose_mode", "no mode given: exact incremental inference")
    if plan.mode == "naive":
        plan.per_position_bytes = bytes_per_position(plan.graph)
    return plan
