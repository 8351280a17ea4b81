"""Rule: attach the runtime estimate (seconds on this machine) to the plan."""
from __future__ import annotations

from kql.planner.runtime import RuntimeEstimate


def estimate_runtime(plan, timings=None):
    """Set ``plan.runtime`` to a :class:`~kql.planner.runtime.RuntimeEstimate`
    (changes the plan in place). It is computed when first read, which EXPLAIN
    does: planning a SELECT never calibrates. The first EXPLAIN of a model on
    this machine times a few batches of the plan (cached on disk), later ones
    only sum the calibrated per-layer costs over the plan's batches.

    ``timings(plan) -> LayerTimings`` measures; the front end hands the
    executor's (``kql.executor.timing_cache.layer_timings``). Without it the
    plan has no runtime estimate.

    >>> import kql
    >>> plan = kql.connect().plan("SELECT HEATMAP FROM coffee USING resnet18 PATCH 16 STRIDE 8")  # doctest: +SKIP
    >>> plan.runtime.get().seconds  # doctest: +SKIP
    2.7
    """
    plan.runtime = None if timings is None else RuntimeEstimate(plan, timings)
    return plan
