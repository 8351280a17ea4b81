"""The optimizer: an ordered tuple of rules applied to a copy of the plan.

Each rule lives in ``planner/rules/<name>.py`` as one public function of the
same name; it receives the plan and only the keyword arguments it declares,
and records what it decided with ``plan.record`` so EXPLAIN can show why the
plan looks the way it does.
"""
from __future__ import annotations

import inspect

from kql.planner.drilldown import plan_drilldown
from kql.planner.rules.approximate import approximate
from kql.planner.rules.batch_size import batch_size
from kql.planner.rules.choose_mode import choose_mode
from kql.planner.rules.estimate_cost import estimate_cost
from kql.planner.rules.estimate_runtime import estimate_runtime
from kql.planner.rules.gather_backend import gather_backend
from kql.planner.rules.incremental import incremental
from kql.planner.rules.mqo_batches import mqo_batches
from kql.planner.rules.resolve_label import resolve_label
from kql.planner.rules.resolve_region import resolve_region

RULES = (
    resolve_region,
    resolve_label,
    choose_mode,
    approximate,
    incremental,
    batch_size,
    mqo_batches,
    gather_backend,
    estimate_cost,
    estimate_runtime,
)


def optimize(plan, rules=RULES, **kwargs):
    """Copy ``plan`` once and run each rule on the copy, in order.

    Rules change the copy in place and return it (a rule may also return a
    new plan). ``kwargs`` (e.g. ``settings``) reach only rules that declare them.
    A ``DRILLDOWN`` query also gets its coarse stage one, optimized the same
    way (``planner.drilldown``).
    """
    bound = plan
    plan = plan.copy()
    for rule in rules:
        params = inspect.signature(rule).parameters
        plan = rule(plan, **{k: v for k, v in kwargs.items() if k in params})
    if plan.query.drilldown is not None:
        # Stage one is the same query at a coarser stride, optimized from the
        # bound plan by the same rules.
        plan = plan_drilldown(bound, plan, lambda p, **kw: optimize(p, rules, **kw), **kwargs)
    return plan
