"""The approximate path on volumes, judged on a 3-D CNN really trained in the
tests (``kql.zoo.trained_fmnist3d_net``: Fashion-MNIST images as slabs of
16x16x16 volumes at varying depth and thickness, about 80% accuracy).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kql
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


# -- APPROX SSIM 0.9 as a contract: tuned on some inputs, holding on others ---------------------
def _inputs(dims: int, start: int, count: int) -> torch.Tensor:
    images, _ = load_fashion_mnist("test")
    chosen = images[start:start + count]
    return zoo.fmnist_input(chosen) if dims == 2 else zoo.fmnist_volumes(chosen, seed=start)


@pytest.fixture(params=[2, 3], ids=["images", "volumes"])
def trained(request):
    """(dims, net, patch, stride): the 2-D net at patch 4 / stride 2 on 28x28
    (13x13 positions), the 3-D one at patch 4 / stride 2 on 16^3 (7^3)."""
    net = request.getfixturevalue("fmnist_net" if request.param == 2 else "fmnist3d_net")
    return request.param, net, 4, 2


def test_approx_ssim_contract_holds_on_inputs_not_used_for_tuning(trained):
    from kql.tune import heatmap_ssim, tune_tensors
    dims, net, patch, stride = trained
    cal = tune_tensors(net, _inputs(dims, 0, 6), patch, stride, taus=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4))
    assert cal.n_images >= 4 and len(cal.input_hw) == dims
    tau = cal.tau_for(0.9)
    assert tau < 1, f"no τ below 1 reaches SSIM 0.9 on the tuning inputs: {cal.ssim}"
    held_out = _inputs(dims, 500, 10)
    reached = []
    for n, exact in enumerate(kql.occlusion(net, held_out, patch, stride)):
        if np.ptp(exact.heatmap) < 1e-3:
            continue
        approx = kql.occlusion(net, held_out[n:n + 1], patch, stride, target=exact.label, mode="approx",
                               tau=tau)[0]
        assert approx.heatmap.shape == exact.heatmap.shape and approx.heatmap.ndim == dims
        reached.append(heatmap_ssim(exact.heatmap, approx.heatmap))
    assert len(reached) >= 6
    # the contract: at least COVERAGE (80 %) of the inputs reach the target
    assert np.mean(np.asarray(reached) >= 0.9) >= 0.8, reached
