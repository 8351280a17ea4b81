"""Physical execution of an optimized plan.

``execute`` runs the unoccluded reference inference (which also resolves
``LABEL PREDICTED``), then the occlusion grid with the executor the plan's
mode names, and returns what it computed as an :class:`Execution`. The
front end (``kql.compiler.run``) turns that into a ``HeatmapResult`` and
writes ``INTO``: the executor writes no files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from kql.executor.common import reference


@dataclass
class Execution:
    """What running a plan computed.

    Attributes:
        heatmap: float32 ``(rows, cols)`` on the plan's grid.
        label: the class index (``LABEL PREDICTED`` resolved).
        p_original: its probability on the unoccluded image.
        timings: ``reference``, ``occlusion`` (and for DRILLDOWN ``stage
            one`` / ``stage two``) in seconds.
        peak_memory: bytes the occlusion stage added at its peak.
        computed, stage_positions: DRILLDOWN only: the mask of positions
            computed (the rest interpolated) and the positions of each stage.
    """
    heatmap: np.ndarray
    label: int
    p_original: float
    timings: dict = field(default_factory=dict)
    peak_memory: Optional[int] = None
    computed: Optional[np.ndarray] = None
    stage_positions: Optional[tuple[int, int]] = None


def executor_for(mode: str):
    """The module that runs the occlusion grid of a plan of this mode."""
    if mode == "naive":
        from kql.executor import naive
        return naive
    from kql.executor import incremental
    return incremental


def execute(plan, progress: str = "auto") -> Execution:
    """Run ``plan``: the reference inference, then every position of its grid."""
    from kql.executor.allocator import reuse_freed_memory
    with reuse_freed_memory(plan.allocator == "reuse"):
        return _run(plan, progress)


def _run(plan, progress) -> Execution:
    from kql.executor.memory import PeakMemory

    start = time.perf_counter()
    model = plan.spec.module.to(plan.device).eval()
    label, p_original, _ = reference(plan, model)
    t_ref = time.perf_counter() - start
    stages = None
    with PeakMemory(plan.device) as mem:
        if plan.drilldown is not None:
            from kql.executor import drilldown
            values, t_occ, stages = drilldown.occlusion_probabilities(plan, model, label, executor_for, progress)
        else:
            values, t_occ = executor_for(plan.mode).occlusion_probabilities(plan, model, label, progress)
    done = Execution(heatmap=values.reshape(len(plan.ys), len(plan.xs)), label=label, p_original=p_original,
                     timings={"reference": t_ref, "occlusion": t_occ}, peak_memory=mem.peak)
    if stages is not None:
        done.timings.update({"stage one": stages["stage one"], "stage two": stages["stage two"]})
        done.computed = stages["computed"]
        done.stage_positions = stages["positions"]
    return done
