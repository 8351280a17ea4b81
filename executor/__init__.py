"""Physical execution of an optimized plan.

``execute`` runs the unoccluded reference inference (which also resolves
``LABEL PREDICTED``), then the occlusion grid with the executor the plan's
mode names, and assembles a :class:`kql.result.HeatmapResult`.
"""
from __future__ import annotations

import time

from kql.executor.common import reference


def _executor(mode: str):
    if mode == "naive":
        from kql.executor import naive
        return naive
    from kql.executor import incremental
    return incremental


def execute(plan, progress: str = "auto"):
    """Run ``plan`` and return a ``HeatmapResult`` (saved when the query says INTO)."""
    from kql.executor.allocator import enabled_for, reuse_freed_memory
    with reuse_freed_memory(enabled_for(plan)):
        return _run(plan, progress)


def _run(plan, progress):
    from kql.executor.memory import PeakMemory
    from kql.result import HeatmapResult

    start = time.perf_counter()
    model = plan.spec.module.to(plan.device).eval()
    label, p_original, _ = reference(plan, model)
    t_ref = time.perf_counter() - start
    stages = refined = None
    with PeakMemory(plan.device) as mem:
        if getattr(plan, "refine", None) is not None:
            from kql.executor import refine
            values, t_occ, refined = refine.occlusion_probabilities(plan, model, label, progress)
        elif plan.drilldown is not None:
            from kql.executor import drilldown
            values, t_occ, stages = drilldown.occlusion_probabilities(plan, model, label, _executor, progress)
        else:
            values, t_occ = _executor(plan.mode).occlusion_probabilities(plan, model, label, progress)
    names = plan.spec.class_names
    result = HeatmapResult(
        heatmap=values.reshape(len(plan.ys), len(plan.xs)),
        label=label,
        label_name=names[label] if names and label < len(names) else None,
        p_original=p_original,
        ys=plan.ys, xs=plan.xs, patch=plan.patch, stride=plan.stride, region=plan.region,
        image=plan.display, model=plan.spec.name, mode=plan.mode,
        timings={"reference": t_ref, "occlusion": t_occ},
        plan=plan, plan_text="", warnings=list(plan.warnings), output_path=None,
        peak_memory=mem.peak, tau=plan.tau,
    )
    if stages is not None:
        result.timings.update({"stage one": stages["stage one"], "stage two": stages["stage two"]})
        result.computed = stages["computed"]
        result.stage_positions = stages["positions"]
    if refined is not None:
        result.computed = refined["computed"]
        result.estimated_ssim = refined["estimated_ssim"]
        result.refine_stages = refined["stages"]
    if plan.query.into:
        t0 = time.perf_counter()
        result.save(plan.query.into)
        result.timings["save"] = time.perf_counter() - t0
    result.timings["total"] = time.perf_counter() - start

    return result
