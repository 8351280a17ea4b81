"""Tests for kql.result.HeatmapResult: pixel_map against a slow reference,
saving (.png/.npy, atomic), the text summary."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import skimage.io

from kql import result as result_module
from kql.ast import Region
from kql.errors import ExecutionError, PlanError
from kql.result import HeatmapResult, check_output_path


def raises(exc_type, text):
    return pytest.raises(exc_type, match="^" + re.escape(text) + "$")


def grid(start: int, stop: int, patch: int, stride: int) -> np.ndarray:
    """Top-left positions of a patch sliding over [start, stop): the last one
    touches the far edge even when that is closer than a stride."""
    pos = list(range(start, stop - patch + 1, stride))
    if pos[-1] != stop - patch:
        pos.append(stop - patch)
    return np.array(pos)


def make(H=20, W=24, patch=(5, 4), stride=(3, 5), region=None, seed=0, **kw) -> HeatmapResult:
    r = region or Region(0, 0, W, H)
    ys = grid(r.y0, r.y1, patch[0], stride[0])
    xs = grid(r.x0, r.x1, patch[1], stride[1])
    rng = np.random.default_rng(seed)
    fields = dict(heatmap=rng.random((len(ys), len(xs))).astype(np.float32), label=967, label_name="espresso",
                  p_original=0.908, ys=ys, xs=xs, patch=patch, stride=stride, region=region,
                  image=rng.random((H, W, 3)).astype(np.float32), model="efficientnet_lite0", mode="naive")
    fields.update(kw)
    return HeatmapResult(**fields)


def slow_pixel_map(res: HeatmapResult) -> np.ndarray:
    H, W = res.image.shape[:2]
    total = np.zeros((H, W))
    count = np.zeros((H, W))
    for i, y in enumerate(res.ys):
        for j, x in enumerate(res.xs):
            total[y:y + res.patch[0], x:x + res.patch[1]] += res.heatmap[i, j]
            count[y:y + res.patch[0], x:x + res.patch[1]] += 1
    out = np.full((H, W), np.nan)
    out[count > 0] = total[count > 0] / count[count > 0]
    return out


@pytest.mark.parametrize("H,W,patch,stride,region", [
    (20, 24, (5, 4), (3, 5), None),
    (17, 13, (4, 4), (4, 4), None),                # stride == patch: a tiling
    (17, 13, (6, 3), (1, 1), None),                # heavy overlap
    (16, 16, (3, 3), (7, 7), None),                # stride > patch: gaps -> NaN
    (30, 31, (5, 7), (2, 3), Region(4, 6, 25, 21)),  # region: NaN outside
    (9, 9, (9, 9), (1, 1), None),                  # one position
])
def test_pixel_map_matches_slow_reference(H, W, patch, stride, region):
    res = make(H, W, patch, stride, region)
    got = res.pixel_map()
    want = slow_pixel_map(res)
    assert got.shape == (H, W) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_coverage_is_counted_once_for_all_labels_and_follows_a_changed_grid(monkeypatch):
    """The count of patches over each pixel depends only on the grid, the
    patch and the image: every label's map (and select's results) shares it."""
    rng = np.random.default_rng(1)
    one = make(20, 24, (5, 4), (3, 5))
    maps = rng.random((6, *one.heatmap.shape)).astype(np.float32)
    res = make(20, 24, (5, 4), (3, 5), maps=maps, labels=[3, 1, 4, 5, 9, 2], label_names=None,
               originals=rng.random(6).astype(np.float32))
    spread, calls = HeatmapResult._spread, []
    monkeypatch.setattr(HeatmapResult, "_spread", lambda self, w: calls.append(1) or spread(self, w))
    for i, label in enumerate(res.labels):
        want = float(res.originals[i]) - slow_pixel_map(res.select(label))
        np.testing.assert_allclose(res.attribution(label), want, rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(res.select(label).pixel_map(), slow_pixel_map(res.select(label)),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    assert len(calls) == 1 + 2 * len(res.labels)   # one count, one sum per map
    res.patch = (6, 6)                              # a changed patch is a new count
    np.testing.assert_allclose(res.pixel_map(), slow_pixel_map(res), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert len(calls) == 1 + 2 * len(res.labels) + 2


def test_pixel_map_region_is_nan_outside():
    res = make(30, 31, (5, 7), (2, 3), Region(4, 6, 25, 21))
    pm = res.pixel_map()
    assert np.isnan(pm[:6]).all() and np.isnan(pm[21:]).all()
    assert np.isnan(pm[:, :4]).all() and np.isnan(pm[:, 25:]).all()
    assert not np.isnan(pm[6:21, 4:25]).any()


def test_drop():
    res = make()
    np.testing.assert_allclose(res.drop, 0.908 - res.heatmap, rtol=1e-6)


def test_grid_shape_is_checked():
    with pytest.raises(ValueError, match="heatmap shape"):
        make(heatmap=np.zeros((2, 2)))


def test_str_summary():
    res = make(heatmap=np.zeros((27, 27)), ys=np.arange(27), xs=np.arange(27), timings={"total": 12.3},
               image=np.zeros((40, 40, 3)))
    assert str(res) == ("heatmap 27x27 of 'espresso' (label 967, p=0.908) by efficientnet_lite0, naive: "
                        "729 positions in 12.30 s (16.9 ms/position)")
    res.output_path = "out/x.png"
    res.warnings = ["no weights given", "batch reduced"]
    assert str(res) == ("heatmap 27x27 of 'espresso' (label 967, p=0.908) by efficientnet_lite0, naive: "
                        "729 positions in 12.30 s (16.9 ms/position) -> out/x.png\n"
                        "warning: no weights given\nwarning: batch reduced")
    assert repr(res).startswith("<HeatmapResult heatmap 27x27")


def test_str_without_name_or_timings():
    res = make(heatmap=np.zeros((1, 2)), ys=[0], xs=[0, 3], label=3, label_name=None, p_original=0.5,
               mode="exact", model="m")
    assert str(res) == "heatmap 1x2 of label 3 (p=0.500) by m, exact: 2 positions"
    res.timings = {"total": 0.25}
    assert str(res) == "heatmap 1x2 of label 3 (p=0.500) by m, exact: 2 positions in 250.0 ms (125.0 ms/position)"


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------

def test_save_png(tmp_path):
    res = make(40, 50, (8, 8), (4, 4), Region(8, 4, 40, 36))
    path = tmp_path / "heat.png"
    assert res.save(path) == str(path)
    assert res.output_path == str(path)
    img = skimage.io.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] > 100 and img.shape[1] > 100
    assert os.listdir(tmp_path) == ["heat.png"]
    assert str(res).endswith(f" -> {path}")


def test_png_figure_contents():
    res = make(40, 50, (8, 8), (4, 4), Region(8, 4, 40, 36))
    fig = res._figure()
    ax, bar = fig.axes
    assert ax.get_title() == "efficientnet_lite0: espresso (p=0.908)"
    assert bar.get_ylabel() == "P(espresso)"
    assert len(ax.patches) == 1                     # the region outline
    whole = make(40, 50, (8, 8), (4, 4), label_name=None, label=3)
    ax, bar = whole._figure().axes
    assert len(ax.patches) == 0 and bar.get_ylabel() == "P(class 3)"


def test_save_npy(tmp_path):
    res = make()
    res.save(str(tmp_path / "h.NPY"))
    back = np.load(tmp_path / "h.NPY")
    np.testing.assert_array_equal(back, res.heatmap)
    assert back.dtype == np.float32


def test_save_overwrites_existing_file(tmp_path):
    path = tmp_path / "h.npy"
    path.write_bytes(b"old")
    make().save(path)
    assert np.load(path).shape == make().heatmap.shape


def test_save_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = make()
    with raises(PlanError, "cannot write 'x.jpg': INTO takes a .png or .npy file, or .nii / .nii.gz for a volume"):
        res.save("x.jpg")
    with raises(PlanError, "cannot write 'x': INTO takes a .png or .npy file, or .nii / .nii.gz for a volume"):
        res.save("x")
    with raises(PlanError, "cannot write 'out/x.png': directory 'out' does not exist (create it first)"):
        res.save("out/x.png")
    os.mkdir("d.png")
    with raises(PlanError, "cannot write 'd.png': it is a directory"):
        res.save("d.png")
    assert check_output_path("ok.png") == ".png"
    assert sorted(os.listdir()) == ["d.png"]
    assert res.output_path is None


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    res = make()
    old = tmp_path / "keep.png"
    old.write_bytes(b"previous result")

    def broken(self):
        raise RuntimeError("renderer exploded")
    monkeypatch.setattr(HeatmapResult, "_figure", broken)
    with pytest.raises(RuntimeError, match="renderer exploded"):
        res.save(old)
    with pytest.raises(RuntimeError, match="renderer exploded"):
        res.save(tmp_path / "new.png")
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]      # no temp file, no partial new.png
    assert old.read_bytes() == b"previous result"             # the old file is untouched


def test_save_disk_error_is_an_execution_error(tmp_path, monkeypatch):
    def full(fd):   # the bytes went to the temporary file; flushing them to disk fails
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(result_module.os, "fsync", full)
    monkeypatch.chdir(tmp_path)
    with raises(ExecutionError, "cannot write 'h.npy': No space left on device"):
        make().save("h.npy")
    assert os.listdir(tmp_path) == []
