"""Approximate global gates (``GATES LOCAL`` / ``GATES FROZEN`` with APPROX).

A squeeze-and-excitation gate reads the whole map, so exact IVM recomputes
everything after it. The approximations are defined on the network itself
and checked here against that definition, computed independently with full
tensors and forward hooks on the SE modules:

- LOCAL: each SE block's output is the occluded output inside the region the
  planner propagates for it (with local gates), the unoccluded output outside.
- FROZEN: each SE block scales its (occluded) input by its unoccluded gate.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import SqueezeExcitation

import kql
from kql import calibration, tune, zoo
from kql.errors import PlanError
from kql.planner.geometry import Rects, gate_sources, propagate
from kql.sources.models import trained_like
from helpers import rand_image

QUERY = "SELECT HEATMAP FROM img USING net PATCH 10 STRIDE 5"


def se_net() -> nn.Module:
    torch.manual_seed(0)
    net = trained_like(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        SqueezeExcitation(8, 4),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        SqueezeExcitation(12, 4),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))
    with torch.no_grad():  # a confident classifier, so the patch moves the probabilities
        net[-1].weight.mul_(40)
    return net.eval()


def _se_modules(model):
    return [m for m in model.modules() if isinstance(m, SqueezeExcitation)]


def _gate_muls(graph):
    """The SE blocks' multiplications, in execution order."""
    return [layer.name for layer in graph.layers() if layer.op == "mul" and
            any(graph[i].out_hw == (1, 1) and graph[i].spatial for i in layer.inputs)]


def _reference(plan, model, gates: str) -> np.ndarray:
    """Probabilities of the plan's label under the gate approximation,
    computed with full tensors (one occluded image at a time)."""
    ses = _se_modules(model)
    ys, xs = plan.positions()
    regions = propagate(plan.graph, Rects.from_patches(ys, xs, plan.patch), None, gates)
    muls = _gate_muls(plan.graph)
    assert len(muls) == len(ses)
    views, scales = [], []

    def keep(module, inp, out):
        views.append(out.clone())
        scales.append(module._scale(inp[0]).clone())

    handles = [m.register_forward_hook(keep) for m in ses]
    with torch.inference_mode():
        logits = model(plan.input[None])
    for h in handles:
        h.remove()
    label = int(logits.argmax())
    ph, pw = plan.patch
    out = []
    for pos, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
        def hook(module, inp, result, k=None):
            k = ses.index(module)
            if gates == "frozen":
                return inp[0] * scales[k]
            r = regions[muls[k]][pos:pos + 1]
            inside = torch.zeros_like(result, dtype=torch.bool)
            inside[..., int(r.y0[0]):int(r.y1[0]), int(r.x0[0]):int(r.x1[0])] = True
            return torch.where(inside, result, views[k])

        handles = [m.register_forward_hook(hook) for m in ses]
        img = plan.input.clone()
        img[:, y:y + ph, x:x + pw] = plan.fill.view(-1, 1, 1)
        with torch.inference_mode():
            out.append(torch.softmax(model(img[None]), 1)[0, label].item())
        for h in handles:
            h.remove()
    return np.array(out, np.float32).reshape(len(plan.ys), len(plan.xs))


@pytest.fixture(scope="module")
def setup():
    return se_net(), rand_image(40, 36, seed=3)


def test_gate_sources_are_the_squeezes_not_the_classifier_pool(setup):
    model, image = setup
    plan = kql.connect(progress="off").plan(f"{QUERY} EXACT", {"img": image, "net": model})
    sources = gate_sources(plan.graph)
    assert len(sources) == 2
    assert all(plan.graph[name].out_hw == (1, 1) for name in sources)
    head = [layer.name for layer in plan.graph.layers() if layer.out_hw == (1, 1) and layer.spatial
            and plan.graph[layer.inputs[0]].out_hw != (1, 1)]
    assert len(head) == 3 and set(head) - sources  # the classifier's pool is not a gate


@pytest.mark.parametrize("gates", ["local", "frozen"])
def test_approximate_gates_equal_their_definition(setup, gates):
    model, image = setup
    con = kql.connect(progress="off")
    query = f"{QUERY} APPROX TAU 1 GATES {gates.upper()}"
    plan = con.plan(query, {"img": image, "net": model})
    expected = _reference(plan, model, gates)
    exact = con.execute(f"{QUERY} EXACT", img=image, net=model).heatmap
    assert np.abs(expected - exact).max() > 1e-3  # the approximation is not exact here
    for batch in ("", " BATCH 1", " BATCH 7"):
        got = con.execute(query + batch, img=image, net=model).heatmap
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_gates_local_keeps_regions_local_and_raises_r(setup):
    model, image = setup
    con = kql.connect(progress="off")
    exact = con.plan(f"{QUERY} EXACT", {"img": image, "net": model})
    local = con.plan(f"{QUERY} APPROX TAU 1 GATES LOCAL", {"img": image, "net": model})
    assert local.mode == "approx" and local.gates == "local" and local.tau is None
    assert local.cost.r_grid > 1.5 * exact.cost.r_grid
    text = con.execute(f"EXPLAIN {QUERY} APPROX TAU 1 GATES LOCAL", img=image, net=model).text
    assert "2 global gates local (recomputed, applied only where the patch changed the map)" in text
    assert "gates local" in text


def test_gates_with_tau_compose(setup):
    model, image = setup
    con = kql.connect(progress="off")
    plan = con.plan(f"{QUERY} APPROX TAU 0.5 GATES FROZEN", {"img": image, "net": model})
    assert plan.tau == 0.5 and plan.gates == "frozen"
    result = con.execute(f"{QUERY} APPROX TAU 0.5 GATES FROZEN", img=image, net=model)
    assert np.isfinite(result.heatmap).all()


@pytest.mark.parametrize("clause, message", [
    ("GATES LOCAL", "GATES LOCAL approximates: write it with APPROX TAU t (APPROX TAU 1 GATES LOCAL keeps "
                    "every other region exact)"),
    ("EXACT GATES FROZEN", "GATES FROZEN approximates: write it with APPROX TAU t (APPROX TAU 1 GATES FROZEN "
                           "keeps every other region exact)"),
])
def test_gates_need_approx(setup, clause, message):
    model, image = setup
    with pytest.raises(PlanError) as e:
        kql.connect(progress="off").plan(f"{QUERY} {clause}", {"img": image, "net": model})
    assert str(e.value) == message


def test_gates_exact_is_exact_inference(setup):
    model, image = setup
    con = kql.connect(progress="off")
    a = con.execute(f"{QUERY} APPROX TAU 1 GATES EXACT", img=image, net=model)
    b = con.execute(f"{QUERY} EXACT", img=image, net=model)
    assert a.mode == "exact"
    np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6, rtol=0)


# -- Gate freezing in the APPROX SSIM contract (planner/candidates.py) ---------------------------

SSIM_QUERY = f"{QUERY} APPROX SSIM"

#: measured SSIM per tuning image at τ 1 (the gates alone), 0.7 and 0.5, per gate mode
GATE_SSIM = {"local": {"a": [0.97, 0.93, 0.80], "b": [0.98, 0.95, 0.85]},
             "frozen": {"a": [0.86, 0.80, 0.70], "b": [0.88, 0.82, 0.72]}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("KQL_DATA_DIR", str(tmp_path / "kql-data"))
    return tmp_path / "kql-data" / "calibrations.json"


def _calibrate(model, con, image, gates=GATE_SSIM):
    """Store a calibration for ``model`` bound as ``net`` whose τ plans all
    miss 0.6 and whose gate plans reached ``gates`` (None: an older calibration
    without gate measurements)."""
    plan = con.plan(f"{QUERY} EXACT", {"img": image, "net": model})
    taus = [1.0, 0.7, 0.5]
    ssim = {"a": [1.0, 0.5, 0.3], "b": [1.0, 0.55, 0.35]}
    cal = calibration.Calibration(
        model=plan.spec.name, weights=plan.spec.weights, fingerprint=calibration.weights_fingerprint(model),
        input_hw=tuple(plan.input_hw), patch=tuple(plan.patch), stride=tuple(plan.stride), color="gray",
        taus=taus, ssim=ssim, coefficients=calibration.fit(taus, ssim),
        gates=None if gates is None else {"count": 2, "taus": taus, "ssim": gates,
                                          "share": {m: [0.5, 0.4, 0.3] for m in gates}})
    calibration.save(cal)
    return cal


def _gate_rows(plan):
    return [c for c in plan.candidates if c.gates != "exact"]


def test_contract_never_picks_a_gate_plan_below_target(setup, store):
    model, image = setup
    con = kql.connect(progress="off")
    cal = _calibrate(model, con, image)
    for target in np.round(np.linspace(0.5, 0.99, 15), 3):
        plan = con.plan(f"{SSIM_QUERY} {target}", {"img": image, "net": model})
        chosen = plan.contract.chosen
        assert chosen.predicted_ssim >= target
        for c in _gate_rows(plan):   # every gate plan that claims to meet the target was measured so
            reached = cal.gate_reached(c.gates, 1.0 if c.tau is None else c.tau)
            assert c.predicted_ssim == pytest.approx(reached)
            assert c.meets == (reached >= target)
        if chosen.gates != "exact":
            assert (plan.mode, plan.gates, plan.tau) == ("approx", chosen.gates, chosen.tau)
            assert plan.predicted_ssim == pytest.approx(chosen.predicted_ssim)
    # at 0.9: frozen gates (0.864 reached) are rejected, local ones (0.972) run
    plan = con.plan(f"{SSIM_QUERY} 0.9", {"img": image, "net": model})
    names = {c.name: c for c in _gate_rows(plan)}
    assert set(names) == {"gates local", "τ 0.7 + gates local", "gates frozen", "τ 0.7 + gates frozen"}
    assert not names["gates frozen"].meets and names["gates local"].meets
    assert plan.contract.chosen.gates == "local"
    # cheaper is chosen among those that meet: τ 0.7 + local does less work than local alone here
    chosen = plan.contract.chosen
    assert chosen.cost == min(c.cost for c in plan.candidates if c.meets)


def test_chosen_gate_plan_runs_what_it_names(setup, store):
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    plan = con.plan(f"{SSIM_QUERY} 0.9", {"img": image, "net": model})
    chosen = plan.contract.chosen
    explicit = f"{QUERY} APPROX TAU {1 if chosen.tau is None else chosen.tau:g} GATES {chosen.gates.upper()}"
    got = con.execute(f"{SSIM_QUERY} 0.9", img=image, net=model)
    want = con.execute(explicit, img=image, net=model)
    np.testing.assert_allclose(got.heatmap, want.heatmap, atol=1e-6, rtol=0)
    text = con.execute(f"EXPLAIN {SSIM_QUERY} 0.9", img=image, net=model).text
    assert f"  → {chosen.name}: SSIM {chosen.predicted_ssim:.3f}, work {100 * chosen.cost:.0f} %" in text
    assert "  ✗ gates frozen: SSIM 0.864" in text
    assert "2 global gates local (recomputed, applied only where the patch changed the map)" in text


def test_no_gate_plan_meets_the_target_runs_exact(setup, store):
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    r = con.execute(f"{SSIM_QUERY} 0.99", img=image, net=model)
    assert r.mode == "exact"
    assert any(w.startswith("APPROX SSIM 0.99: no approximate plan is predicted to meet SSIM 0.99: ran EXACT")
               and "gates local: 80 % of the 2 tuning images reached 0.972" in w for w in r.warnings)
    np.testing.assert_allclose(r.heatmap, con.execute(f"{QUERY} EXACT", img=image, net=model).heatmap,
                               atol=1e-6, rtol=0)


def test_calibration_without_gate_measurements(setup, store):
    """An older store (no "gates" field) loads; its gate candidates are
    rejected with a note saying how to measure them."""
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    data = json.loads(store.read_text())
    for d in data["calibrations"]:
        del d["gates"], d["refine"], d["exact_maps"]   # as the first format-1 files were written
    store.write_text(json.dumps(data))
    (cal,) = [c for c in calibration.load_all() if c.source == "user"]
    assert cal.gates is None and cal.gate_reached("local", 1.0) is None and cal.gate_tau_for("local", 0.5) is None
    plan = con.plan(f"{SSIM_QUERY} 0.6", {"img": image, "net": model})
    rows = _gate_rows(plan)
    assert [c.name for c in rows] == ["gates local", "gates frozen"]
    assert all(not c.meets and c.predicted_ssim is None and
               c.note == "the calibration has no gate measurements: TUNE again to measure gate freezing"
               for c in rows)
    assert plan.contract.chosen.gates == "exact"
    assert tune.gates_text(cal) == "-"


@pytest.mark.parametrize("clause, modes", [("GATES EXACT", set()), ("GATES LOCAL", {"local"}),
                                           ("GATES FROZEN", {"frozen"})])
def test_gates_clause_restricts_the_candidates(setup, store, clause, modes):
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    plan = con.plan(f"{SSIM_QUERY} 0.8 {clause}", {"img": image, "net": model})
    assert {c.gates for c in _gate_rows(plan)} == modes
    assert plan.contract.chosen.predicted_ssim >= 0.8


def test_gates_clause_never_lowers_the_target(setup, store):
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    plan = con.plan(f"{SSIM_QUERY} 0.9 GATES FROZEN", {"img": image, "net": model})
    assert plan.mode == "exact" and plan.gates == "exact"
    assert ("GATES FROZEN is predicted to reach SSIM 0.864 < 0.9: ran exact instead (GATES permits "
            "approximating the gates, it does not lower the SSIM target)") in plan.warnings


def test_models_without_gates_have_no_gate_candidates(store):
    torch.manual_seed(0)
    net = trained_like(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    image = rand_image(40, 36, seed=3)
    con = kql.connect(progress="off")
    _calibrate(net, con, image)
    plan = con.plan(f"{SSIM_QUERY} 0.6", {"img": image, "net": net})
    assert _gate_rows(plan) == [] and plan.gates == "exact"
    plan = con.plan(f"{SSIM_QUERY} 0.6 GATES LOCAL", {"img": image, "net": net})
    assert _gate_rows(plan) == [] and plan.gates == "exact"


# -- TUNE on the really trained SE net (kql.zoo.fmnist_se_cnn) ------------------------------------

SE_TUNING = (0, 1, 2)                    # test images TUNE sees
SE_HELD_OUT = tuple(range(100, 110))     # never seen by TUNE


def test_tune_measures_gates_and_the_contract_keeps_its_target(fmnist_se_net, store):
    from kql.datasets import load_fashion_mnist
    images = load_fashion_mnist("test")[0]
    con = kql.connect(progress="off")
    con.register_model("fmnist_se", fmnist_se_net, **zoo.FMNIST_SPEC)
    table = con.execute("TUNE fmnist_se ON i0, i1, i2 PATCH 4 STRIDE 2 TAUS (0.7, 0.5, 0.4)",
                        **{f"i{i}": images[i] for i in SE_TUNING})
    (cal,) = [c for c in calibration.load_all() if c.source == "user"]
    gates = cal.gates
    assert gates["count"] == 3 and gates["taus"] == [1.0, 0.7, 0.5, 0.4]
    for mode in ("local", "frozen"):
        assert sorted(gates["ssim"][mode]) == ["i0", "i1", "i2"]
        values = np.array(list(gates["ssim"][mode].values()))
        assert values.shape == (3, 4) and ((values > -1) & (values <= 1)).all()
        assert (values[:, 0] > 0.99).all()     # the gates alone: all but exact on this net
        share = np.array(gates["share"][mode])
        assert ((share > 0) & (share < 0.5)).all()   # exact gates spread every change: R 1.12
    # with exact gates τ falls far lower than with approximate ones (docs/performance.md)
    assert np.mean([v[2] for v in gates["ssim"]["local"].values()]) > np.mean([v[1] for v in cal.ssim.values()])
    assert any(line.startswith("gate freezing (3 gates; ") and line.endswith(tune.gates_text(cal))
               for line in table.footer)
    row = con.execute("SHOW CALIBRATIONS").as_dicts()[0]
    assert row["model"] == "fmnist_se" and row["gates (SSIM, work, τ)"] == tune.gates_text(cal)
    assert row["gates (SSIM, work, τ)"].startswith("local 1.000, ")

    target = 0.9
    plan = con.plan(f"SELECT HEATMAP FROM img USING fmnist_se PATCH 4 STRIDE 2 APPROX SSIM {target}",
                    {"img": images[SE_HELD_OUT[0]]})
    chosen = plan.contract.chosen
    assert chosen.gates != "exact" and chosen.predicted_ssim >= target and plan.gates == chosen.gates
    reached = []
    for i in SE_HELD_OUT:
        got = con.execute(f"SELECT HEATMAP FROM img USING fmnist_se PATCH 4 STRIDE 2 APPROX SSIM {target}",
                          img=images[i])
        exact = con.execute("SELECT HEATMAP FROM img USING fmnist_se PATCH 4 STRIDE 2 EXACT", img=images[i])
        assert got.mode == "approx" and got.label == exact.label
        reached.append(tune.heatmap_ssim(exact.heatmap, got.heatmap))
    assert min(reached) >= target, reached


def test_approx_tau_with_gates_predicts_from_the_gate_measurements(setup, store):
    model, image = setup
    con = kql.connect(progress="off")
    _calibrate(model, con, image)
    plan = con.plan(f"{QUERY} APPROX TAU 0.7 GATES LOCAL", {"img": image, "net": model})
    assert plan.approximation.predicted_ssim == pytest.approx(0.94)   # the tuning images' mean at τ 0.7
    text = con.execute(f"EXPLAIN {QUERY} APPROX TAU 0.6 GATES LOCAL", img=image, net=model).text
    assert ("no SSIM prediction (TUNE measured no such gates at this τ for this model, weights, input size "
            "and patch)") in text
