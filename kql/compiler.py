"""The one path from a parsed SELECT to a plan, and from a plan to a result.

Every front end uses it: the API (``Connection.plan`` / ``execute``), the
multi-image jobs (``kql.jobs.batch.ImageExplainer``), TUNE and the web page
(through the API). So a query planned anywhere is bound, optimized and given
its estimates the same way, and a result is assembled and saved the same way.

- :func:`compile_select`: check ``INTO``, bind, optimize (which attaches the
  cost and the runtime estimates); the plan's ``timings`` say how long
  binding and optimizing took.
- :func:`run`: execute a plan, assemble the :class:`~kql.result.HeatmapResult`
  and write ``INTO``. The executor computes; writing files is the front end's.

The planner never imports the executor: the runtime estimate is handed the
executor's profiler (:func:`kql.executor.timing_cache.layer_timings`) here,
and the approximate rule the SSIM calibrations TUNE stored (:mod:`kql.calibration`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from kql.result import HeatmapResult, check_output_path

__all__ = ["compile_select", "optimize_bound", "run"]


def compile_select(select, catalog, settings, bindings: Optional[dict] = None):
    """Bind and optimize a ``kql.ast.Select``: the
    :class:`~kql.planner.plan.Plan` it runs.

    Args:
        select: the parsed query.
        catalog: where names resolve (``kql.catalog.Catalog``).
        settings: the session's ``kql.settings.Settings``.
        bindings: names bound for this query only.

    Raises:
        kql.PlanError: anything the query gets wrong (names, INTO, PATCH...).
    """
    from kql.planner.binder import bind
    if select.into is not None:
        check_output_path(select.into)  # fail before the work, not after
    t0 = time.perf_counter()
    plan = bind(select, catalog, settings, bindings or {})
    if select.into is not None:     # now that the input is known: NIfTI only for volumes
        check_output_path(select.into, volume=getattr(plan.display, "ndim", 2) == 3)
    t1 = time.perf_counter()
    plan = optimize_bound(plan, settings)
    plan.timings = {"bind": t1 - t0, "optimize": time.perf_counter() - t1}
    return plan


def optimize_bound(plan, settings, rules=None):
    """Optimize a bound plan by the optimizer's ``RULES`` (or ``rules``),
    handing the planner the executor's profiler and the SSIM calibrations.
    :func:`compile_select` calls it after binding, the tensor API
    (``kql.tensor_api``) after ``planner.binder.bind_input``."""
    from kql import calibration
    from kql.planner.optimizer import RULES, optimize
    return optimize(plan, RULES if rules is None else rules, settings=settings, timings=_layer_timings,
                    calibrations=calibration.lookup)


def _layer_timings(plan):
    """The executor's measured layer timings of ``plan`` (cached on disk),
    looked up when called, so a test can stand in a fixed profile."""
    from kql.executor import timing_cache
    return timing_cache.layer_timings(plan)


def run(plan, progress: str = "auto", *, score: Optional[Callable] = None,
        score_name: str = "probability") -> HeatmapResult:
    """Execute ``plan`` and return its :class:`~kql.result.HeatmapResult`,
    saved when the query says ``INTO`` (atomically, after the work).

    ``score(raw model output) -> (B, K)`` tensor, named ``score_name``, is
    what the maps hold (default: the probabilities); the tensor API passes
    its own. Several labels give a map each (``HeatmapResult.maps``)."""
    from kql.executor import execute
    start = time.perf_counter()
    done = execute(plan, progress=progress, score=score)
    names = plan.spec.class_names

    def name(label):
        return names[label] if names and label < len(names) else None

    # every field of the Execution is the HeatmapResult field of that name
    # (a field added to one and not the other fails here, in every test)
    copied = {f.name: getattr(done, f.name) for f in dataclasses.fields(done)}
    copied["timings"] = {**plan.timings, **done.timings}
    result = HeatmapResult(
        **copied, label_name=name(done.label),
        label_names=None if done.labels is None else [name(i) for i in done.labels],
        ys=plan.ys, xs=plan.xs, zs=plan.grid.starts[0] if plan.ndim == 3 else None,
        patch=plan.patch, stride=plan.stride, region=plan.region,
        image=plan.display, model=plan.spec.name, mode=plan.mode,
        plan=plan, plan_text="", warnings=list(plan.warnings), output_path=None,
        tau=plan.tau, score=score_name,
    )
    if plan.query.into:
        t0 = time.perf_counter()
        result.save(plan.query.into)
        result.timings["save"] = time.perf_counter() - t0
    result.timings["total"] = time.perf_counter() - start
    return result
