"""Helpers shared by the test files: random images, a small CNN, and the
pieces of an exactness check (a naive reference, trained-like weights).

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


def trained_like(model: nn.Module) -> nn.Module:
    """Give a randomly initialised net the statistics of a trained one; returns it in eval mode.

    Fresh torchvision nets have identity BatchNorm statistics and tiny
    classifier weights, so some (MobileNetV2) output ~1e-10 whatever the
    input, and any executor would "match". Random BN statistics and a
    fan-in scaled weights make the outputs depend on the patch. LayerNorm
    gets a random affine map, and ConvNeXt's layer scale (1e-6 when fresh,
    which would let every block's residual branch vanish) a trained-like 0.1-1.
    """
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "layer_scale", None), nn.Parameter):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.9 + 0.1)
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            elif isinstance(m, nn.Conv2d):  # variance-preserving (fan-in) so the signal survives depth
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model.eval()
