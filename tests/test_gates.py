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

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import SqueezeExcitation

import kql
from helpers import rand_image, trained_like
from kql.errors import PlanError
from kql.planner.geometry import Rects, gate_sources, propagate

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
