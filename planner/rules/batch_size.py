"""Rule: size batches of positions so one batch fits the memory budget."""
from __future__ import annotations

from kql.errors import PlanError
from kql.planner.plan import format_bytes

#: Past this, a bigger CPU batch stops paying off and only delays progress updates.
MAX_AUTO_BATCH = 128


def batch_size(plan, settings=None):
    """Set ``plan.batch_size`` (changes the plan in place).

    The number of positions per batch comes from ``BATCH n``, else from
    ``SET batch_size``, else from ``memory_limit / bytes per position`` (the
    mode rule sets ``plan.per_position_bytes``). A requested batch larger
    than the budget allows is reduced, with a warning: the budget is a limit,
    not a hint.
    """
    limit = settings.memory_limit if settings is not None else 2 * 2**30
    per = max(int(plan.per_position_bytes), 1)
    fits = limit // per
    if fits < 1:
        raise PlanError(f"memory_limit {format_bytes(limit)} is too small: one position needs "
                        f"{format_bytes(per)} (SET memory_limit = '{_suggest(per)}')")
    asked = plan.query.batch
    if asked is not None and asked < 1:
        raise PlanError(f"BATCH must be at least 1, got {asked}")
    if asked is None and settings is not None and settings.batch_size > 0:
        asked = settings.batch_size
    n = max(plan.n_positions, 1)
    if asked is None:
        size = int(min(fits, n, MAX_AUTO_BATCH))
        why = f"{format_bytes(per)} per position, memory_limit {format_bytes(limit)}"
    elif asked > fits:
        size = int(min(fits, n))
        plan.warnings.append(f"BATCH {asked} needs {format_bytes(asked * per)}, over memory_limit "
                             f"{format_bytes(limit)}: using batches of {size}")
        why = f"BATCH {asked} reduced to fit memory_limit {format_bytes(limit)}"
    else:
        size = int(min(asked, n))
        why = f"BATCH {asked}"
    plan.batch_size = size
    batches = -(-n // size)
    plan.root.find("Infer").detail("batch", f"{size} ({batches} batches, "
                                              f"≈{format_bytes(size * per)} per batch)")
    plan.record("batch_size", f"batch {size}: {why}")
    return plan


def _suggest(per: int) -> str:
    gib = per * 4 / 2**30
    return f"{max(1, round(gib))}GB" if gib >= 1 else f"{max(1, round(per * 4 / 2**20))}MB"
