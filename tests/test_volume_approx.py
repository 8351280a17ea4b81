"""The approximate path on volumes, judged on a 3-D CNN really trained in the
tests (``kql.zoo.trained_fmnist3d_net``: Fashion-MNIST images as slabs of
16x16x16 volumes at varying depth and thickness, about 80% accuracy).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kql import zoo
from kql.datasets import load_fashion_mnist

pytestmark = pytest.mark.slow


def test_the_3d_net_has_learnt(fmnist3d_net):
    assert zoo.evaluate_fmnist3d(fmnist3d_net, 1000) >= 0.75


def test_volumes_are_deterministic_slabs():
    images, _ = load_fashion_mnist("test")
    a, b = zoo.fmnist_volumes(images[:50], seed=3), zoo.fmnist_volumes(images[:50], seed=3)
    assert torch.equal(a, b) and a.shape == (50, 1, 16, 16, 16)
    background = float(a.min())                                   # empty voxels: (0 - mean) / std
    filled = (a[:, 0] > background + 1e-6).flatten(2).any(2)      # (N, depth): slices holding the image
    thickness = filled.sum(1).numpy()
    assert thickness.min() >= 1 and thickness.max() <= 8
    first = filled.float().argmax(1).numpy()
    assert len(set(first.tolist())) > 3                           # the slab moves along depth
    assert not torch.equal(a, zoo.fmnist_volumes(images[:50], seed=4))
