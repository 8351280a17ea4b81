"""Helpers shared by the test files: random images, a small CNN, and a naive
reference for exactness checks (trained-like weights for random nets are the
library's: ``kql.sources.models.trained_like``).

Import them as ``from helpers import ...`` (pytest puts ``tests/`` on the
path). Fixtures live in ``conftest.py``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An ``h x w`` RGB float32 image with values in [0, 1)."""
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def rand_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An ``h x w`` RGB uint8 image (what a decoded file gives)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def small_cnn(widths: tuple[int, int] = (4, 6), classes: int = 3, seed: int = 0) -> nn.Module:
    """conv 3x3, ReLU, max pool 2, conv 3x3, ReLU, global average pool, Linear; in eval mode."""
    torch.manual_seed(seed)
    a, b = widths
    return nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(a, b, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, classes)).eval()


def patch_sensitive_cnn(size: int, seed: int = 0) -> nn.Module:
    """For a ``size x size`` input: conv 3x3, ReLU, max pool 2, conv 5x5, ReLU,
    conv 3x3, ReLU, avg pool 2, Linear over the pixels (5 classes), its weights
    scaled so the output really depends on where the patch is; in eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * (size // 4) ** 2, 5))
    with torch.no_grad():
        net[-1].weight.mul_(20)
    return net.eval()


def naive_outputs(plan, model) -> torch.Tensor:
    """Independent reference for a bound plan: a plain loop over its positions,
    one occluded image each; the model's raw outputs, ``(positions, classes)``."""
    ys, xs = plan.positions()
    ph, pw = plan.patch
    outs = []
    with torch.inference_mode():
        for y, x in zip(ys.tolist(), xs.tolist()):
            img = plan.input.clone()
            img[:, y:y + ph, x:x + pw] = plan.fill.view(-1, 1, 1)
            outs.append(model(img[None]).reshape(-1))
    return torch.stack(outs)
