"""The naive executor: batched full re-inference of every occluded image.

This is the reference every faster mode is checked against (Krypton eqs. 1-6),
so it stays as plain as possible: one occluded copy of the input per position,
the unmodified model, softmax, the label's probability.
"""
from __future__ import annotations

import numpy as np
import torch

from kql.executor.common import occlude, probabilities, run_batches


def occlusion_probabilities(plan, model, label: int, progress: str = "auto") -> tuple[np.ndarray, float]:
    """Probability of ``label`` at every position of the plan's grid
    (row-major, flat) and the seconds it took."""
    ys, xs = plan.positions()
    out = np.empty(len(ys), dtype=np.float32)
    x = plan.input.to(plan.device)

    def step(sl: slice) -> None:
        batch = occlude(x, plan.fill, ys[sl], xs[sl], plan.patch)
        out[sl] = probabilities(model(batch))[:, label].cpu().numpy()

    with torch.inference_mode():
        seconds = run_batches(len(ys), plan.batch_size, step, progress=progress, plan=plan)
    return out, seconds

