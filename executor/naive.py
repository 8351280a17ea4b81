"""The naive executor: batched full re-inference of every occluded image.

This is the reference every faster mode is checked against (Krypton eqs. 1-6),
so it stays as plain as possible: one occluded copy of the input per position,
the unmodified model, softmax, the label's probability.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kql.executor.common import occlude, probabilities, run_batches


def occlusion_probabilities(plan, model, label: int, progress: str = "auto",
                            batches: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, float]:
    """Probability of ``label`` at every position of the plan's grid
    (row-major, flat) and the seconds it took. The positions run in the
    plan's batches, or in ``batches`` = ``(order, bounds)`` when given
    (drill-down's stage two); the positions not run are NaN."""
    values, seconds = occlusion_scores(plan, model, lambda out: probabilities(out)[:, [label]],
                                       progress, batches)
    return (values[:, 0] if values.shape[1] else np.full(len(values), np.nan, np.float32)), seconds


def occlusion_scores(plan, model, reduce, progress: str = "auto",
                     batches: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, float]:
    """``reduce(model output)`` -- a ``(B, T)`` tensor, e.g. the probabilities
    of T labels -- at every position: ``(positions, T)`` float32, row-major,
    and the seconds it took. The positions run in the plan's batches, or in
    ``batches`` = ``(order, bounds)``; the rows not run are NaN."""
    starts = plan.positions()   # (ys, xs), or (zs, ys, xs) on a volume
    n = len(starts[0])
    out = np.full((n, 0), np.nan, dtype=np.float32)
    idx, bounds = plan.batches() if batches is None else batches
    x = plan.input.to(plan.device)

    def step(sl: slice) -> None:
        nonlocal out
        sel = idx[sl]
        batch = occlude(x, plan.fill, *(a[sel] for a in starts), plan.patch)
        values = reduce(model(batch)).float().cpu().numpy()
        if out.shape[1] != values.shape[1]:
            out = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
        out[sel] = values

    with torch.inference_mode():
        seconds = run_batches(len(idx), bounds, step, progress=progress, plan=plan)
    return out, seconds

