"""Physical execution of an optimized plan.

``execute`` runs the unoccluded reference inference (which also resolves
``LABEL PREDICTED``), then the occlusion grid with the executor the plan's
mode names, and returns what it computed as an :class:`Execution`. The
front end (``kql.compiler.run``) turns that into a ``HeatmapResult`` and
writes ``INTO``: the executor writes no files.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from kql.executor.common import probabilities, reference


@dataclass
class Execution:
    """What running a plan computed. Each field is the
    :class:`~kql.result.HeatmapResult` field of the same name, which
    ``kql.compiler.run`` copies over (``dataclasses.fields``).

    Attributes:
        heatmap: float32 ``(rows, cols)`` on the plan's grid (``(nd, nh, nw)``
            grid cells on a volume).
        label: the class index (``LABEL PREDICTED`` resolved).
        p_original: its probability on the unoccluded image.
        timings: ``reference``, ``occlusion`` (and for DRILLDOWN ``stage
            one`` / ``stage two``) in seconds; for incremental plans the
            reference inference is also the materialization of the views.
        peak_memory: bytes the occlusion stage (with the views it
            materialized) added at its peak.
        computed: DRILLDOWN and adaptive refinement: the mask of positions
            computed (the rest interpolated).
        stage_positions: DRILLDOWN only: the positions of each stage.
        estimated_ssim: adaptive refinement only: the SSIM against exact its
            run-time check estimated when it stopped.
        refine_stages: adaptive refinement only: per stage ``{"stage",
            "positions", "computed", "estimated_ssim"}``.
        maps, labels, originals: several labels (or a ``score``): float32
            ``(labels, rows, cols)``, the class of each map and its score on
            the unoccluded input; ``heatmap``, ``label`` and ``p_original``
            are the first's.
    """
    heatmap: np.ndarray
    label: int
    p_original: float
    timings: dict = field(default_factory=dict)
    peak_memory: Optional[int] = None
    computed: Optional[np.ndarray] = None
    stage_positions: Optional[tuple[int, int]] = None
    estimated_ssim: Optional[float] = None
    refine_stages: Optional[list] = None
    maps: Optional[np.ndarray] = None
    labels: Optional[list[int]] = None
    originals: Optional[np.ndarray] = None


def executor_for(mode: str):
    """The module that runs the occlusion grid of a plan of this mode."""
    if mode == "naive":
        from kql.executor import naive
        return naive
    from kql.executor import incremental
    return incremental


def execute(plan, progress: str = "auto", score: Optional[Callable] = None) -> Execution:
    """Run ``plan``: the reference inference, then every position of its grid.

    ``score(raw model output) -> (B, K)`` tensor is what the maps hold
    (default: the probabilities, :func:`~kql.executor.common.probabilities`;
    the tensor API passes its ``score``). With several labels (LABEL a, b /
    TOP k / ALL) or a ``score``, one run yields every class's map
    (``Execution.maps``).
    """
    from kql.executor.allocator import reuse_freed_memory
    with reuse_freed_memory(plan.allocator == "reuse"):
        return _run(plan, progress, score)


def _run(plan, progress, score) -> Execution:
    from kql.executor import incremental
    from kql.executor.memory import PeakMemory

    start = time.perf_counter()
    model = plan.spec.module.to(plan.device).eval()
    # Incremental plans: one forward pass is the reference inference and the
    # materialization of every runner (drill-down runs two); it counts in the
    # peak memory, as the runners' own materialization did.
    runners = 0 if plan.mode == "naive" else (2 if plan.drilldown is not None else 1)
    with contextlib.ExitStack() as stack:
        if runners:
            mem = stack.enter_context(PeakMemory(plan.device))
            shared = stack.enter_context(incremental.shared_forward(runners))
        label, p_original, scores = (incremental.reference if runners else reference)(
            plan, model, score or probabilities)
        t_ref = time.perf_counter() - start
        several = plan.label_choice.classes(scores)
        if several is None and score is not None:
            several = [label]
        if runners and several is not None:
            shared["runners"] = 1  # several maps run every position in one runner (_occlusion)
        if not runners:
            mem = stack.enter_context(PeakMemory(plan.device))
        values, t_occ, stages, refined = _occlusion(plan, model, label, several, score, progress)
    shape = plan.grid.shape   # (rows, cols), or (nd, nh, nw) on a volume
    maps = None if several is None else values.T.reshape(len(several), *shape)
    done = Execution(heatmap=values.reshape(shape) if maps is None else maps[0], label=label,
                     p_original=p_original, timings={"reference": t_ref, "occlusion": t_occ},
                     peak_memory=mem.peak)
    if maps is not None:
        done.maps, done.labels = maps, several
        done.originals = scores[several].float().cpu().numpy()
        done.label, done.p_original = several[0], float(done.originals[0])
    if stages is not None:
        done.timings.update({"stage one": stages["stage one"], "stage two": stages["stage two"]})
        done.computed = stages["computed"]
        done.stage_positions = stages["positions"]
    if refined is not None:
        done.computed = refined["computed"]
        done.estimated_ssim = refined["estimated_ssim"]
        done.refine_stages = refined["stages"]
    return done


def _occlusion(plan, model, label, several, score, progress):
    """Every position of the grid: ``(values, seconds, drill-down stages, refinement)``."""
    stages = refined = None
    if plan.refine is not None and several is None:
        from kql.executor import refine
        values, t_occ, refined = refine.occlusion_probabilities(plan, model, label, progress)
    elif several is not None:
        # several maps: every position is computed (refinement and
        # drill-down choose positions for one map)
        import torch
        columns = torch.as_tensor(several, device=plan.device)
        values, t_occ = executor_for(plan.mode).occlusion_scores(
            plan, model, lambda out: (score or probabilities)(out)[:, columns], progress)
    elif plan.drilldown is not None:
        from kql.executor import drilldown
        values, t_occ, stages = drilldown.occlusion_probabilities(plan, model, label, executor_for, progress)
    else:
        values, t_occ = executor_for(plan.mode).occlusion_probabilities(plan, model, label, progress)
    return values, t_occ, stages, refined
