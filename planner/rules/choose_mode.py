"""Rule: choose between naive, exact (incremental) and approximate inference."""
from __future__ import annotations

from kql.errors import PlanError
from kql.planner.memory import bytes_per_position


def incremental_available(plan) -> tuple[bool, str]:
    """Whether the exact incremental executor can run this plan, and if not, why."""
    try:
        from kql.executor import incremental
    except ImportError:
        return False, "exact incremental inference is not available yet in this build"
    return incremental.supports(plan)


def choose_mode(plan, settings=None):
    """Set ``plan.mode`` to 'naive', 'exact' or 'approx' (changes the plan in place).

    An explicit ``EXACT`` or ``APPROX`` that cannot run is an error, never a
    silent fallback; with no mode given (``SET mode = 'auto'``) the fastest
    mode with exact results is chosen and the reason recorded. The threshold
    of an approximate plan is the next rule's (``approximate``).

    >>> # SELECT ... NAIVE           -> naive
    >>> # SELECT ... APPROX TAU 0.5  -> approx
    >>> # SELECT ... (no mode, auto) -> exact when available, else naive
    """
    asked = plan.query.mode or (settings.mode if settings is not None else "auto")
    ok, why = incremental_available(plan)
    if asked == "naive":
        plan.mode = "naive"
        plan.record("choose_mode", "NAIVE: batched full re-inference")
    elif asked in ("exact", "approx"):
        keyword = asked.upper()
        if not ok:
            raise PlanError(f"{keyword} cannot run: {why}; use NAIVE")
        plan.mode = asked
        plan.record("choose_mode", "EXACT: incremental inference" if asked == "exact"
                    else "APPROX: incremental inference with projective-field thresholding")
    else:
        plan.mode = "exact" if ok else "naive"
        plan.record("choose_mode", "no mode given: exact incremental inference" if ok
                    else f"no mode given: naive, because {why}")
    if plan.mode == "naive":
        plan.per_position_bytes = bytes_per_position(plan.graph)
    plan.root.find("Infer").detail("mode", plan.mode)
    return plan
