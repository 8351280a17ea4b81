"""Volumes in the front end: loading (.npy, NIfTI, arrays), the sample
phantom, preprocessing (WINDOW, NORMALIZE, RESAMPLE) and patch colours in the
scan's units, the 3-D built-in models, the heatmap written as a volume and as
a picture, and one clear error (with nothing written) for each kind of bad
input. The occlusion itself is the engine's (tests/test_incremental.py etc.)."""
from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import kql
from kql.ast import Color
from kql.datasets import phantom, phantom_affine
from kql.errors import PlanError
from kql.result import HeatmapResult
from kql.sources.models import spec_from_module
from kql.sources.volumes import (Volume, load_sample_volume, load_volume, looks_like_volume, preprocess_volume,
                                 resample_to)


def net3d(channels: int = 1, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, classes)).eval()


def net2d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


def save_nifti(path, data, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), str(path))
    return str(path)


# ---------------------------------------------------------------- the phantom

def test_phantom_is_reproducible_and_ct_like():
    a, b = phantom((16, 24, 20), seed=3), phantom((16, 24, 20), seed=3)
    assert a.shape == (16, 24, 20) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, phantom((16, 24, 20), seed=4))
    v = phantom()
    # air, lungs, soft tissue, bone: the intensities a CT window separates
    for hu in (-1000, -800, 40, 700):
        assert (np.abs(v - hu) < 60).mean() > 0.002, hu
    sample = load_sample_volume("phantom")
    assert sample.data.shape == (1, 64, 64, 64) and np.allclose(sample.spacing, 1.5)
    with pytest.raises(PlanError, match="at least 8"):
        phantom((4, 16, 16))


# ---------------------------------------------------------------- loading

def test_npy_volumes_one_channel_and_channels_first(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    np.save(tmp_path / "two.npy", np.zeros((2, 4, 5, 6), np.float32))
    one, two = load_volume(tmp_path / "one.npy"), load_volume(str(tmp_path / "two.npy"))
    assert one.data.shape == (1, 4, 5, 6) and one.data.dtype == np.float32 and one.affine is None
    assert one.data[0, 3, 4, 5] == 4 * 5 * 6 - 1
    assert two.data.shape == (2, 4, 5, 6) and two.spatial_shape == (4, 5, 6)


def test_load_image_takes_a_volume_file(tmp_path):
    path = save_nifti(tmp_path / "ct.nii.gz", np.zeros((8, 9, 10)))
    con = kql.connect()
    assert con.execute(f"LOAD IMAGE '{path}' AS ct") == f"volume 'ct' loaded from '{path}' (1x8x9x10)"
    assert ["ct", "session", "1x8x9x10"] in con.execute("SHOW IMAGES").rows
    with pytest.raises(PlanError, match="bound volume 'v' has an affine that is not invertible"):
        con.execute("SELECT HEATMAP FROM v USING m PATCH 4 STRIDE 4", m=net3d(),
                    v=kql.Volume(np.zeros((8, 8, 8)), affine=np.zeros((4, 4))))


def test_nifti_round_trip_keeps_axes_and_affine(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    affine = np.array([[0, 0, 2.0, 10], [0, 1.5, 0, -5], [1.2, 0, 0, 3], [0, 0, 0, 1]])
    for name in ("a.nii", "a.nii.gz"):
        vol = load_volume(save_nifti(tmp_path / name, data, affine))
        assert vol.data.shape == (1, 6, 7, 8) and np.allclose(vol.data[0], data)
        assert np.allclose(vol.affine, affine) and np.allclose(vol.spacing, (1.2, 1.5, 2.0))
    # a 4th axis of length 1 (FSL writes them) is one scan
    assert load_volume(save_nifti(tmp_path / "b.nii.gz", data[..., None])).data.shape == (1, 6, 7, 8)


@pytest.mark.parametrize("obj, volume", [
    (np.zeros((16, 16, 16)), True), (np.zeros((1, 8, 8, 8)), True), (np.zeros((32, 32, 3)), False),
    (np.zeros((3, 32, 32)), False),
    (np.zeros((32, 32)), False), (torch.zeros(1, 1, 8, 8, 8), True), (torch.zeros(1, 3, 8, 8), False),
    (torch.zeros(3, 16, 16), False), (torch.zeros(16, 16, 16), True), (torch.zeros(2, 8, 8, 8), True),
])
def test_bound_arrays_tell_volumes_from_images(obj, volume):
    assert looks_like_volume(obj) is volume


# ---------------------------------------------------------------- preprocessing and colours

def test_window_resample_and_colours_in_scan_units():
    spec = spec_from_module("net", net3d())
    vol = load_sample_volume("phantom")
    x, view = preprocess_volume(vol, spec, window=(-1000, 400), resample=(32,))
    assert tuple(x.shape) == (1, 32, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert view.shape == (32, 32, 32) and view.original_shape == (64, 64, 64) and view.resampled
    assert [k for k, _ in view.steps] == ["resample", "window"]
    assert spec.fill_value(Color("value", (-1000.0,)), view).tolist() == [0.0]      # air: window's bottom
    assert spec.fill_value(Color("value", (2000.0,)), view).tolist() == [1.0]       # clipped like the scan
    assert spec.fill_value(Color("value", (-300.0,)), view).tolist() == pytest.approx([0.5])
    assert spec.fill_value(Color("mean"), view).tolist() == pytest.approx([float(x.mean())], rel=1e-5)
    assert spec.fill_value(Color("gray"), view).tolist() == pytest.approx([0.5])


def test_voxel_spacing_on_the_model_grid():
    """The slices' aspect: the source's voxel size stretched by RESAMPLE; 1
    without an affine (a .npy or a bound array)."""
    spec = spec_from_module("net", net3d())
    vol = Volume(np.zeros((1, 8, 16, 32), np.float32), np.diag([1.2, 1.5, 2.0, 1.0]))
    assert vol.spacing == pytest.approx((1.2, 1.5, 2.0))
    _, view = preprocess_volume(vol, spec, resample=(16,))
    assert view.spacing == pytest.approx((1.2 * 8 / 16, 1.5, 2.0 * 32 / 16))
    _, view = preprocess_volume(Volume(vol.data), spec, resample=(16,))
    assert view.spacing == (1.0, 1.0, 1.0) and Volume(vol.data).spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("normalize, check", [
    ("zscore", lambda x: abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3),
    ("minmax", lambda x: float(x.min()) == 0 and abs(float(x.max()) - 1) < 1e-6),
    (None, lambda x: float(x.min()) == 0 and abs(float(x.max()) - 1) < 1e-6),       # the default: MINMAX
    ("none", lambda x: float(x.min()) < -1000),
])
def test_normalize(normalize, check):
    spec = spec_from_module("net", net3d())
    x, view = preprocess_volume(load_sample_volume("phantom"), spec, normalize=normalize)
    assert check(x)
    # a colour in the scan's units goes through the same steps as the scan
    raw = float(load_sample_volume("phantom").data[0, 30, 31, 32])
    assert spec.fill_value(Color("value", (raw,)), view).item() == pytest.approx(float(x[0, 30, 31, 32]), abs=1e-4)


def test_video_clips_uint8_and_the_model_normalisation():
    spec = spec_from_module("clip", net3d(channels=3), mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    clip = np.full((3, 4, 16, 16), 255, np.uint8)
    x, view = preprocess_volume(load_volume(clip), spec)
    assert torch.allclose(x, torch.full_like(x, 3.0)) and view.steps[1] == ("intensity", "uint8 / 255 -> [0, 1]")
    assert spec.fill_value(Color("rgb", (0.0, 255.0, 102.0)), view).tolist() == pytest.approx([-2.0, 3.0, 0.0])


def test_resample_keeps_nan_outside_a_region():
    data = np.full((1, 4, 4, 4), np.nan, np.float32)
    data[0, :2] = 1.0
    out = resample_to(data, (8, 8, 8))
    assert np.isnan(out[0, 5:]).all() and np.allclose(out[0, :3], 1.0)


# ---------------------------------------------------------------- models

def test_volume_models_are_listed_with_their_input():
    con = kql.connect()
    rows = {r[0]: r for r in con.execute("SHOW MODELS").rows}
    assert rows["r3d_18"][2] == "3x16x112x112" and rows["densenet121_3d"][2] == "1xDxHxW, any size"
    assert {"densenet169_3d", "resnet10_3d", "resnet18_3d", "resnet34_3d", "resnet50_3d", "mc3_18",
            "r2plus1d_18"} <= set(rows)
    assert "phantom" in [r[0] for r in con.execute("SHOW IMAGES").rows]
    spec = spec_from_module("mine", net3d(channels=2), input_size=24)
    assert (spec.ndim, spec.channels, spec.input_size, spec.input_text()) == (3, 2, (24, 24, 24), "2x24x24x24")


@pytest.mark.slow
def test_builtin_3d_nets_random_and_from_a_weights_file(tmp_path):
    from kql.sources.models import load_model
    spec = load_model("resnet10_3d")
    assert (spec.ndim, spec.channels, spec.num_classes, spec.input_text()) == (3, 1, 2, "1xDxHxW")
    assert "random weights" in spec.warning
    x = torch.randn(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    occluded = x.clone()
    occluded[..., 4:12, 4:12, 4:12] = 0
    with torch.no_grad():
        p, q = spec.module(x).softmax(1), spec.module(occluded).softmax(1)
    assert float(p.max()) < 0.999 and float((p - q).abs().max()) > 1e-4     # not saturated; the patch matters
    assert np.array_equal(load_model("resnet10_3d").module.state_dict()["fc.weight"],
                          spec.module.state_dict()["fc.weight"])             # the same random net every time
    import monai.networks.nets as nets
    trained = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    loaded = load_model("resnet10_3d", weights=tmp_path / "w.pth")
    assert loaded.num_classes == 3 and loaded.warning is None
    video = load_model("r3d_18")
    assert (video.channels, video.input_size, video.class_names[0]) == (3, (16, 112, 112), "abseiling")


# ---------------------------------------------------------------- the heatmap as a volume

def _result(window=None, resample=None, labels=1):
    spec = spec_from_module("net", net3d())
    _, view = preprocess_volume(load_sample_volume("phantom"), spec, window=window, resample=resample)
    D = view.shape[0]
    starts = np.arange(0, D - 8 + 1, 4)
    n = len(starts)
    grid = np.stack(np.meshgrid(starts, starts, starts, indexing="ij"))
    heat = (0.9 - 0.8 * np.exp(-((grid - np.array([20, 8, 24])[:, None, None, None]) ** 2).sum(0) / 40.0))
    maps = np.stack([heat * (1 - 0.1 * i) for i in range(labels)]).astype(np.float32)
    return HeatmapResult(maps[0], 1, "lesion", 0.9, starts, starts, (8, 8, 8), (4, 4, 4), None, view,
                         "net", "exact", zs=starts,
                         maps=maps if labels > 1 else None, labels=list(range(labels)) if labels > 1 else None,
                         label_names=None, originals=np.full(labels, 0.9) if labels > 1 else None), n


def test_voxel_map_is_the_mean_over_covering_patches():
    res, n = _result()
    pixels = res.pixel_map()
    assert pixels.shape == (64, 64, 64)
    total, count = np.zeros((64, 64, 64)), np.zeros((64, 64, 64))
    for i, z in enumerate(res.zs):
        for j, y in enumerate(res.ys):
            for k, x in enumerate(res.xs):
                total[z:z + 8, y:y + 8, x:x + 8] += res.heatmap[i, j, k]
                count[z:z + 8, y:y + 8, x:x + 8] += 1
    assert np.allclose(pixels, total / count, atol=1e-6)
    assert res.most_sensitive_voxel() == tuple(int(i) for i in np.unravel_index(np.argmin(total / count),
                                                                                (64, 64, 64)))
    assert str(res).startswith(f"heatmap {n}x{n}x{n} of 'lesion'")


@pytest.mark.parametrize("name", ["h.nii.gz", "h.nii", "h.npy"])
def test_into_a_volume_file_in_the_input_grid(tmp_path, name):
    res, _ = _result(window=(-1000, 400), resample=(32,))      # computed on 32^3, written on the scan's 64^3
    path = res.save(tmp_path / name)
    if name.endswith(".npy"):
        data, affine = np.load(path), np.eye(4) * 0 + phantom_affine()
    else:
        img = nib.load(path)
        data, affine = img.get_fdata(), img.affine
        assert img.header.get_xyzt_units()[0] == "mm"
    assert data.shape == (64, 64, 64) and np.allclose(affine, phantom_affine())
    expected = resample_to(res.pixel_map()[None], (64, 64, 64))[0]
    assert np.allclose(data, expected, atol=1e-6)
    if name.endswith(".gz"):
        with gzip.open(path) as f:
            assert f.read(4)[:4] == (348).to_bytes(4, "little")     # a real NIfTI-1 header inside


def test_several_labels_are_the_fourth_nifti_axis(tmp_path):
    res, _ = _result(labels=3)
    img = nib.load(res.save(tmp_path / "maps.nii.gz"))
    assert img.shape == (64, 64, 64, 3)


def test_picture_of_three_slices_and_notebook_repr():
    res, _ = _result(window=(-1000, 400))
    png = res.to_bytes(".png")
    from PIL import Image
    picture = Image.open(io.BytesIO(png))
    assert picture.width > 2.5 * picture.height           # three slices side by side and a colour bar
    assert res._repr_png_() == png and "data:image/png;base64," in res._repr_html_()
    several, _ = _result(labels=2)
    assert Image.open(io.BytesIO(several.to_bytes(".png"))).height > picture.height


# ---------------------------------------------------------------- bad input: one clear error, nothing written

def _fails(con, query, message, out, **bindings):
    with pytest.raises(PlanError) as info:
        con.execute(query, **bindings)
    assert str(info.value).startswith(message) or message in str(info.value), str(info.value)
    assert not os.path.exists(out)


def test_a_2d_model_on_a_volume(tmp_path):
    out = tmp_path / "h.nii.gz"
    _fails(kql.connect(), f"SELECT HEATMAP FROM phantom USING flat PATCH 8 STRIDE 4 INTO '{out}'",
           "model 'flat' takes 2-D images (3xHxW); sample volume 'phantom' (synthetic) is a volume "
           "(1x64x64x64): use a 3-D model", out, flat=net2d())


def test_a_3d_patch_on_an_image(tmp_path):
    out = tmp_path / "h.png"
    _fails(kql.connect(), f"SELECT HEATMAP FROM img USING flat PATCH 8x8x8 STRIDE 4 INTO '{out}'",
           "PATCH 8x8x8 is a 3-D patch; the model takes 2-D images (3x32x32)", out,
           flat=net2d(), img=np.zeros((32, 32, 3), np.uint8))


def test_an_image_on_a_3d_model_and_nifti_for_an_image(tmp_path):
    con = kql.connect()
    img = np.zeros((32, 32, 3), np.uint8)
    _fails(con, "SELECT HEATMAP FROM img USING vol PATCH 8 STRIDE 4", "model 'vol' takes volumes (1xDxHxW)",
           tmp_path / "none", vol=net3d(), img=img)
    out = tmp_path / "h.nii.gz"
    _fails(con, f"SELECT HEATMAP FROM img USING flat PATCH 8 STRIDE 4 INTO '{out}'",
           f"cannot write '{out}': NIfTI holds volumes", out, flat=net2d(), img=img)
    _fails(con, "SELECT HEATMAP FROM img USING flat PATCH 8 STRIDE 4 WINDOW (0, 1)",
           "WINDOW applies to volumes", tmp_path / "none", flat=net2d(), img=img)


def test_a_nifti_with_four_dimensions(tmp_path):
    path = save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 3)))
    out = tmp_path / "h.nii.gz"
    _fails(kql.connect(), f"SELECT HEATMAP FROM '{path}' USING vol PATCH 4 STRIDE 4 INTO '{out}'",
           f"NIfTI '{path}' has 4 dimensions (8x8x8x3); KQL reads one 3-D scan per file", out, vol=net3d())


def test_an_affine_that_is_not_invertible(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[2] = affine[1]               # two axes map to the same direction
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None)
    img.header.set_sform(affine, code="aligned")        # nibabel will not encode it as a qform
    path = str(tmp_path / "flat.nii.gz")
    nib.save(img, path)
    out = tmp_path / "h.nii.gz"
    _fails(kql.connect(), f"SELECT HEATMAP FROM '{path}' USING vol PATCH 4 STRIDE 4 INTO '{out}'",
           f"NIfTI '{path}' has an affine that is not invertible (determinant 0)", out, vol=net3d())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_nifti(tmp_path, damage):
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)))
    raw = open(good, "rb").read()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x1f\x8b" + os.urandom(300),
                     "empty": b""}[damage])
    out = tmp_path / "h.nii.gz"
    _fails(kql.connect(), f"SELECT HEATMAP FROM '{bad}' USING vol PATCH 4 STRIDE 4 INTO '{out}'",
           f"cannot read volume '{bad}'", out, vol=net3d())


@pytest.mark.parametrize("obj, message", [
    (np.zeros((2, 2, 8, 8, 8)), "has shape 2x2x8x8x8: a volume is DxHxW"),
    (np.full((8, 8, 8), np.nan), "contains NaN or infinite values"),
    (np.zeros((0, 8, 8)), "is empty"),
    (np.array([["a"] * 8] * 8 * 8).reshape(8, 8, 8), "unsupported volume dtype"),
])
def test_bad_arrays(obj, message):
    with pytest.raises(PlanError, match=message):
        load_volume(obj)


def test_bad_preprocessing_values():
    spec = spec_from_module("net", net3d())
    vol = load_sample_volume("phantom")
    with pytest.raises(PlanError, match=r"WINDOW \(400, -1000\) is empty"):
        preprocess_volume(vol, spec, window=(400, -1000))
    with pytest.raises(PlanError, match="RESAMPLE 16x16 is a 2-D resample"):
        preprocess_volume(vol, spec, resample=(16, 16))
    with pytest.raises(PlanError, match="has 2 channels"):
        preprocess_volume(Volume(np.zeros((2, 8, 8, 8), np.float32), description="two"),
                          spec_from_module("net", net3d(channels=3)))
    _, view = preprocess_volume(vol, spec)
    with pytest.raises(PlanError, match="gives 3 channels; the model takes 1"):
        spec.fill_value(Color("rgb", (1.0, 2.0, 3.0)), view)
