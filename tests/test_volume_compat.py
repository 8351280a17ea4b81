"""Occlusion of volumes through the tensor API and the drop-ins, against the
real packages: ``kql.occlusion`` on ``(N, C, D, H, W)`` (exact = naive),
``kql.compat.captum.Occlusion`` vs ``captum.attr.Occlusion`` and
``kql.compat.monai.OcclusionSensitivity`` vs ``monai.visualize.OcclusionSensitivity``
on small 3-D nets (non-cubic volumes, patches and strides, clipped windows,
every baseline kind and MONAI mode, a bounding box), and on MONAI's
DenseNet121 and ResNet18 in 3-D (slow). Random weights get calibrated
batch-norm statistics, and every reference map must move (not be flat).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import kql

captum_attr = pytest.importorskip("captum.attr")
monai_visualize = pytest.importorskip("monai.visualize")
monai_nets = pytest.importorskip("monai.networks.nets")

from kql.compat.captum import Occlusion  # noqa: E402
from kql.compat.monai import OcclusionSensitivity  # noqa: E402

TOL = 1e-5


def calibrated(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """``model`` with fan-in scaled weights and batch-norm statistics of a
    few random volumes (one training-mode pass, cumulative averages), in eval
    mode: occluding a patch then moves every output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.randn((4, *shape), generator=g))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def small_net() -> nn.Module:
    """Every common 3-D op: padded and strided conv, batch norm, max and
    average pooling, a grouped dilated conv, a residual add, adaptive pooling."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                      nn.MaxPool3d(2))
            self.branch = nn.Sequential(nn.Conv3d(8, 8, 3, padding=2, dilation=2, groups=2), nn.BatchNorm3d(8),
                                        nn.ReLU())
            self.down = nn.Sequential(nn.Conv3d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool3d(2, 1))
            self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(12, 4))

        def forward(self, x):
            h = self.stem(x)
            return self.head(self.down(h + self.branch(h)))
    return Net()


SHAPE = (1, 16, 20, 18)           # (C, D, H, W): not a cube
_NET: dict = {}


def net() -> nn.Module:
    if "small" not in _NET:
        torch.manual_seed(0)
        _NET["small"] = calibrated(small_net(), SHAPE)
    return _NET["small"]


def volumes(n: int, shape=SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, ref: torch.Tensor, scale_of: torch.Tensor) -> float:
    """max |got - ref| relative to the larger of the reference map's and the scores' scale."""
    assert tuple(got.shape) == tuple(ref.shape)
    assert float(ref.abs().max()) > 1e-3, "the reference map is flat: the test would compare nothing"
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), float(scale_of.abs().max()))


def within_rounding(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, scale_of: torch.Tensor) -> None:
    """``got`` (KQL, float32) is as close to ``truth`` (the reference package
    in float64) as ``ref`` (the package in float32) is, plus TOL: where a
    network's own float32 rounding exceeds TOL, two float32 computations that
    sum in different orders cannot agree to TOL, and neither is wrong."""
    rounding = close(ref.double(), truth, scale_of)
    assert close(got.double(), truth, scale_of) <= rounding + TOL, (close(got, ref, scale_of), rounding)


def moves(heatmap: np.ndarray) -> bool:
    return float(np.ptp(heatmap)) > 1e-4


# -- kql.occlusion on volumes -------------------------------------------------------------
@pytest.mark.parametrize("patch, stride, region", [
    ((6, 6, 6), (4, 4, 4), None),                      # last windows shifted to the edge on every axis
    ((4, 8, 6), (3, 4, 5), None),                      # non-cubic patch and stride
    (5, 2, ((2, 12), (4, 15), (0, 9))),                # a cube, a 3-D region
])
def test_tensor_api_exact_equals_naive_on_volumes(patch, stride, region):
    x = volumes(2)
    exact = kql.occlusion(net(), x, patch, stride, target=[1, [0, 2]], region=region)
    naive = kql.occlusion(net(), x, patch, stride, target=[1, [0, 2]], region=region, mode="naive")
    for e, n in zip(exact, naive):
        assert e.maps.ndim == 4 and e.maps.shape == n.maps.shape        # (labels, nd, nh, nw)
        assert moves(n.heatmap)
        assert np.abs(e.maps - n.maps).max() <= TOL


def test_tensor_api_volume_errors_are_clear():
    x = volumes(1)
    with pytest.raises(ValueError, match="patch must be"):
        kql.occlusion(net(), x, (4, 4), 2)                               # a 2-D patch on a volume
    with pytest.raises(ValueError, match="region must be one"):
        kql.occlusion(net(), x, 4, 2, region=(0, 0, 8, 8))
    images = torch.randn(1, 3, 16, 16)
    conv2d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ValueError, match="the inputs are 2-D images"):
        kql.occlusion(conv2d, images, (4, 4, 4), 2)                      # a 3-D patch on images
    with pytest.raises(ValueError, match="patch must be"):
        kql.occlusion(conv2d, images, (1, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="cannot plan .* conv2d"):
        kql.occlusion(conv2d, torch.randn(1, 3, 8, 16, 16), 4, 2)       # a 2-D model on a volume


# -- Captum ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, baseline, window, stride", [
    (1, 0.0, (1, 6, 6, 6), (1, 4, 4, 4)),                # windows clipped at the far edges
    (2, "tensor", (1, 4, 8, 6), (1, 4, 3, 5)),           # non-cubic, a baseline volume
])
def test_captum_parity_on_volumes(n, baseline, window, stride):
    x = volumes(n)
    base = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) if baseline == "tensor" else baseline
    target = [1] * n if n > 1 else 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the engine must take it: no naive fallback
        got = Occlusion(net()).attribute(x, window, strides=stride, baselines=base, target=target)
    ref = captum_attr.Occlusion(net()).attribute(x, window, strides=stride, baselines=base, target=target,
                                                 perturbations_per_eval=8)
    with torch.no_grad():
        assert close(got, ref, net()(x)) <= TOL


# -- MONAI -------------------------------------------------------------------------------
MONAI_CASES = [
    dict(mode="gaussian", mask_size=6),                                  # MONAI's default overlap 0.6
    dict(mode="mean_img", overlap=0.5, mask_size=(4, 8, 6)),             # per-axis mask, shifted last windows
    dict(mode=0.25, overlap=0.0, mask_size=5, activate=False),           # raw logits
    dict(mode="mean_patch", overlap=0.3, mask_size=6, b_box=[2, 12, -1, 16, 3, 15]),   # a bounding box
]


@pytest.mark.parametrize("case", range(len(MONAI_CASES)))
def test_monai_parity_on_volumes(case):
    options = dict(MONAI_CASES[case])
    b_box = options.pop("b_box", None)
    x = volumes(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_map, ref_cls = monai_visualize.OcclusionSensitivity(net(), n_batch=8, verbose=False,
                                                                **options)(x, b_box=b_box)
    got_map, got_cls = OcclusionSensitivity(net(), n_batch=8, verbose=False, **options)(x, b_box=b_box)
    with torch.no_grad():
        out = net()(x)
    # one input channel: MONAI's activate=True is a sigmoid
    assert close(got_map, ref_map.as_tensor(), out if options.get("activate") is False else out.sigmoid()) <= TOL
    assert got_map.shape[:2] == (1, 4) and got_cls.shape == (1, 1, *got_map.shape[2:])
    assert (got_cls == ref_cls.as_tensor()).float().mean() > 0.99


# -- MONAI's 3-D networks (slow) -----------------------------------------------------------
MONAI_3D = {
    "densenet121": lambda: monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3),
    "resnet18": lambda: monai_nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MONAI_3D))
def test_dropins_on_monai_3d_networks(arch):
    torch.manual_seed(0)
    shape = (1, 32, 32, 32)                           # DenseNet121 halves 5 times: at least 32
    model = calibrated(MONAI_3D[arch](), shape)
    x = volumes(1, shape, seed=2)
    softmax = lambda out: out.softmax(1)  # noqa: E731
    with torch.no_grad():
        probs = softmax(model(x))
    cls = int(probs.argmax())
    box = [12, 18, 12, 18, 12, 18]                    # MONAI widens it by 3 on each side: 2^3 positions
    model64 = copy.deepcopy(model).double()             # the packages in float64: the maps' true values

    def monai(m, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return monai_visualize.OcclusionSensitivity(m, mask_size=8, n_batch=8, verbose=False, mode=0.0,
                                                        overlap=0.5, activate=softmax)(v, b_box=box)[0].as_tensor()
    got_map, _ = OcclusionSensitivity(model, mask_size=8, n_batch=8, verbose=False, mode=0.0, overlap=0.5,
                                      activate=softmax)(x, b_box=box)
    # random DenseNet121-3D at 32^3 rounds to ~6e-5 in float32 (its last blocks run at 1^3, their
    # batch-norm statistics come from 4 values): TOL plus what MONAI's own float32 run misses by
    within_rounding(got_map, monai(model, x), monai(model64, x.double()), probs)

    crop = x[:, :, 8:20, 8:20, 8:20].clone()         # Captum on a 12^3 box of the volume: 2^3 windows

    class Paste(nn.Module):
        """The box's voxels pasted back into the volume, then the model's probabilities."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            outside = x.clone()
            outside[:, :, 8:20, 8:20, 8:20] = 0
            self.register_buffer("outside", outside)

        def forward(self, v):
            return self.model(torch.nn.functional.pad(v, (8, 12, 8, 12, 8, 12)) + self.outside).softmax(1)

    def captum(paste, v):
        return captum_attr.Occlusion(paste.eval()).attribute(v, (1, 8, 8, 8), strides=(1, 4, 4, 4), target=cls,
                                                              perturbations_per_eval=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Occlusion(Paste(model).eval()).attribute(crop, (1, 8, 8, 8), strides=(1, 4, 4, 4), target=cls)
    within_rounding(got, captum(Paste(model), crop), captum(Paste(model64).double(), crop.double()), probs)


# -- multi-image jobs over a folder of volumes --------------------------------------------
def test_a_job_over_a_folder_of_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    g = np.random.default_rng(0)
    np.save(src / "a.npy", g.normal(size=(12, 12, 12)).astype(np.float32))
    nib.save(nib.Nifti1Image(g.normal(size=(12, 12, 12)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(src / "b.nii.gz"))
    (src / "c.nii.gz").write_bytes(b"not a nifti")
    (src / "notes.txt").write_text("left alone")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    con = kql.connect(progress="off")
    results = {r.name: r for r in con.execute(f"SELECT HEATMAP FROM '{src}' USING m PATCH 4 STRIDE 4 "
                                              f"INTO '{out}'", m=model)}
    assert sorted(results) == ["a.npy", "b.nii.gz", "c.nii.gz"]
    for name in ("a.npy", "b.nii.gz"):
        assert results[name].status == "ok" and results[name].heatmap.shape == (3, 3, 3)
        saved = np.load(out / f"{name}.npy")                    # the map on the input's voxel grid
        assert saved.shape == (12, 12, 12) and np.isfinite(saved).all()
        assert (out / f"{name}.png").is_file()
    bad = results["c.nii.gz"]
    assert bad.status == "failed" and "c.nii.gz" in bad.error and "kql-volume-" not in bad.error
    alone = con.execute(f"SELECT HEATMAP FROM '{src / 'a.npy'}' USING m PATCH 4 STRIDE 4", m=model)
    assert np.array_equal(alone.heatmap, results["a.npy"].heatmap)          # as one query of that file
