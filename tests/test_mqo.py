"""Physical planning of exact plans: MQO batches, gather kernels, memory."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import kql
from kql.parser import parse
from kql.planner.plan import batch_bounds
from kql.planner.rules.incremental import layer_costs
from kql.planner.rules.mqo_batches import _BatchCost


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


IMG = np.random.RandomState(0).rand(64, 64, 3).astype(np.float32)


def _plan(tail, **settings):
    con = kql.connect(progress="off", **settings)
    return con, con.plan(parse(f"SELECT HEATMAP FROM img USING net {tail}"), {"img": IMG, "net": _net()})


@pytest.mark.parametrize("batch", [1, 5, 16, 200])
def test_batches_cover_every_position_once_within_the_cap(batch):
    _, plan = _plan(f"PATCH 8 STRIDE 4 BATCH {batch}")
    assert plan.bounds[0] == 0 and plan.bounds[-1] == plan.n_positions
    sizes = np.diff(plan.bounds)
    assert (sizes >= 1).all() and (sizes <= plan.batch_size).all()
    assert sorted(plan.order.tolist()) == list(range(plan.n_positions))


def test_partition_is_no_worse_than_uniform_batches_and_keeps_border_savings():
    _, plan = _plan("PATCH 8 STRIDE 2 BATCH 64")
    model = _BatchCost(plan)
    _, dp_cost = model.partition(plan.order, plan.batch_size)
    # cost of the same order cut into uniform batches, by the same model
    h, w = model.h[plan.order], model.w[plan.order]
    bounds = batch_bounds(plan.n_positions, plan.batch_size)
    uniform = sum(model.batch_costs(h[a:b].max(0, keepdims=True), w[a:b].max(0, keepdims=True),
                                    np.array([b - a]))[0] for a, b in zip(bounds[:-1], bounds[1:]))
    assert dp_cost <= uniform * (1 + 1e-9)
    # the FLOPs the chosen batches run lie between the grid-wide ideal and uniform batching
    assert plan.cost.r_uniform - 1e-9 <= plan.r_batched <= plan.cost.r_grid + 1e-9
    assert plan.r_batched > plan.cost.r_uniform  # border positions were batched apart


def test_layer_costs_accept_sizes_and_bounds_alike():
    _, plan = _plan("PATCH 8 STRIDE 4")
    a = layer_costs(plan.graph, plan.regions, plan.order, 7)
    b = layer_costs(plan.graph, plan.regions, plan.order, batch_bounds(plan.n_positions, 7))
    assert a == b


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_forced_gather_backend_gives_the_same_heatmap(backend):
    con = kql.connect(progress="off")
    q = "SELECT HEATMAP FROM img USING net PATCH 8 STRIDE 6 COLOR BLACK"
    ref = con.execute(q + " NAIVE", img=IMG, net=_net())
    con.execute(f"SET gather_backend = {backend}")
    text = str(con.explain(q + " EXACT", img=IMG, net=_net()))
    assert f"gather_backend  {backend} for " in text and "forced by SET gather_backend" in text
    got = con.execute(q + " EXACT", img=IMG, net=_net())
    np.testing.assert_allclose(got.heatmap, ref.heatmap, atol=1e-6, rtol=0)


def test_auto_backend_is_chosen_per_layer_by_window_size():
    _, plan = _plan("PATCH 8 STRIDE 4 BATCH 64")
    assert set(plan.layer_backends.values()) <= {"torch", "numba"}
    assert plan.layer_backends  # every incremental local layer has one
    _, tiny = _plan("PATCH 1 STRIDE 40 BATCH 1")
    assert set(tiny.layer_backends.values()) == {"torch"}  # a 1-position 3x3 window is below the Numba threshold


def test_unknown_gather_backend_is_refused():
    con = kql.connect(progress="off")
    with pytest.raises(kql.errors.PlanError, match="gather_backend takes auto, torch, numba or cuda, got 'gpu'"):
        con.execute("SET gather_backend = 'gpu'")


def test_explain_shows_batched_speedup_cutoff_kernel_and_memory():
    con = kql.connect(progress="off")
    q = "SELECT HEATMAP FROM img USING net PATCH 8 STRIDE 4"
    text = str(con.explain(q, img=IMG, net=_net()))
    assert "with the chosen batches and cutoff)" in text.split("theoretical speedup of incremental vs naive")[1]
    assert "IVM cutoff:" in text and "gather kernel:" in text and "memory: views" in text
    analyzed = str(con.explain("EXPLAIN ANALYZE " + q, img=IMG, net=_net()))
    assert "peak memory +" in analyzed


def test_views_past_the_cutoff_are_not_kept():
    from kql.executor.incremental import IncrementalRunner
    _, plan = _plan("PATCH 8 STRIDE 4")
    names = [l.name for l in plan.graph.layers()]
    plan.schedule = dataclasses.replace(plan.schedule, full_layers=frozenset(names[3:]))
    with torch.inference_mode():
        runner = IncrementalRunner(plan, plan.spec.module, plan.regions, plan.full_layers)
    assert not set(runner.views) & plan.full_layers


def test_automatic_batch_is_capped_per_mode_on_the_cpu():
    from kql.planner.rules.batch_size import MAX_AUTO_BATCH
    _, naive = _plan("PATCH 8 STRIDE 2 NAIVE")
    _, exact = _plan("PATCH 8 STRIDE 2 EXACT")
    assert naive.n_positions > 32
    assert naive.batch_size == MAX_AUTO_BATCH[("cpu", "naive")]
    assert exact.batch_size == MAX_AUTO_BATCH[("cpu", "exact")]
    _, asked = _plan("PATCH 8 STRIDE 2 NAIVE BATCH 50")
    assert asked.batch_size == 50  # an explicit BATCH is honoured
