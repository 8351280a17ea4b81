"""APPROX SSIM as a contract: the plans considered, the choice, and adaptive
refinement (``planner.refine``, ``executor/refine.py``).

Refinement is checked against the exact heatmap at every position it computed
(to 1e-5), against its own stopping rule, and through its progress hook and
Ctrl-C. The contract is checked with calibrations made for the test (so the
predictions are known): a plan predicted to miss the target is never chosen,
and when none meets it the query runs exact and says why.
"""
from __future__ import annotations

import numpy as np
import pytest

import kql
from kql import calibration
from kql.errors import ExecutionError, QueryInterrupted
from kql.executor.common import batch_hook
from kql.planner import refine
from kql.planner.candidates import enumerate_plans
from helpers import patch_sensitive_cnn, rand_image


def _net(seed=0):
    return patch_sensitive_cnn(64, seed)


def _image(seed=0, size=64):
    return rand_image(size, size, seed)


Q = "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 2"     # a 30x30 grid


def _calibration(net, tau_ssim=(1.0, 0.5, 0.3), trajectory=None, maps=None):
    """A calibration of ``net`` whose predictions the test chooses: τ 0.7 and
    0.5 reach ``tau_ssim`` on the one tuning image; refinement follows
    ``trajectory`` (share, estimated SSIM, SSIM) on it."""
    traj = trajectory if trajectory is not None else [
        [0.07, 0.0, 0.70], [0.11, 0.95, 0.95], [0.15, 0.96, 0.96], [0.19, 0.97, 0.97], [1.0, 1.0, 1.0]]
    return calibration.Calibration(
        "net", "test", calibration.weights_fingerprint(net), (64, 64), (6, 6), (2, 2), "gray",
        [1.0, 0.7, 0.5], {"a": list(tau_ssim)}, (0.0, 0.0, 1.0), created="2026-12-03T00:00:00+00:00",
        refine={"step": 4, "batch": 0.04, "audit": 0.2, "stride": [2, 2], "trajectories": {"a": traj}},
        exact_maps=maps)


@pytest.fixture
def con():
    return kql.connect(progress="off")


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tmp_path))
    return tmp_path / "calibrations.json"


# ---------------------------------------------------------------- the policy

def test_lattice_holds_the_corners_and_the_last_row_and_column():
    idx = refine.RefinePolicy(0.9).initial((10, 7))
    rows, cols = np.unravel_index(idx, (10, 7))
    assert sorted(set(rows.tolist())) == [0, 4, 8, 9] and sorted(set(cols.tolist())) == [0, 4, 6]


def test_interpolation_keeps_computed_values_and_is_exact_on_planes():
    y, x = np.mgrid[0:21, 0:21]
    plane = 0.3 + 0.01 * y - 0.02 * x
    computed = np.zeros(plane.shape, bool)
    computed.reshape(-1)[refine.RefinePolicy(0.9).initial(plane.shape)] = True
    est, feature = refine.interpolate(np.where(computed, plane, np.nan), computed, 4)
    np.testing.assert_allclose(est, plane, atol=1e-12)
    assert (feature[computed] == 0).all() and (feature[~computed] > 0).all()


def test_refinement_stops_as_specified():
    """It stops at the first stage after which the last CONFIRM estimates reached
    target + margin, and not before; or when everything is computed."""
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter
    exact = gaussian_filter(rng.standard_normal((41, 41)), 2)
    policy = refine.RefinePolicy(0.9, margin=0.02)
    state = policy.start(exact.shape)
    todo = policy.initial(exact.shape)
    stops = 0
    while len(todo):
        assert not policy.reached(state.stages)
        policy.update(state, todo, exact.reshape(-1)[todo], "stage")
        todo = policy.next(state)
        stops += 1
    fitted = [s["estimated_ssim"] for s in state.stages[1:]]
    if not state.computed.all():
        assert len(fitted) >= refine.CONFIRM and min(fitted[-refine.CONFIRM:]) >= 0.92
    # the trajectory TUNE records stops at the same place
    share, _ = refine.stop_point(refine.trajectory(policy, exact), 0.92)
    assert share == pytest.approx(state.computed.mean())
    # computed positions hold the exact values
    np.testing.assert_array_equal(state.estimate[state.computed], exact[state.computed])


def test_a_flat_map_stops_after_confirming():
    policy = refine.RefinePolicy(0.95)
    state = policy.start((33, 33))
    todo = policy.initial((33, 33))
    while len(todo):
        policy.update(state, todo, np.full(len(todo), 0.5), "stage")
        todo = policy.next(state)
    assert len(state.stages) == 1 + refine.CONFIRM and state.estimated_ssim == 1.0


def test_margin_from_the_tuning_trajectories():
    net = _net()
    cal = _calibration(net, trajectory=[[0.1, 0.0, 0.7], [0.2, 0.91, 0.85], [0.3, 0.93, 0.90],
                                        [0.4, 0.95, 0.92], [0.5, 0.96, 0.95], [1.0, 1.0, 1.0]])
    # 0.9 (+ cushion 0.01): the stop must come at share 0.4 or later: estimates 0.93, 0.95 reach 0.9 + 0.03
    margin, share = cal.refine_margin(0.9)
    assert share == pytest.approx(0.4) and 0.9 + margin <= 0.93 and 0.9 + margin > 0.91
    assert _calibration(net, trajectory=[[0.1, 0.0, 0.5], [0.5, 1.0, 0.6]]).refine_margin(0.9) is None
    assert calibration.Calibration.from_json(cal.to_json()).refine == cal.refine


# ---------------------------------------------------------------- the contract

def test_candidates_never_choose_a_plan_predicted_to_miss(con):
    net, img = _net(), _image()
    plan = con.plan(f"{Q} EXACT", {"img": img, "net": net})
    policy = refine.RefinePolicy(0.9)
    cal = _calibration(net, tau_ssim=(1.0, 0.85, 0.6))
    cands = enumerate_plans(plan, 0.9, cal, policy, None, lambda tau: 0.2)
    chosen = [c for c in cands if c.chosen]
    assert len(chosen) == 1 and chosen[0].name == "exact"
    tau = next(c for c in cands if c.name.startswith("τ"))
    assert not tau.meets and tau.predicted_ssim == pytest.approx(0.85)
    # the same with refinement measured: refinement, cheaper than exact, is chosen
    cands = enumerate_plans(plan, 0.9, cal, policy, 0.3, lambda tau: 0.2)
    assert next(c for c in cands if c.chosen).name == "refine"
    # a τ that meets the target and is cheaper wins
    cands = enumerate_plans(plan, 0.9, _calibration(net, tau_ssim=(1.0, 0.95, 0.6)), policy, 0.3, lambda t: 0.2)
    assert next(c for c in cands if c.chosen).name == "τ 0.7"


def test_no_plan_meets_the_target_runs_exact_and_says_why(con):
    net, img = _net(), _image()
    calibration.save(_calibration(net, tau_ssim=(1.0, 0.6, 0.4), trajectory=[[0.1, 0.0, 0.5], [0.5, 1.0, 0.6]]))
    r = con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)
    assert r.mode == "exact" and r.tau is None and r.estimated_ssim is None
    (w,) = [w for w in r.warnings if w.startswith("APPROX SSIM 0.9")]
    assert "no approximate plan is predicted to meet SSIM 0.9: ran EXACT" in w
    assert "τ 0.7: 100 % of the 1 tuning images reached 0.600" in w or "τ 0.7:" in w
    np.testing.assert_allclose(r.heatmap, con.execute(f"{Q} EXACT", img=img, net=net).heatmap, atol=1e-6)
    text = str(con.explain(f"{Q} APPROX SSIM 0.9", img=img, net=net))
    assert "APPROX SSIM 0.9: plans considered" in text and "→ exact: SSIM 1.000" in text
    assert "✗ refine:" in text and "✗ τ 0.7: SSIM 0.600" in text


def test_refinement_computes_exact_values_and_reports_them(con):
    net, img = _net(), _image()
    calibration.save(_calibration(net))
    r = con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)
    exact = con.execute(f"{Q} EXACT", img=img, net=net)
    assert r.plan.refine is not None and r.mode == "approx" and r.tau is None
    assert r.computed.shape == r.heatmap.shape and 0 < r.computed.sum() <= r.computed.size
    np.testing.assert_allclose(r.heatmap[r.computed], exact.heatmap[r.computed], atol=1e-5, rtol=0)
    assert r.estimated_ssim is not None and r.refine_stages[0]["stage"] == "lattice"
    assert sum(s["positions"] for s in r.refine_stages) == r.computed.sum()
    if not r.computed.all():
        assert r.estimated_ssim >= 0.9 and r.plan.refine.reached(r.refine_stages)
    assert "refined:" in str(r) and f"estimated SSIM vs exact {r.estimated_ssim:.3f}" in str(r)


def test_explain_shows_candidates_and_analyze_the_stages(con):
    net, img = _net(), _image()
    calibration.save(_calibration(net))
    text = str(con.explain(f"{Q} APPROX SSIM 0.9", img=img, net=net))
    assert "APPROX SSIM 0.9: plans considered" in text
    assert "→ refine: SSIM ≥0.900 (checked at run time)" in text and "✓ exact" in text
    assert "predicted time from the runtime model" in text and "≈" in text
    e = con.explain(f"{Q} APPROX SSIM 0.9", analyze=True, img=img, net=net)
    assert "refinement: computed " in e.text and "1. lattice: +" in e.text
    assert f"estimated SSIM vs exact {e.result.estimated_ssim:.3f}" in e.text


def test_the_contract_is_a_typed_record_the_tree_and_the_execution_carry(con):
    """The choice is an immutable record on the plan (rules replace records);
    EXPLAIN's tree renders the run-time check from it; what refinement did
    comes back on the executor's Execution, which kql.compiler.run copies."""
    import dataclasses

    from kql.executor import execute
    from kql.planner.plan import SsimContract
    net, img = _net(), _image()
    calibration.save(_calibration(net))
    plan = con.plan(f"{Q} APPROX SSIM 0.9", {"img": img, "net": net})
    assert isinstance(plan.contract, SsimContract) and plan.contract.target == 0.9
    assert plan.contract.chosen.name == "refine" and plan.refine is plan.contract.refine
    assert plan.candidates == plan.contract.candidates and plan.predicted_ssim == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.contract.refine.margin = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.contract.candidates[0].chosen = True
    infer = next(s for s in con.explain(f"{Q} APPROX SSIM 0.9", img=img, net=net).steps if s["op"] == "Infer")
    assert infer["details"]["check"].startswith("SSIM ≥ 0.9 checked at run time")
    assert infer["details"]["mode"].startswith("approximate (adaptive refinement")
    done = execute(plan, progress="off")
    assert done.refine_stages[0]["stage"] == "lattice" and done.computed.any()
    assert 0 < done.estimated_ssim <= 1 and done.stage_positions is None


def test_drilldown_predicted_to_miss_is_rejected_with_a_warning(con):
    net, img = _net(), _image()
    exact = con.execute(f"{Q} EXACT", img=img, net=net).heatmap
    calibration.save(_calibration(net, maps={"a": exact.tolist()}))
    cal = calibration.lookup(con.plan(f"{Q} EXACT", {"img": img, "net": net}).spec, (64, 64), (6, 6))
    predicted = cal.drilldown_ssim(0.25, (8, 8), (2, 2))
    r = con.execute(f"{Q} APPROX SSIM 0.99 DRILLDOWN", img=img, net=net)
    assert predicted < 0.99
    assert any(w.startswith(f"DRILLDOWN FRACTION 0.25 SPEEDUP 3 is predicted to reach SSIM {predicted:.3f} < 0.99")
               for w in r.warnings)
    assert r.stage_positions is None     # Krypton's drill-down did not run
    # predicted to meet a low target, and the others not: it runs
    calibration.save(_calibration(net, tau_ssim=(1.0, 0.01, 0.01), trajectory=[[0.1, 0.0, 0.0], [1.0, 1.0, 1.0]],
                                  maps={"a": exact.tolist()}))
    r = con.execute(f"{Q} APPROX SSIM {max(0.05, predicted - 0.05):.2f} DRILLDOWN", img=img, net=net)
    assert r.stage_positions is not None
    # as replayed: both stages compute exact values
    assert r.plan.drilldown.stage_one.mode == "exact" and r.plan.tau is None
    np.testing.assert_allclose(r.heatmap[r.computed], exact[r.computed], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- progress and Ctrl-C

def test_progress_hook_sees_the_refinement(con):
    net, img = _net(), _image()
    calibration.save(_calibration(net))
    seen = []
    with batch_hook(lambda done, total: seen.append((done, total))):
        r = con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)
    assert seen[0] == (0, 900) and all(t == 900 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == r.computed.sum()


@pytest.mark.parametrize("error", [KeyboardInterrupt, QueryInterrupted])
def test_ctrl_c_during_refinement(con, error):
    net, img = _net(), _image()
    calibration.save(_calibration(net))

    def hook(done, total):
        if done > 100:
            raise error("stop")
    with batch_hook(hook), pytest.raises(QueryInterrupted, match=r"^interrupted during refinement after \d+ "
                                                                  r"of 900 positions"):
        con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)


def test_a_model_failing_during_refinement_is_named(con, monkeypatch):
    from kql.executor.incremental import IncrementalRunner
    net, img = _net(), _image()
    calibration.save(_calibration(net))

    def fail(self, idx, label):
        raise RuntimeError("shapes do not match\nsecond line")
    monkeypatch.setattr(IncrementalRunner, "run", fail)
    with pytest.raises(ExecutionError, match=r"^model 'net' failed on a batch of \d+ occluded images: "
                                             r"RuntimeError: shapes do not match( \(|$)"):
        con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)


def test_drilldown_without_a_calibration_does_not_skip_positions(con):
    net, img = _net(), _image()
    r = con.execute(f"{Q} APPROX SSIM 0.9 DRILLDOWN", img=img, net=net)
    assert r.mode == "exact" and r.stage_positions is None and r.computed is None
    assert "DRILLDOWN with APPROX SSIM needs the calibration too: ran every position" in r.warnings


def test_several_labels_never_choose_refinement_and_tau_says_what_it_predicts(con, monkeypatch):
    """Refinement chooses positions for one map; several labels compute every
    position of each, so the contract does not count on refinement's savings.
    A τ plan's SSIM is calibrated on the predicted class's map only: it says so."""
    from kql.planner.rules import approximate
    monkeypatch.setattr(approximate, "work_shares",                     # this small net gains nothing from τ
                        lambda graph, starts, patch: lambda tau, gates="exact": 0.5)
    net, img = _net(), _image()
    calibration.save(_calibration(net))
    plan = con.plan(f"{Q} LABEL TOP 2 APPROX SSIM 0.9", {"img": img, "net": net})
    (cand,) = [c for c in plan.candidates if c.name == "refine"]
    assert not cand.meets and not cand.chosen and "several labels" in cand.note
    assert plan.refine is None and plan.contract.chosen.name == "exact"
    calibration.save(_calibration(net, tau_ssim=(1.0, 0.95, 0.6)))
    r = con.execute(f"{Q} LABEL TOP 2 APPROX SSIM 0.9", img=img, net=net)
    assert r.tau == pytest.approx(0.7) and len(r.maps) == 2
    assert any("other classes' maps at τ = 0.7 have no SSIM prediction" in w for w in r.warnings)
    one = con.execute(f"{Q} APPROX SSIM 0.9", img=img, net=net)
    assert not any("other classes" in w for w in one.warnings)
