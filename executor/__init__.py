"""Physical execution of an optimized plan.

``execute`` runs the unoccluded reference inference (which also resolves
``LABEL PREDICTED``), then the occlusion grid with the executor the plan's
mode names, and assembles a :class:`kql.result.HeatmapResult`.
"""
from __future__ import annotations

import time

from kql.errors import ExecutionError
from kql.executor.common import probabilities, reference


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
    label, p_original, probs = reference(plan, model)
    t_ref = time.perf_counter() - start
    stages = None
    several = _labels(plan, probs)
    names = plan.spec.class_names
    with PeakMemory(plan.device) as mem:
        if several is not None:
            import torch
            columns = torch.as_tensor(several, device=plan.device)
            values, t_occ = _executor(plan.mode).occlusion_scores(
                plan, model, lambda out: probabilities(out)[:, columns], progress)
        elif plan.drilldown is not None:
            from kql.executor import drilldown
            values, t_occ, stages = drilldown.occlusion_probabilities(plan, model, label, _executor, progress)
        else:
            values, t_occ = _executor(plan.mode).occlusion_probabilities(plan, model, label, progress)
    extra = {}
    if several is not None:
        extra = dict(maps=values.T.reshape(len(several), len(plan.ys), len(plan.xs)), labels=several,
                     label_names=[names[i] if names and i < len(names) else None for i in several],
                     originals=probs[several].float().cpu().numpy())
        values = values[:, 0]
    result = HeatmapResult(
        heatmap=values.reshape(len(plan.ys), len(plan.xs)),
        label=label,
        label_name=names[label] if names and label < len(names) else None,
        p_original=p_original,
        ys=plan.ys, xs=plan.xs, patch=plan.patch, stride=plan.stride, region=plan.region,
        image=plan.display, model=plan.spec.name, mode=plan.mode,
        timings={"reference": t_ref, "occlusion": t_occ},
        plan=plan, plan_text="", warnings=list(plan.warnings), output_path=None,
        peak_memory=mem.peak, tau=plan.tau, **extra,
    )
    if stages is not None:
        result.timings.update({"stage one": stages["stage one"], "stage two": stages["stage two"]})
        result.computed = stages["computed"]
        result.stage_positions = stages["positions"]
    if plan.query.into:
        t0 = time.perf_counter()
        result.save(plan.query.into)
        result.timings["save"] = time.perf_counter() - t0
    result.timings["total"] = time.perf_counter() - start

    return result


def _labels(plan, probs) -> "list[int] | None":
    """The classes of LABEL a, b, ... / TOP k / ALL (PREDICTED and TOP
    resolved with the unoccluded image's probabilities ``probs``), or None
    for a query with one label."""
    label = plan.query.label
    K = probs.shape[0]
    if label.kind == "all":
        return list(range(K))
    if label.kind == "top":
        if label.value > K:
            raise ExecutionError(f"LABEL TOP {label.value}: the model has {K} outputs")
        import torch
        return torch.argsort(probs, descending=True, stable=True)[:label.value].tolist()
    if label.kind != "list":
        return None
    out = []
    for index, _ in plan.labels:
        index = int(probs.argmax()) if index is None else index
        if index >= K:
            raise ExecutionError(f"label {index} is out of range: the model has {K} outputs (0-{K - 1})")
        if index not in out:
            out.append(index)
    return out
