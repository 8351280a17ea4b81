"""Rule: size batches of positions so one batch fits the memory budget."""
from __future__ import annotations

from kql.errors import PlanError
from kql.planner.plan import format_bytes

#: Largest automatic batch, by device and mode. On the CPU big batches lose:
#: their activations fall out of cache. Measured on this 2-core machine
#: (patch 16, stride 4; ms per position at batch 8 / 32 / 128):
#: naive resnet18 13.8 / 16.7 / 21.3, inception_v3 59.8 / 74.1 / 82.1,
#: vgg16 125.6 / 129.7 / -; exact resnet18 5.3 / 4.6 / 4.6,
#: inception_v3 26.1 / 24.7 / 33.2, vgg16 21.2 / 15.5 / - (64: 15.2). Exact
#: batches carry small patches, so they stay efficient up to ~32 and then pay
#: the weights' pass less often. A GPU wants large batches.
MAX_AUTO_BATCH = {("cpu", "naive"): 8, ("cpu", "exact"): 32, ("cpu", "approx"): 32}
MAX_AUTO_BATCH_GPU = 128


def auto_cap(plan) -> int:
    """The largest batch ``batch_size`` picks by itself for this plan."""
    return MAX_AUTO_BATCH.get((plan.device, plan.mode), MAX_AUTO_BATCH_GPU)


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
    # An incremental plan keeps the views (every materialized layer output of
    # the unoccluded input) for the whole run: they come off the budget first.
    # Small on images; a 3-D network's views can take hundreds of MiB.
    views = int(plan.schedule.view_bytes) if plan.incremental and plan.schedule is not None else 0
    fits = (limit - views) // per
    if fits < 1:
        kept = f" besides the views' {format_bytes(views)}" if views else ""
        raise PlanError(f"memory_limit {format_bytes(limit)} is too small: one position needs "
                        f"{format_bytes(per)}{kept} (SET memory_limit = '{_suggest(per + views)}')")
    asked = plan.query.batch
    if asked is not None and asked < 1:
        raise PlanError(f"BATCH must be at least 1, got {asked}")
    if asked is None and settings is not None and settings.batch_size > 0:
        asked = settings.batch_size
    n = max(plan.n_positions, 1)
    if asked is None:
        cap = auto_cap(plan)
        size = int(min(fits, n, cap))
        views_text = f" less the views' {format_bytes(views)}" if views else ""
        why = (f"{format_bytes(per)} per position, memory_limit {format_bytes(limit)}{views_text}, at most {cap} "
               f"automatically on {plan.device} in {plan.mode} mode")
    elif asked > fits:
        size = int(min(fits, n))
        plan.warnings.append(f"BATCH {asked} needs {format_bytes(asked * per)}, over memory_limit "
                             f"{format_bytes(limit)}: using batches of {size}")
        why = f"BATCH {asked} reduced to fit memory_limit {format_bytes(limit)}"
    else:
        size = int(min(asked, n))
        why = f"BATCH {asked}"
    plan.batch_size = size
    plan.record("batch_size", f"batch {size}: {why}")
    return plan


def _suggest(per: int) -> str:
    gib = per * 4 / 2**30
    return f"{max(1, round(gib))}GB" if gib >= 1 else f"{max(1, round(per * 4 / 2**20))}MB"
