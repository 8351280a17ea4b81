"""TUNE, SHOW CALIBRATIONS and APPROX SSIM (kql/tune.py, kql/calibration.py).

On the CNN really trained on Fashion-MNIST (the ``fmnist_net`` fixture): one
TUNE on three test images with three thresholds (module fixture), then what
APPROX SSIM does with it, and whether the τ it picks keeps held-out images
at the SSIM asked for. Every test points ``KQL_DATA_DIR`` at a temporary
folder, so the user's calibration store is never read or written.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

import kql
from kql import ast, calibration, tune, zoo
from kql.datasets import load_fashion_mnist
from kql.errors import KqlError, PlanError, QueryInterrupted

TUNING = (0, 1, 2)                     # test-set images TUNE sees
HELD_OUT = tuple(range(100, 110))      # never seen by TUNE
TUNE_QUERY = "TUNE fmnist ON i0, i1, i2 PATCH 4 STRIDE 2 TAUS (0.7, 0.5, 0.4)"


@pytest.fixture(autouse=True)
def empty_store(tmp_path, monkeypatch):
    """A fresh, empty user store for every test (tuned_store overrides it)."""
    monkeypatch.setenv("KQL_DATA_DIR", str(tmp_path / "kql-data"))
    return tmp_path / "kql-data" / "calibrations.json"


@pytest.fixture(scope="module")
def test_images():
    return load_fashion_mnist("test")[0]


@pytest.fixture(scope="module")
def con(fmnist_net):
    con = kql.connect(progress="off")
    con.register_model("fmnist", fmnist_net, **zoo.FMNIST_SPEC)
    return con


@pytest.fixture(scope="module")
def tuned(con, test_images, tmp_path_factory):
    """(TUNE's table, the store folder) after one TUNE of the trained net."""
    folder = tmp_path_factory.mktemp("tuned")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KQL_DATA_DIR", str(folder))
        table = con.execute(TUNE_QUERY, **{f"i{i}": test_images[i] for i in TUNING})
    return table, folder


@pytest.fixture
def tuned_store(tuned, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tuned[1]))
    return tuned[1] / "calibrations.json"


def user_calibrations():
    return [c for c in calibration.load_all() if c.source == "user"]


def select(approx: str = "APPROX SSIM 0.9") -> str:
    return f"SELECT HEATMAP FROM img USING fmnist PATCH 4 STRIDE 2 {approx}"


# -- TUNE and SHOW CALIBRATIONS -----------------------------------------------------------


def test_tune_stores_a_calibration(tuned, tuned_store, fmnist_net):
    table, _ = tuned
    assert [r[0] for r in table.rows] == ["0.7", "0.5", "0.4"]
    assert table.columns == ["τ", "mean SSIM", "min SSIM", "fitted", "≥ 0.9"]
    assert table.footer[-1] == f"saved to {tuned_store}"
    (cal,) = user_calibrations()
    assert (cal.model, cal.input_hw, cal.patch, cal.stride, cal.source) == ("fmnist", (28, 28), (4, 4),
                                                                            (2, 2), "user")
    assert cal.fingerprint == calibration.weights_fingerprint(fmnist_net)
    assert sorted(cal.ssim) == ["i0", "i1", "i2"] and cal.taus == [0.7, 0.5, 0.4]
    ssim = np.array(list(cal.ssim.values()))
    assert ((ssim > -1) & (ssim <= 1)).all()
    # SSIM falls as τ shrinks; at τ 0.7 this net's heatmaps are all but exact
    assert (ssim.mean(0)[:-1] >= ssim.mean(0)[1:]).all() and ssim[:, 0].min() > 0.95
    assert float(table.rows[0][1]) == pytest.approx(ssim[:, 0].mean(), abs=1e-3)
    # the stored fit is the least-squares parabola through every point
    a, b, c = np.polyfit(np.tile(cal.taus, 3), ssim.ravel(), 2)
    assert cal.coefficients == pytest.approx((a, b, c))
    assert table.footer[1] == "APPROX SSIM " + ", ".join(f"{s:g} → τ {cal.tau_for(s):.2f}"
                                                         for s in (0.8, 0.9, 0.95))
    # a 13x13 grid is too small for adaptive refinement: said, not silently skipped
    assert cal.refine is None and sorted(cal.exact_maps) == ["i0", "i1", "i2"]
    assert cal.gates is None                   # no squeeze-and-excitation gates: nothing measured
    assert not any(n.startswith("gate freezing") for n in table.footer)
    assert any(n.startswith("adaptive refinement not calibrated: the grid (13x13) is too small to refine")
               for n in table.footer)


def test_show_calibrations_lists_it(con, tuned_store):
    table = con.execute("SHOW CALIBRATIONS")
    row, *builtins = table.as_dicts()                   # the user's first, then the built-in ones
    assert row["model"] == "fmnist" and row["source"] == "user"
    assert {(b["model"], b["source"]) for b in builtins} == {("efficientnet_lite0", "built-in")}
    # refinement was not calibrated on a 13x13 grid; the built-in ones were, at a finer stride
    assert row["refinement (margin, share)"] == "-"
    assert row["gates (SSIM, work, τ)"] == "-"
    lite16 = next(b for b in builtins if b["patch"] == "16x16")
    assert lite16["stride"] == "16x16 (refinement 4x4)" and lite16["refinement (margin, share)"].startswith("0.8: +")
    assert (row["input"], row["patch"], row["stride"], row["images"]) == ("28x28", "4x4", "2x2", "3")
    assert row["τ range"] == "0.4-0.7 (3)"
    (cal,) = user_calibrations()
    assert row["τ for SSIM 0.8/0.9/0.95"] == " / ".join(f"{cal.tau_for(s):.2f}" for s in (0.8, 0.9, 0.95))


def test_show_calibrations_empty_says_how_to_make_one(con, monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "BUILTIN_DIR", tmp_path / "none")
    table = con.execute("SHOW CALIBRATIONS")
    assert table.rows == []
    assert table.footer[0] == "(no calibrations: make one with TUNE <model> ON <images> PATCH <n>)"


# -- APPROX SSIM ----------------------------------------------------------------------------


def test_approx_ssim_takes_tau_from_the_calibration(con, tuned_store, test_images, monkeypatch):
    # refinement out of the way (no margin worked): the τ plan is the one left that meets 0.9
    monkeypatch.setattr(calibration.Calibration, "refine_margin", lambda self, target, margins=None: None)
    (cal,) = user_calibrations()
    tau = cal.tau_for(0.9)
    assert 0.4 <= tau < 1
    plan = con.plan(select(), {"img": test_images[50]})
    assert (plan.mode, plan.tau) == ("approx", tau)
    assert plan.approximation.predicted_ssim == pytest.approx(cal.reached(tau))
    text = str(con.explain(select(), img=test_images[50]))
    assert f"τ = {tau:g} from APPROX SSIM 0.9 via user calibration of {cal.created[:10]}" in text
    assert f"→ τ {tau:g}: SSIM {cal.reached(tau):.3f}" in text


def test_approx_ssim_without_calibration_runs_exact_and_says_which_tune(con, test_images, empty_store):
    r = con.execute(select(), img=test_images[50])
    assert r.mode == "exact" and r.plan.tau is None
    assert ("no SSIM calibration for fmnist (bound from Python) at input 28x28 with patch 4x4: ran EXACT. "
            "Calibrate with TUNE fmnist ON <sample images> PATCH 4") in r.warnings
    assert not empty_store.exists()


def test_other_weights_find_no_calibration(tuned_store, fmnist_net, test_images):
    other = copy.deepcopy(fmnist_net)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 0.01
    con2 = kql.connect(progress="off")
    con2.register_model("fmnist", other, **zoo.FMNIST_SPEC)
    assert calibration.weights_fingerprint(other) != calibration.weights_fingerprint(fmnist_net)
    plan = con2.plan(select(), {"img": test_images[50]})
    assert plan.mode == "exact" and "no SSIM calibration for fmnist" in plan.warnings[-1]


def test_held_out_images_reach_the_ssim_asked_for(con, tuned_store, test_images):
    """The issue's bar: at APPROX SSIM 0.9, at least 80 % of images TUNE never saw reach 0.9."""
    reached = []
    for i in HELD_OUT:
        exact = con.execute(select("EXACT"), img=test_images[i])
        approx = con.execute(select(), img=test_images[i])
        assert approx.mode == "approx" and approx.label == exact.label
        reached.append(tune.heatmap_ssim(exact.heatmap, approx.heatmap))
    assert np.mean(np.array(reached) >= 0.9) >= 0.8, reached


# -- the store ------------------------------------------------------------------------------


def _calibration(model="m", fingerprint="f"):
    return calibration.Calibration(model, "w", fingerprint, (28, 28), (4, 4), (2, 2), "gray",
                                   [1.0, 0.7, 0.5], {"a": [1.0, 0.95, 0.8]}, (0.0, 0.0, 1.0),
                                   created="2026-12-02T00:00:00+00:00")


def test_store_is_written_atomically(empty_store, monkeypatch):
    calibration.save(_calibration("first"))
    before = empty_store.read_text()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(calibration.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        calibration.save(_calibration("second"))
    assert empty_store.read_text() == before                 # the old store is intact
    assert os.listdir(empty_store.parent) == ["calibrations.json"]   # no temporary file left
    assert [c["model"] for c in json.loads(before)["calibrations"]] == ["first"]


def test_save_replaces_the_same_key_only(empty_store):
    calibration.save(_calibration("m", "f1"))
    calibration.save(_calibration("m", "f2"))
    calibration.save(_calibration("m", "f1"))
    assert [c.fingerprint for c in calibration._read(empty_store, "user")] == ["f2", "f1"]


def test_store_is_parsed_again_only_when_it_changes(empty_store, monkeypatch):
    calibration.save(_calibration("m", "f1"))
    parsed = []
    loads = json.loads
    monkeypatch.setattr(calibration.json, "loads", lambda raw: parsed.append(1) or loads(raw))
    first = calibration._read(empty_store, "user")
    first[0].fingerprint = "changed by a caller"        # new objects each call: this does not stick
    assert [c.fingerprint for c in calibration._read(empty_store, "user")] == ["f1"]
    assert len(parsed) == 1                             # the second read was not parsed
    calibration.save(_calibration("m", "f2"))           # a new store is read anew
    assert [c.fingerprint for c in calibration._read(empty_store, "user")] == ["f1", "f2"]


def test_corrupt_store_is_a_clear_error(con, empty_store, test_images):
    empty_store.parent.mkdir(parents=True)
    empty_store.write_text('{"format": 1, "calibrations": [')
    for run in (lambda: con.execute("SHOW CALIBRATIONS"), lambda: con.plan(select(), {"img": test_images[0]})):
        with pytest.raises(KqlError, match=r"^cannot read the calibration store .*calibrations\.json: "
                                           r".*; move it away and run TUNE again$"):
            run()
    # APPROX TAU needs the store only for the SSIM it predicts: it runs, and says so
    plan = con.plan(select("APPROX TAU 0.5"), {"img": test_images[0]})
    assert plan.tau == 0.5 and plan.approximation.predicted_ssim is None
    assert any(w.startswith("no SSIM prediction: cannot read the calibration store") for w in plan.warnings)


# -- TUNE's inputs ------------------------------------------------------------------------


def test_folder_and_glob_of_images(con, tmp_path):
    from PIL import Image
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    Image.new("RGB", (8, 6)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "a.jpg")
    found = tune.sample_images(con, ast.Source("path", str(tmp_path)), {})
    assert [(os.path.basename(n), a.shape) for n, a in found] == [("a.jpg", (6, 8, 3)), ("b.png", (6, 8, 3))]
    found = tune.sample_images(con, ast.Source("path", str(tmp_path / "b*")), {})
    assert [os.path.basename(n) for n, _ in found] == ["b.png"]


@pytest.mark.parametrize("query, message", [
    ("TUNE fmnist ON '{d}' PATCH 4", "folder '{d}' holds no image files (known extensions: .png, .jpg, "
                                     ".tif, ...; a glob such as '{d}/*' takes every file)"),
    ("TUNE fmnist ON '{d}/*.png' PATCH 4", "no files match '{d}/*.png'"),
    ("TUNE fmnist ON '{d}/nope' PATCH 4", "TUNE ... ON '{d}/nope': no such folder or file (give a folder, a "
                                          "glob such as 'photos/*.png', or image names)"),
    ("TUNE fmnist ON img, nosuch PATCH 4", "unknown image 'nosuch'"),
    ("TUNE fmnist ON img, img PATCH 4", "TUNE lists image 'img' twice"),
    ("TUNE fmnist ON img PATCH 4 TAUS (0.9, 0.5)", "TAUS needs at least 3 different thresholds for a "
                                                   "degree-2 fit, got 0.9, 0.5"),
    ("TUNE fmnist ON img PATCH 4 TAUS (0.9, 0.5, 1.5)", "TAUS must be in (0, 1], got 1.5"),
])
def test_bad_tune_statements(con, tmp_path, test_images, query, message):
    with pytest.raises(PlanError) as e:
        con.execute(query.format(d=tmp_path), img=test_images[0])
    assert str(e.value).startswith(message.format(d=tmp_path))


def test_unreadable_image_file(con, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PlanError, match=r"^cannot read image '.*broken\.png': not a valid image file$"):
        con.execute(f"TUNE fmnist ON '{tmp_path}' PATCH 4")


def test_ctrl_c_writes_nothing(con, test_images, empty_store, monkeypatch):
    real = tune._heatmap
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(tune, "_heatmap", interrupted)
    with pytest.raises(QueryInterrupted, match=r"^TUNE interrupted after 2 of 8 heatmaps; no calibration "
                                               r"was written$"):
        con.execute("TUNE fmnist ON a, b PATCH 4 STRIDE 4 TAUS (1, 0.8, 0.6, 0.4)",
                    a=test_images[0], b=test_images[1])
    assert not empty_store.exists()


# -- SSIM ---------------------------------------------------------------------------------


def test_heatmap_ssim_is_relative_to_the_heatmaps_contrast():
    rng = np.random.default_rng(0)
    exact = 0.9 + 0.02 * rng.random((9, 9))       # the probability moves by 0.02 at most
    assert tune.heatmap_ssim(exact, exact) == 1.0
    # the same noise on a faint heatmap is a large error; on the probability scale it would look fine
    noisy = exact + 0.01 * rng.standard_normal((9, 9))
    assert tune.heatmap_ssim(exact, noisy) < 0.6
    from skimage.metrics import structural_similarity
    assert structural_similarity(exact, noisy, data_range=1.0, win_size=7) > 0.9


def test_heatmap_ssim_limits():
    with pytest.raises(PlanError, match=r"^a 2x9 heatmap is too small for SSIM \(at least 3x3 positions\): "
                                        r"use a smaller STRIDE$"):
        tune.heatmap_ssim(np.zeros((2, 9)), np.zeros((2, 9)))
    with pytest.raises(PlanError, match="^the exact heatmap is flat"):
        tune.heatmap_ssim(np.full((5, 5), 0.3), np.zeros((5, 5)))
    e = np.add.outer(np.arange(5.0), np.arange(4.0))      # 5x4: window 3
    assert tune.heatmap_ssim(e, e) == 1.0


def test_builtin_efficientnet_calibrations_hold_refinement():
    """Shipped for patch 8, 16 and 32, each with refinement measured on a grid fine enough for it."""
    cals = {c.patch: c for c in calibration._read(calibration.BUILTIN_DIR / "efficientnet_lite0.json", "built-in")}
    assert {(8, 8), (16, 16), (32, 32)} <= set(cals)
    for cal in cals.values():
        assert cal.refine and len(cal.refine["trajectories"]) == cal.n_images == len(cal.exact_maps)
        for traj in cal.refine["trajectories"].values():
            shares = [t[0] for t in traj]
            assert shares == sorted(shares) and shares[-1] == 1.0 and traj[-1][2] == pytest.approx(1.0)
        assert cal.refine_margin(0.9) is not None


def test_builtin_efficientnet_calibration_is_shipped():
    path = calibration.BUILTIN_DIR / "efficientnet_lite0.json"
    cals = calibration._read(path, "built-in")
    assert any(c.model == "efficientnet_lite0" and c.patch == (16, 16) and c.input_hw == (224, 224)
               for c in cals)
    spec = kql.sources.load_model("efficientnet_lite0")
    found = calibration.lookup(spec, (224, 224), (16, 16))
    assert found is not None and found.source == "built-in" and 0.4 <= found.tau_for(0.9) <= 1
