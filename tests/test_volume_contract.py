"""``APPROX SSIM s`` on volumes through the query language: TUNE on volumes, the
candidates, adaptive refinement on a 3-D lattice of positions, EXPLAIN and
EXPLAIN ANALYZE; and a video clip through the language.

The policy tests run on synthetic 3-D maps (fast). The contract is judged on
the 3-D CNN really trained in the tests (``fmnist3d_net``, Fashion-MNIST
images as slabs of 16x16x16 volumes): one TUNE on four volumes saved as
``.npy`` files, then queries on volumes TUNE never saw. Every test points
``KQL_DATA_DIR`` at a temporary folder: the user's store is never touched.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import kql
from kql import calibration, zoo
from kql.datasets import load_fashion_mnist
from kql.errors import PlanError
from kql.planner import refine
from kql.tune import heatmap_ssim

TUNE_Q = "TUNE f3 ON '{folder}' PATCH 4 STRIDE 1 NORMALIZE NONE TAUS (0.8, 0.6, 0.4)"
Q = "SELECT HEATMAP FROM v USING f3 PATCH 4 STRIDE 1 NORMALIZE NONE"     # 13x13x13 = 2197 positions
HELD_OUT = range(500, 508)                                               # never seen by TUNE


@pytest.fixture(autouse=True)
def empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tmp_path / "kql-data"))


def net3d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


def smooth_map(shape, seed=0, sigma=1.5):
    from scipy.ndimage import gaussian_filter
    m = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (m - m.min()) / np.ptp(m)


# ---------------------------------------------------------------- the policy on a 3-D grid

def test_lattice_and_trilinear_cells_on_a_volume_grid():
    policy = refine.RefinePolicy(0.9)
    shape = (9, 11, 10)
    idx = policy.initial(shape)
    axes = np.unravel_index(idx, shape)
    assert [sorted(set(a.tolist())) for a in axes] == [[0, 4, 8], [0, 4, 8, 10], [0, 4, 8, 9]]
    z, y, x = np.mgrid[0:9, 0:11, 0:10]
    multilinear = 0.2 + 0.01 * z - 0.02 * y + 0.003 * x + 0.001 * z * y * x    # trilinear cells reproduce it
    computed = np.zeros(shape, bool)
    computed.reshape(-1)[idx] = True
    est, feature = refine.interpolate(np.where(computed, multilinear, np.nan), computed, policy.step)
    np.testing.assert_allclose(est, multilinear, atol=1e-12)
    assert (feature[computed] == 0).all() and (feature[~computed] > 0).all()
    assert policy.too_small(shape) is None
    assert "grid (7x13x13) is too small to refine: it needs at least 9x9x9" in policy.too_small((7, 13, 13))
    assert policy.batch_size(shape) == int(np.ceil(0.04 * 990))


def test_error_driven_cells_cover_a_volume_grid_and_refine_one_level():
    policy = refine.RefinePolicy(0.9)
    exact = smooth_map((13, 13, 13))
    state = policy.start(exact.shape)
    first = policy.initial(exact.shape)
    policy.update(state, first, exact.reshape(-1)[first], "lattice")
    groups = list(refine.cells_by_error(state, policy.step))
    flat = np.concatenate(groups)
    assert not state.computed.reshape(-1)[flat].any()
    # the first group refines the worst lattice cell one level: the corners of its 2x2x2 half cells
    z, y, x = np.unravel_index(groups[0], exact.shape)
    assert len(groups[0]) == 27 - 8 and {np.ptp(z), np.ptp(y), np.ptp(x)} == {4}
    # largest predicted error first
    scores = [state.scale.reshape(-1)[g].sum() for g in groups[:20]]
    assert scores[0] == max(scores)


def test_refinement_on_a_volume_grid_stops_as_specified_and_keeps_exact_values():
    exact = smooth_map((13, 13, 13), seed=3)
    policy = refine.RefinePolicy(0.9, margin=0.02)
    state = policy.start(exact.shape, unit=8)
    todo = policy.initial(exact.shape)
    while len(todo):
        assert not policy.reached(state.stages)
        if state.stages:    # at least a batch (rounded up to the unit), whole cells, or what is left
            assert len(todo) >= min(-(-policy.batch_size(exact.shape) // 8) * 8, (~state.computed).sum())
        policy.update(state, todo, exact.reshape(-1)[todo], "stage")
        todo = policy.next(state)
    fitted = [s["estimated_ssim"] for s in state.stages[1:]]
    assert not state.computed.all() and min(fitted[-refine.CONFIRM:]) >= policy.goal
    np.testing.assert_array_equal(state.estimate[state.computed], exact[state.computed])
    share, _ = refine.stop_point(refine.trajectory(policy, exact), policy.goal)
    assert share == pytest.approx(state.computed.mean())
    traj = refine.trajectory(policy, exact)                 # replayed to the end: exact
    assert traj[-1][0] == 1.0 and traj[-1][2] == 1.0


def test_drilldown_replay_on_a_volume_grid():
    from kql.planner.drilldown import replay
    exact = smooth_map((9, 9, 9), seed=1)
    out = replay(exact, (2, 2, 2), 0.25)
    coarse = np.ix_(*[np.arange(0, 9, 2)] * 3)
    np.testing.assert_array_equal(out[coarse], exact[coarse])
    assert (out == exact).sum() >= 125 + int(0.2 * 729) and heatmap_ssim(exact, out) > 0.5


# ---------------------------------------------------------------- TUNE on volumes: sources and errors

def test_tune_on_the_sample_volume_stores_a_3d_calibration():
    con = kql.connect(progress="off")
    table = con.execute("TUNE m ON phantom PATCH 16 STRIDE 16 TAUS (0.9, 0.7, 0.5)", m=net3d())
    assert table.title.startswith("TUNE m (bound from Python), input 64x64x64, patch 16x16x16, stride "
                                  "16x16x16, 1 volume")
    assert any("adaptive refinement not calibrated: the grid (4x4x4) is too small" in f for f in table.footer)
    (cal,) = calibration.load_all()[:1]
    assert cal.source == "user" and cal.input_hw == (64, 64, 64) and cal.patch == (16, 16, 16)
    row = con.execute("SHOW CALIBRATIONS").rows[0]
    assert row[:5] == ["m", "bound from Python", "64x64x64", "16x16x16", "16x16x16"]


def test_tune_errors_on_volumes(tmp_path):
    con = kql.connect(progress="off")
    image = np.zeros((16, 16, 3), np.float32)
    volume = kql.Volume(np.zeros((16, 16, 16), np.float32))
    with pytest.raises(PlanError, match="TUNE calibrates on images or on volumes, not both: 'a' is an image "
                                        "but 'b' is a volume"):
        con.execute("TUNE m ON a, b PATCH 4", m=net3d(), a=image, b=volume)
    with pytest.raises(PlanError, match="PATCH 4x4 is a 2-D patch"):
        con.execute("TUNE m ON b PATCH 4x4", m=net3d(), b=volume)
    with pytest.raises(PlanError, match="3-D"):
        con.execute("TUNE m ON a PATCH 4x4x4", m=nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1),
                                                               nn.Flatten()), a=image)
    np.save(tmp_path / "a.npy", np.zeros((8, 8, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((8, 9, 8), np.float32))
    with pytest.raises(PlanError, match="TUNE needs one input size: volume .*b.npy' is 8x9x8 but the first "
                                        "was 8x8x8 .*RESAMPLE"):
        con.execute(f"TUNE m ON '{tmp_path}' PATCH 4", m=net3d())
    assert not calibration.user_store().exists()


# ---------------------------------------------------------------- the contract on the trained 3-D net

def _volumes(start: int, count: int) -> torch.Tensor:
    return zoo.fmnist_volumes(load_fashion_mnist("test")[0][start:start + count], seed=start)


@pytest.fixture(scope="module")
def tuned(fmnist3d_net, tmp_path_factory):
    """(connection, TUNE's table, store folder): TUNE on four volumes saved as .npy."""
    root = tmp_path_factory.mktemp("volume-contract")
    (root / "tune").mkdir()
    for i, v in enumerate(_volumes(0, 4)):
        np.save(root / "tune" / f"v{i}.npy", v[0].numpy())
    con = kql.connect(progress="off")
    con.register_model("f3", fmnist3d_net)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KQL_DATA_DIR", str(root / "store"))
        table = con.execute(TUNE_Q.format(folder=root / "tune"))
    return con, table, root / "store"


@pytest.fixture
def con(tuned, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tuned[2]))
    return tuned[0]


def test_tune_on_volume_files(tuned, con):
    _, table, _ = tuned
    assert table.title.endswith("input 16x16x16, patch 4x4x4, stride 1x1x1, 4 volumes")
    (cal,) = [c for c in calibration.load_all() if c.source == "user"]
    assert cal.input_hw == (16, 16, 16) and cal.stride == (1, 1, 1) and cal.n_images == 4
    assert len(cal.refine["trajectories"]) == 4 and np.shape(next(iter(cal.exact_maps.values()))) == (13, 13, 13)
    assert cal.refine_margin(0.9) is not None
    row = con.execute("SHOW CALIBRATIONS").rows[0]
    assert row[2:5] == ["16x16x16", "4x4x4", "1x1x1"] and "0.9: +" in row[9]


def test_approx_ssim_holds_on_volumes_tune_never_saw(con):
    """APPROX SSIM 0.9 on held-out volumes: refinement is chosen (τ 0.8 is
    predicted to miss), stops at its goal, computes exact values, and the maps
    reach SSIM 0.9 against EXACT as on images (tests/test_tune.py): at least
    COVERAGE (80 %) of the volumes, and on average."""
    held = _volumes(HELD_OUT.start, len(HELD_OUT))
    reached = []
    for n in range(len(held)):
        v = kql.Volume(held[n, 0].numpy())
        exact = con.execute(f"{Q} EXACT", v=v)
        approx = con.execute(f"{Q} APPROX SSIM 0.9", v=v)
        contract = approx.plan.contract
        assert contract.chosen.name == "refine" and contract.chosen.meets
        assert all(c.meets for c in contract.candidates if c.chosen)
        assert not next(c for c in contract.candidates if c.name.startswith("τ")).meets
        assert approx.heatmap.shape == exact.heatmap.shape == (13, 13, 13) and approx.label == exact.label
        computed = approx.computed
        assert computed.shape == (13, 13, 13) and 0 < computed.mean() < 1
        np.testing.assert_allclose(approx.heatmap[computed], exact.heatmap[computed], atol=1e-5, rtol=0)
        goal = contract.refine.goal
        fitted = [s["estimated_ssim"] for s in approx.refine_stages[1:]]
        assert min(fitted[-refine.CONFIRM:]) >= goal and approx.estimated_ssim == fitted[-1]
        assert all(min(fitted[i - refine.CONFIRM:i]) < goal for i in range(refine.CONFIRM, len(fitted)))
        assert approx.refine_stages[0]["stage"] == "lattice" and approx.refine_stages[0]["positions"] == 64
        reached.append(heatmap_ssim(exact.heatmap, approx.heatmap))
    assert np.mean(np.asarray(reached) >= 0.9) >= calibration.COVERAGE and np.mean(reached) >= 0.9, reached


def test_a_plan_that_cannot_meet_the_target_is_never_chosen(con):
    v = kql.Volume(_volumes(HELD_OUT.start, 1)[0, 0].numpy())
    # stride 2: a 7x7x7 grid is too small to refine, and τ 0.8 is predicted to miss 0.9: exact
    q = "SELECT HEATMAP FROM v USING f3 PATCH 4 STRIDE 2 NORMALIZE NONE"
    approx = con.execute(f"{q} APPROX SSIM 0.9", v=v)
    assert approx.mode == "exact" and approx.computed is None
    assert any("APPROX SSIM 0.9: no approximate plan is predicted to meet SSIM 0.9: ran EXACT" in w
               and "too small to refine" in w for w in approx.warnings)
    np.testing.assert_array_equal(approx.heatmap, con.execute(f"{q} EXACT", v=v).heatmap)
    # DRILLDOWN is a permission, not a licence: a drill-down predicted to miss is not run
    dd = con.execute(f"{Q} APPROX SSIM 0.95 DRILLDOWN FRACTION 0.05 SPEEDUP 8", v=v)
    rejected = next(c for c in dd.plan.contract.candidates if c.name.startswith("drill-down"))
    assert not rejected.meets and not rejected.chosen and dd.plan.contract.chosen.meets
    assert any("DRILLDOWN FRACTION 0.05" in w and "is predicted to reach SSIM" in w for w in dd.warnings)


def test_explain_and_explain_analyze_on_volumes(con):
    v = kql.Volume(_volumes(HELD_OUT.start + 1, 1)[0, 0].numpy())
    text = str(con.execute(f"EXPLAIN {Q} APPROX SSIM 0.9", v=v))
    assert "APPROX SSIM 0.9: plans considered" in text
    assert "  ✓ exact: SSIM 1.000" in text and "✗ τ 0.8" in text
    assert "→ refine: SSIM ≥0.900 (checked at run time)" in text and "grid: 13x13x13 = 2197 positions" in text
    # the user's drill-down, chosen when it is predicted to meet the target and is cheapest
    dd = con.execute(f"EXPLAIN {Q} APPROX SSIM 0.8 DRILLDOWN", v=v)
    chosen = dd.plan.contract.chosen
    assert chosen.meets and chosen.cost == min(c.cost for c in dd.plan.contract.candidates if c.meets)
    if chosen.name.startswith("drill-down"):
        assert "drill-down: stage one at stride 2x2x2" in str(dd)
    analyzed = str(con.execute(f"EXPLAIN ANALYZE {Q} APPROX SSIM 0.9", v=v))
    assert "refinement: computed " in analyzed and " of 2197 positions (" in analyzed
    assert "estimated SSIM vs exact" in analyzed and "1. lattice: +64 positions → 64 computed" in analyzed


# ---------------------------------------------------------------- a video clip through the language

@pytest.mark.slow
def test_video_clip_through_the_language(tmp_path):
    """torchvision's r3d_18 (random weights) on a 3x8x32x32 clip saved as .npy:
    EXPLAIN, the heatmap INTO .png and .npy, and EXACT = NAIVE to 1e-5 (2x2x2
    positions: 4 frames x 16x16 pixels, every border)."""
    clip = (np.random.default_rng(0).random((3, 8, 32, 32)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", clip)
    con = kql.connect(progress="off")
    q = f"SELECT HEATMAP FROM '{tmp_path}/clip.npy' USING r3d_18 PATCH 4x16x16 STRIDE 4x16x16 RESAMPLE 8x32x32"
    text = str(con.execute(f"EXPLAIN {q}"))
    assert "Scan  file '" in text and "grid: 2x2x2 = 8 positions" in text and "patch: 4x16x16" in text
    exact = con.execute(f"{q} EXACT INTO '{tmp_path}/exact.npy'")
    naive = con.execute(f"{q} NAIVE")
    assert exact.heatmap.shape == (2, 2, 2) and np.ptp(exact.heatmap) > 0
    np.testing.assert_allclose(exact.heatmap, naive.heatmap, atol=1e-5, rtol=0)
    saved = np.load(tmp_path / "exact.npy")
    assert saved.shape == (8, 32, 32)          # in the clip's voxel grid (T, H, W)
    figure = con.execute(f"{q} INTO '{tmp_path}/clip.png'")
    assert figure.output_path.endswith("clip.png") and os.path.getsize(tmp_path / "clip.png") > 10_000
    from PIL import Image
    assert Image.open(tmp_path / "clip.png").size[0] > 200


def test_progress_and_ctrl_c_during_refinement_on_a_volume(con):
    from kql.errors import QueryInterrupted
    from kql.executor.common import batch_hook
    v = kql.Volume(_volumes(HELD_OUT.start + 2, 1)[0, 0].numpy())
    seen = []
    with batch_hook(lambda done, total: seen.append((done, total))):
        r = con.execute(f"{Q} APPROX SSIM 0.9", v=v)
    assert seen[0] == (0, 2197) and all(t == 2197 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == r.computed.sum()

    def stop(done, total):
        if done > 100:
            raise KeyboardInterrupt
    with batch_hook(stop), pytest.raises(QueryInterrupted, match=r"^interrupted during refinement after \d+ "
                                                                 r"of 2197 positions \(estimated SSIM"):
        con.execute(f"{Q} APPROX SSIM 0.9", v=v)
