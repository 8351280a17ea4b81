"""Adaptive refinement execution: the anytime, coarse-to-fine executor of
``APPROX SSIM s`` (``planner.refine``).

The executor only runs positions: it materializes the views once
(:class:`~kql.executor.incremental.IncrementalRunner`), runs what the plan's
:class:`~kql.planner.refine.RefinePolicy` asks for, batch by batch (each
batch one IVM call per layer, split by the policy's ``batches``: the plan's MQO
partition restricted to the positions), and hands the computed values
back to the policy, which decides what comes next and when to stop.

Progress: one bar over the grid's positions whose description carries the
current stage and estimated SSIM (it usually stops before the end: the
positions refinement did not need). Each stage's batches go through
:func:`~kql.executor.common.run_batches`, so a
:func:`~kql.executor.common.batch_hook` sees ``(done, grid size)`` after every
batch and may cancel; Ctrl-C raises :class:`~kql.errors.QueryInterrupted`
saying how far refinement got.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from kql.errors import QueryInterrupted
from kql.executor.common import progress_bar, run_batches


def occlusion_probabilities(plan, model, label: int, progress: str = "auto"):
    """Probabilities on the query's grid (flat, row-major; on a volume the
    ``(nd, nh, nw)`` grid, depth slowest), the seconds taken
    and what refinement did: ``{"computed": mask, "estimated_ssim": float,
    "stages": [...], "positions": int}``."""
    from kql.executor.incremental import IncrementalRunner
    from kql.planner.geometry import Rects, propagate
    policy = plan.refine
    start = time.perf_counter()
    shape = plan.grid.shape   # (rows, cols), or (nd, nh, nw) on a volume
    n = plan.n_positions
    regions = plan.regions
    if regions is None:
        regions = propagate(plan.graph, Rects.from_patches(*plan.positions(), plan.patch), None)
    bar = progress_bar(n, progress, "refining", "pos")
    state = policy.start(shape, plan.batch_size)
    done = 0
    stage = "lattice"
    try:
        with torch.inference_mode():
            runner = IncrementalRunner(plan, model, regions, frozenset(plan.full_layers or ()),
                                       plan.gather_backend)
            todo = policy.initial(shape)
            while len(todo):
                order, bounds = policy.batches(plan, todo)
                values = np.full(n, np.nan)

                def step(sl: slice) -> None:
                    nonlocal done
                    idx = order[sl]
                    values[idx] = runner.run(idx, label)
                    done += len(idx)

                run_batches(len(order), bounds, step, plan=plan, bar=bar, before=done, total=n)
                policy.update(state, todo, values[todo], stage)
                bar.set_description(f"refining (est. SSIM {state.estimated_ssim:.3f})")
                stage = "refine"
                todo = policy.next(state)
    except KeyboardInterrupt:   # also run_batches' QueryInterrupted, which says less
        raise QueryInterrupted(f"interrupted during refinement after {done} of {n} positions "
                               f"(estimated SSIM {state.estimated_ssim:.3f}); nothing was written") from None
    finally:
        bar.close()
    info = {"computed": state.computed.copy(), "estimated_ssim": state.estimated_ssim,
            "stages": state.stages, "positions": int(state.computed.sum()), "error_scale": state.k}
    return state.estimate.reshape(-1).astype(np.float32), time.perf_counter() - start, info
