"""Approximate inference: projective-field thresholding (APPROX TAU) and
adaptive drill-down (DRILLDOWN).

Thresholding is checked against its definition, computed independently with
full tensors: at every conv/pool layer the occluded image's output is kept
only inside the capped region and the unoccluded output is used everywhere
else. Drill-down is checked against the exact heatmap at every position it
computed, and against its own selection rule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kql
from kql.errors import PlanError
from kql.planner import drilldown
from kql.planner.geometry import Rects, out_region, propagate, threshold, threshold_size
from kql.planner.graph import Kind
from helpers import patch_sensitive_cnn, rand_image


def _net(seed=0):
    return patch_sensitive_cnn(32, seed)


def _image(seed=0, size=32):
    return rand_image(size, size, seed)


@pytest.fixture(scope="module")
def con():
    return kql.connect(progress="off")


Q = "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 2"


# ---------------------------------------------------------------- geometry

def test_threshold_size_rounds_half_up_and_keeps_one():
    assert [threshold_size(n, 0.5) for n in (1, 2, 3, 7, 14, 28)] == [1, 1, 2, 4, 7, 14]
    assert threshold_size(224, 0.01) == 2 and threshold_size(10, 0.01) == 1
    assert threshold_size(56, 1.0) == 56


@pytest.mark.parametrize("tau", [0.2, 0.35, 0.5, 0.65])
def test_propagate_caps_local_layers_centred(tau):
    graph = kql.connect().plan(f"{Q} APPROX TAU {tau}", {"img": _image(), "net": _net()}).graph
    ys, xs = np.meshgrid(np.arange(0, 27, 3), np.arange(0, 27, 3), indexing="ij")
    rects = Rects.from_patches(ys.ravel(), xs.ravel(), (6, 6))
    capped = propagate(graph, rects, tau)
    checked = 0
    for layer in graph.layers():
        if layer.kind == Kind.INPUT:
            continue
        exact = out_region(layer, [capped[i] for i in layer.inputs])  # this layer, uncapped
        got = capped[layer.name]
        if layer.kind != Kind.LOCAL:
            assert got == exact
            continue
        ch, cw = threshold_size(layer.out_hw[0], tau), threshold_size(layer.out_hw[1], tau)
        assert (got.h == np.minimum(exact.h, ch)).all() and (got.w == np.minimum(exact.w, cw)).all()
        assert exact.contains(got).all()
        # centred: the cut before and after differ by at most one row/column
        assert (np.abs((got.y0 - exact.y0) - (exact.y1 - got.y1)) <= 1).all()
        assert (np.abs((got.x0 - exact.x0) - (exact.x1 - got.x1)) <= 1).all()
        checked += int((got.area < exact.area).sum())
    assert checked > 0, "no region was capped: the test would not test anything"


def test_tau_one_and_none_give_exact_regions():
    graph = kql.connect().plan(f"{Q} EXACT", {"img": _image(), "net": _net()}).graph
    rects = Rects.from_patches(np.array([0, 13, 26]), np.array([5, 13, 26]), (6, 6))
    exact, one = propagate(graph, rects), propagate(graph, rects, 1.0)
    assert all(exact[k] == one[k] for k in exact)


def test_threshold_keeps_the_middle():
    class L:
        out_hw = (10, 10)
    r = threshold(L(), Rects(np.array([0, 2]), np.array([0, 0]), np.array([10, 9]), np.array([3, 10])), 0.4)
    assert r.y0.tolist() == [3, 3] and r.y1.tolist() == [7, 7]     # 10 -> rows 3..6, 7 -> rows 3..6
    assert r.x0.tolist() == [0, 3] and r.x1.tolist() == [3, 7]     # 3 stays, 10 -> cols 3..6


# ---------------------------------------------------------------- executor

def _reference(plan, net):
    """Thresholded inference by its definition, one position at a time with
    full tensors: each local layer's output is the occluded one inside the
    position's (capped) region and the unoccluded view elsewhere."""
    names = [l.name for l in plan.graph.layers() if l.kind not in (Kind.INPUT, Kind.OUTPUT)]
    kinds = {l.name: l.kind for l in plan.graph.layers()}
    assert len(names) == len(net)
    x0 = plan.input[None]
    views, v = [], x0
    with torch.inference_mode():
        for m in net:
            v = m(v)
            views.append(v)
        ys, xs = plan.positions()
        ph, pw = plan.patch
        out = []
        for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
            a = x0.clone()
            a[:, :, y:y + ph, x:x + pw] = plan.fill.view(1, -1, 1, 1)
            for name, m, view in zip(names, net, views):
                a = m(a)
                if kinds[name] == Kind.LOCAL:
                    r = plan.regions[name][i:i + 1]
                    keep = view.clone()
                    y0, y1, x0_, x1 = int(r.y0[0]), int(r.y1[0]), int(r.x0[0]), int(r.x1[0])
                    keep[:, :, y0:y1, x0_:x1] = a[:, :, y0:y1, x0_:x1]
                    a = keep
            out.append(a.reshape(-1))
    return torch.softmax(torch.stack(out), 1)


@pytest.mark.slow  # a naive reference per position
@pytest.mark.parametrize("tau", [0.3, 0.6])
def test_approx_matches_its_definition(con, tau):
    net, img = _net(1), _image(1)
    plan = con.plan(f"{Q} APPROX TAU {tau}", {"img": img, "net": net})
    assert plan.mode == "approx" and plan.tau == tau
    ref = _reference(plan, net)
    result = con.execute(f"{Q} APPROX TAU {tau}", img=img, net=net)
    expected = ref[:, result.label].numpy().reshape(result.heatmap.shape)
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5, rtol=0)
    exact = con.execute(f"{Q} EXACT", img=img, net=net).heatmap
    assert np.abs(result.heatmap - exact).max() > 1e-4, "thresholding changed nothing: a vacuous test"


@pytest.mark.slow  # several full runs
def test_approx_does_not_depend_on_batching(con):
    net, img = _net(2), _image(2)
    runs = [con.execute(f"{Q} APPROX TAU 0.4{b}", img=img, net=net).heatmap for b in ("", " BATCH 1", " BATCH 7")]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], atol=1e-6, rtol=0)


def test_tau_one_is_exact(con):
    net, img = _net(3), _image(3)
    r = con.execute(f"{Q} APPROX TAU 1", img=img, net=net)
    assert r.mode == "exact" and r.tau is None
    np.testing.assert_allclose(r.heatmap, con.execute(f"{Q} EXACT", img=img, net=net).heatmap, atol=1e-6)


def test_lower_tau_costs_fewer_flops(con):
    b = {"img": _image(), "net": _net()}
    r = [con.plan(f"{Q} APPROX TAU {t}", b).cost.r_grid for t in (0.9, 0.5, 0.25)]
    exact = con.plan(f"{Q} EXACT", b).cost.r_grid
    assert exact <= r[0] <= r[1] <= r[2] and r[2] > exact


@pytest.mark.parametrize("clause,message", [
    ("APPROX TAU 0", "APPROX TAU must be in (0, 1], got 0"),
    ("APPROX TAU 1.5", "APPROX TAU must be in (0, 1], got 1.5"),
    ("APPROX SSIM -0.2", "APPROX SSIM must be in (0, 1], got -0.2"),
    ("DRILLDOWN FRACTION 0", "DRILLDOWN FRACTION must be between 0 and 1 (exclusive), got 0"),
    ("DRILLDOWN FRACTION 1", "DRILLDOWN FRACTION must be between 0 and 1 (exclusive), got 1"),
    ("DRILLDOWN SPEEDUP 1", "DRILLDOWN SPEEDUP must be above 1, got 1"),
    ("DRILLDOWN SPEEDUP 4", "DRILLDOWN SPEEDUP 4 is impossible with FRACTION 0.25: stage two alone runs "
                            "0.25 of the positions, so the speedup must stay below 1/FRACTION = 4 "
                            "(Krypton eq. 48)"),
])
def test_bad_approx_and_drilldown_settings(con, clause, message):
    with pytest.raises(PlanError) as e:
        con.plan(f"{Q} {clause}", {"img": _image(), "net": _net()})
    assert str(e.value) == message


def test_ssim_without_calibration_runs_exact_and_says_how_to_tune(con, tmp_path, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tmp_path))
    net, img = _net(), _image()
    r = con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)
    assert r.mode == "exact" and r.tau is None
    assert any("no SSIM calibration for net" in w and "TUNE net ON <sample images> PATCH 6" in w
               for w in r.warnings)
    np.testing.assert_allclose(r.heatmap, con.execute(f"{Q} EXACT", img=img, net=net).heatmap, atol=1e-6)


def test_explain_shows_tau_and_its_speedup(con):
    text = str(con.explain(f"{Q} APPROX TAU 0.3", img=_image(), net=_net()))
    assert "Plan (approx)" in text
    assert "approximate: projective-field threshold τ = 0.3 from APPROX TAU; no SSIM prediction" in text
    assert "regions capped at τ = 0.3 over the grid" in text
    assert "exact incremental would be R = " in text


# ---------------------------------------------------------------- drill-down

def test_stage_one_stride_follows_eq_47():
    assert drilldown.stage_one_stride(4, 0.25, 3.0) == 16
    assert drilldown.stage_one_stride(1, 0.25, 3.0) == 4
    assert drilldown.stage_one_stride(3, 0.1, 1.05) == 3    # f = 1.08: stage one = the query's stride
    for s2, r, t in [(2, 0.1, 5.0), (4, 0.3, 2.0), (1, 0.05, 10.0)]:
        s1 = drilldown.stage_one_stride(s2, r, t)
        assert s1 % s2 == 0
        f = np.sqrt(t / (1 - r * t))
        assert np.floor(f) * s2 <= s1 <= np.ceil(f) * s2
    assert round(drilldown.expected_speedup(16, 4, 0.25), 3) == 3.2


def test_interpolate_is_exact_on_nodes_and_linear_between():
    ys1, xs1 = np.array([0, 4, 6]), np.array([0, 2])
    coarse = np.array([[0.0, 1.0], [4.0, 5.0], [6.0, 7.0]])  # = y + x / 2
    ys2, xs2 = np.arange(7), np.arange(3)
    got = drilldown.interpolate(ys1, xs1, coarse, ys2, xs2)
    np.testing.assert_allclose(got, ys2[:, None] + xs2[None, :] / 2)


@pytest.mark.parametrize("mode", ["EXACT", "APPROX TAU 0.5", "NAIVE"])
def test_drilldown_computes_the_selected_positions(con, mode):
    net, img = _net(4), _image(4)
    q = "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 1"
    full = con.execute(f"{q} {mode}", img=img, net=net)
    r = con.execute(f"{q} {mode} DRILLDOWN FRACTION 0.2 SPEEDUP 3", img=img, net=net)
    plan = r.plan
    dd = plan.drilldown
    assert dd.stride_one == (3, 3) and r.heatmap.shape == full.heatmap.shape
    # Every computed position equals the full run of the same mode.
    assert r.computed[dd.on_coarse].all()
    np.testing.assert_allclose(r.heatmap[r.computed], full.heatmap[r.computed], atol=1e-5, rtol=0)
    # Stage two ran exactly the chosen positions stage one had not run.
    coarse = full.heatmap[np.ix_(np.isin(plan.ys, dd.stage_one.ys), np.isin(plan.xs, dd.stage_one.xs))]
    estimate = drilldown.interpolate(dd.stage_one.ys, dd.stage_one.xs, coarse, plan.ys, plan.xs)
    chosen = np.zeros(estimate.size, bool)
    chosen[drilldown.select(estimate.astype(np.float32), dd.n_select)] = True
    assert dd.n_select == int(np.ceil(0.2 * full.heatmap.size))
    np.testing.assert_array_equal(r.computed.ravel(), chosen | dd.on_coarse.ravel())
    assert r.stage_positions == (dd.n_coarse, int((chosen & ~dd.on_coarse.ravel()).sum()))
    # The rest is stage one's estimate.
    np.testing.assert_allclose(r.heatmap[~r.computed], estimate[~r.computed], atol=1e-6)
    assert "stage one" in r.timings and "stage two" in r.timings


@pytest.mark.parametrize("mode", ["EXACT", "APPROX TAU 0.5 DRILLDOWN FRACTION 0.2 SPEEDUP 3", "EXACT REGION (4, 4, 20, 20)"])
def test_one_unoccluded_forward_pass_per_query(con, mode):
    """The reference inference is also the materialization of every runner
    (drill-down has two): the first conv sees the whole unoccluded image once."""
    from kql.executor import execute
    net, img = _net(5), _image(5)
    plan = con.plan(f"SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 1 {mode}", {"img": img, "net": net})
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    whole = []
    hook = first.register_forward_hook(
        lambda m, args, out: whole.append(args[0].shape[0]) if args[0].shape[-2:] == (32, 32) else None)
    try:
        r = execute(plan, progress="off")
    finally:
        hook.remove()
    assert whole == [1]
    # the reference through the traced graph is the model's own
    assert r.p_original == pytest.approx(con.execute(
        "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 8 NAIVE", img=img, net=net).p_original, abs=1e-6)


def test_drilldown_explain(con):
    text = str(con.explain("SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 2 APPROX TAU 0.5 DRILLDOWN",
                           img=_image(), net=_net()))
    assert "DrillDown  S1: 8x8 · r: 0.25 · expected speedup: 3.20x" in text
    assert "stage: one, stride 8x8" in text and "stage: two, the " in text
    assert "drill-down: stage one at stride 8x8" in text and "Krypton eq. 46" in text
