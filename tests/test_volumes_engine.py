"""Volumes (issue 12), the engine: 3-D geometry against brute force, and exact
incremental inference against naive re-inference on 3-D networks.

Plans are built the way the tensor API builds them (``binder.bind_input`` with a
``(C, D, H, W)`` input, then the optimizer's rules), so these tests need no
front end. Every exactness case compares, over every position of its grid
(borders included), the model's raw outputs (scale-relative 1e-4) and the
probabilities (1e-5) of the incremental runner against an independent loop of
occluded volumes, and asserts that the patch really moves the outputs.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kql import ast
from kql.compiler import optimize_bound
from kql.errors import PlanError
from kql.executor import execute
from kql.executor.incremental import IncrementalRunner
from kql.planner.binder import bind_input
from kql.planner.explain import explain_text
from kql.planner.geometry import Rects, grid, out_region, propagate, read_region, threshold
from kql.planner.ir import Kind
from kql.planner.tracer import trace
from kql.settings import Settings


# -- building and checking plans -----------------------------------------------------

def _spec(module, channels):
    """The model spec of a module bound from Python (as the tensor API makes it)."""
    from kql.sources import ModelSpec
    return ModelSpec(name="net", module=module, input_size=None, mean=(0.0,) * channels, std=(1.0,) * channels,
                     channels=channels, class_names=None, weights="random", warning=None, num_classes=None)


def volume_plan(model, x, patch, stride, *, mode="exact", region=None, batch=None, memory_limit=None,
                drilldown=None):
    """The optimized plan of an occlusion query on the volume ``x`` ``(C, D, H, W)``."""
    settings = Settings().with_option("progress", "off")
    if memory_limit is not None:
        settings = settings.with_option("memory_limit", memory_limit)
    select = ast.Select(source=ast.Source("name", "x"), model="net", patch=tuple(patch), stride=tuple(stride),
                        label=ast.Label("predicted"), region=region, mode=mode, approx=None, batch=batch,
                        device="cpu", drilldown=drilldown)
    graph = trace(model.eval(), tuple(x.shape))
    plan = bind_input(select, _spec(model, x.shape[0]), graph, x, None, torch.zeros(x.shape[0]), settings, "cpu",
                      image_desc="volume", original_hw=tuple(x.shape[1:]))
    return optimize_bound(plan, settings)


def naive_volume_outputs(plan, model, dtype=torch.float32) -> torch.Tensor:
    """Independent reference: one occluded copy of the volume per position
    (run in ``dtype``: float64 gives the true values a float32 run rounds)."""
    starts = plan.positions()
    pd, ph, pw = plan.patch
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    outs = []
    with torch.inference_mode():
        for z, y, x in zip(*(a.tolist() for a in starts)):
            vol = plan.input.clone().to(dtype)
            vol[:, z:z + pd, y:y + ph, x:x + pw] = 0.0
            outs.append(net(vol[None]).reshape(-1).float())
    return torch.stack(outs)


def check_exact(model, x, patch, stride, *, batch=16, region=None, moves=1e-3, reference=torch.float32):
    """EXACT against the naive loop at every position; returns the plan.

    ``reference=torch.float64`` for the deep networks: on r2plus1d_18 a
    float32 naive run is itself ~1e-5 off the float64 probabilities (the
    incremental run is closer), so float32 against float32 compares two
    roundings rather than checking the incremental run."""
    model = model.eval()
    plan = volume_plan(model, x, patch, stride, region=region)
    assert plan.mode == "exact" and plan.ndim == 3
    ref = naive_volume_outputs(plan, model, reference)
    with torch.inference_mode():
        runner = IncrementalRunner(plan, model, plan.regions, plan.full_layers)
        idx = np.arange(plan.n_positions)
        got = torch.cat([runner.outputs(idx[s:s + batch]).reshape(len(idx[s:s + batch]), -1)
                         for s in range(0, len(idx), batch)])
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max |Δ output| {err:.3g} at scale {scale:.3g}"
    spread = (ref - ref.mean(0)).abs().max().item()
    assert spread > moves * max(scale, 1.0), f"outputs barely depend on the patch (spread {spread:.3g})"
    np.testing.assert_allclose(torch.softmax(got, 1).numpy(), torch.softmax(ref, 1).numpy(), atol=1e-5, rtol=0)
    return plan


def calibrated(model: nn.Module, shape, seed: int = 0, batches: int = 4, size: int = 4,
               head: float = 4.0) -> nn.Module:
    """A random-weight net with calibrated batch-norm statistics: fan-in scaled
    conv weights, running statistics measured on smooth random volumes of ``shape``
    (so every layer's activations are normalised as in a trained net), and a
    classifier scaled by ``head`` so the outputs depend on the patch (the deep
    networks take 1: larger logits make float32 rounding, of naive and
    incremental runs alike, show in the probabilities); in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None   # cumulative average over the calibration batches
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * head / m.in_features ** 0.5)
        model.train()
        # volumes like the ones the tests occlude; enough of them that a deep
        # layer whose map is 1x1x1 still sees a variance worth the name
        for i in range(batches):
            model(torch.stack([volume(shape, seed=1000 + size * i + j) for j in range(size)]))
    return model.eval()


def volume(shape, seed=0) -> torch.Tensor:
    """A smooth random volume (blobs, not white noise) so occlusion matters."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g)
    return F.avg_pool3d(v[None], 3, 1, 1)[0] * 3


# -- geometry: 3-D boxes against brute force ---------------------------------------------

def _brute_changed(module, in_shape, box):
    """Bounding box of the outputs of ``module`` that read the input box:
    a positive input on the box, a non-negative op, outputs that change."""
    x = torch.zeros(1, *in_shape)
    sl = (0, slice(None)) + tuple(slice(a, b) for a, b in box)
    x[sl] = 1.0
    with torch.no_grad():
        base = module(torch.zeros(1, *in_shape))
        y = module(x)
    hit = (y != base)[0].any(0)
    idx = hit.nonzero()
    if len(idx) == 0:
        return None
    return tuple((int(idx[:, a].min()), int(idx[:, a].max()) + 1) for a in range(3))


@pytest.mark.parametrize("make", [
    lambda: nn.Conv3d(2, 4, (3, 5, 1), stride=(2, 1, 3), padding=(1, 2, 0), dilation=(2, 1, 1)),
    lambda: nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv3d(2, 2, (1, 3, 3), padding="same", dilation=(1, 2, 1)),
    lambda: nn.MaxPool3d((2, 3, 3), stride=(2, 2, 1), padding=1, ceil_mode=True),
    lambda: nn.MaxPool3d(3, stride=2, dilation=2),
    lambda: nn.AvgPool3d((3, 2, 3), stride=2, padding=(1, 0, 1), ceil_mode=True, count_include_pad=False),
    lambda: nn.AdaptiveAvgPool3d((3, 2, 5)),
    lambda: nn.ConstantPad3d((1, 2, 0, 3, 2, 1), 0.5),
])
def test_changed_region_of_3d_layers_matches_brute_force(make):
    torch.manual_seed(0)
    m = make().eval()
    if isinstance(m, nn.Conv3d):
        with torch.no_grad():
            m.weight.abs_()
            m.bias.zero_()
    in_shape = (m.in_channels if isinstance(m, nn.Conv3d) else 4, 9, 12, 10)
    g = trace(m, in_shape)
    layer = next(l for l in g if l.kind == Kind.LOCAL)
    assert layer.ndim == 3 and len(layer.kernel) == 3
    rng = np.random.default_rng(0)
    for _ in range(25):
        lo = [int(rng.integers(0, n)) for n in in_shape[1:]]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, in_shape[1:])]
        got = out_region(layer, [Rects(*lo, *hi)])
        want = _brute_changed(m, in_shape, list(zip(lo, hi)))
        if want is None:
            assert bool(got.is_empty[0])
            continue
        assert [(int(a[0]), int(b[0])) for a, b in zip(got.lo, got.hi)] == list(want)
        if layer.op in ("conv3d", "max_pool3d"):
            # the read region recomputes those outputs: the op on the window, padded as
            # the layer pads, with padding 0 gives the full op's values there
            read = read_region(layer, got)
            x = torch.randn(1, *in_shape)
            P = 12
            xp = F.pad(x, (P,) * 6, value=float(layer.pad_value))
            win = xp[(slice(None), slice(None)) + tuple(slice(int(a[0]) + P, int(b[0]) + P)
                                                          for a, b in zip(read.lo, read.hi))]
            if layer.op == "conv3d":
                part = F.conv3d(win, m.weight, m.bias, layer.stride, 0, layer.dilation, layer.groups)
            else:
                part = F.max_pool3d(win, layer.kernel, layer.stride, 0, layer.dilation)
            full = m(x)[(slice(None), slice(None)) + tuple(slice(int(a[0]), int(b[0]))
                                                          for a, b in zip(got.lo, got.hi))]
            torch.testing.assert_close(part, full)


def test_rects_keep_the_2d_api_and_work_in_3d():
    r = Rects([0, 1], [0, 2], [4, 1], [3, 5])            # 2-D: y0, x0, y1, x1
    assert r.ndim == 2 and r.h.tolist() == [4, 0] and r.is_empty.tolist() == [False, True]
    v = Rects.from_patches([0, 5], [1, 1], [2, 9], (4, 3, 3))
    assert v.ndim == 3 and v.d.tolist() == [4, 4] and v.area.tolist() == [36, 36]
    c = v.clip(6, 8, 10)
    assert c.d.tolist() == [4, 1] and c.w.tolist() == [3, 1]
    assert Rects.full(2, 6, 8, 10).contains(c).all()
    assert v.union(Rects.empty(2, 3)) == v
    assert v[1] == Rects(5, 1, 9, 9, 4, 12)
    assert v.shift(1, 0, -1) == Rects([1, 6], [1, 1], [1, 8], [5, 10], [4, 4], [4, 11])


def test_grid_and_threshold_per_axis():
    zs, ys, xs = grid((10, 6, 7), (4, 3, 3), (3, 3, 2))
    assert len(zs) == 3 * 2 * 3 and zs.max() == 6 and ys.max() == 3 and xs.max() == 4
    g = trace(nn.Conv3d(1, 1, 3, padding=1), (1, 10, 20, 20))
    conv = next(l for l in g if l.kind == Kind.LOCAL)
    capped = threshold(conv, Rects(0, 2, 5, 10, 18, 9), 0.25)   # caps 3, 5, 5 (round(0.25 * n))
    assert [int(n[0]) for n in capped.sizes] == [3, 5, 4]
    assert [int(a[0]) for a in capped.lo] == [3, 7, 5]


def test_propagate_through_a_3d_net_is_exact_at_every_layer():
    """Every layer's region from propagate against brute force on the whole net."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, ceil_mode=True),
                        nn.Conv3d(2, 2, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1)), nn.ReLU()).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.abs_()
                m.bias.fill_(0.1)
    shape = (1, 9, 10, 11)
    g = trace(net, shape)
    zs, ys, xs = grid(shape[1:], (3, 4, 2), (2, 3, 3))
    regions = propagate(g, Rects.from_patches(zs, ys, xs, (3, 4, 2)))
    out = g.layers()[-2].name
    for i in range(len(zs)):
        box = [(int(zs[i]), int(zs[i]) + 3), (int(ys[i]), int(ys[i]) + 4), (int(xs[i]), int(xs[i]) + 2)]
        want = _brute_changed(net, shape, box)
        r = regions[out][i]
        assert [(int(a[0]), int(b[0])) for a, b in zip(r.lo, r.hi)] == list(want)


# -- annotation -----------------------------------------------------------------------

def test_3d_ops_are_annotated():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm3d(4)
            self.inorm = nn.InstanceNorm3d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = F.pad(self.bn(self.conv(x)), (1, 1, 2, 0, 0, 1))
            y = F.avg_pool3d(y, 2, ceil_mode=True, count_include_pad=False)
            y = self.inorm(y)
            return self.fc(F.adaptive_avg_pool3d(y, 1).flatten(1))

    g = trace(Net(), (1, 8, 8, 8))
    g.lint()
    kinds = {l.op: l for l in g}
    assert kinds["conv3d"].kind == Kind.LOCAL and kinds["conv3d"].kernel == (3, 3, 3)
    assert kinds["batch_norm"].kind == Kind.POINT
    assert kinds["pad"].padding == ((0, 1), (2, 0), (1, 1)) and kinds["pad"].out_shape == (4, 9, 10, 10)
    assert kinds["instance_norm"].kind == Kind.GLOBAL
    assert "whole volume" in kinds["instance_norm"].reason
    assert kinds["avg_pool3d"].kind == Kind.LOCAL


# -- exactness on unit nets covering every 3-D op --------------------------------------

class Every3dOp(nn.Module):
    """conv (padded, strided, dilated, grouped, 'same'), BN, max pooling
    (padding, ceil_mode, dilation), F.pad, avg pooling with divisor_override, residual
    add, cat, a squeeze-and-excitation gate (a global mean broadcast back),
    adaptive pooling as a window."""

    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv3d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(c)
        self.c2 = nn.Conv3d(c, c, (3, 1, 3), padding="same", dilation=(2, 1, 1), groups=2)
        self.mp = nn.MaxPool3d((2, 3, 3), stride=2, padding=(0, 1, 1), ceil_mode=True)
        self.c3 = nn.Conv3d(2 * c, 2 * c, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
        self.bn3 = nn.BatchNorm3d(2 * c)
        self.fc = nn.Linear(2 * c * 3 * 5 * 4, 5)

    def forward(self, x):                                              # (1, 12, 16, 14)
        a = F.relu(self.bn1(self.c1(x)))
        a = a + F.relu(self.c2(a))                                      # residual add
        a = self.mp(a)                                                  # (c, 6, 9, 8)
        b = F.avg_pool3d(a, 3, 1, 1, divisor_override=5)
        a = torch.cat([a, F.max_pool3d(F.pad(b, (1,) * 6), 3, 1, 1, dilation=2)], 1)  # cat
        a = F.relu(self.bn3(self.c3(a)))                                # (2c, 6, 5, 8)
        a = a * torch.sigmoid(F.adaptive_avg_pool3d(a, 1))              # gate: a global mean
        return self.fc(F.adaptive_avg_pool3d(a, (3, 5, 4)).flatten(1))  # a 2x1x2 window


def test_every_3d_op_exact_non_cubic_patch_and_volume():
    shape = (1, 12, 16, 14)
    net = calibrated(Every3dOp(), shape)
    check_exact(net, volume(shape), (3, 5, 4), (2, 3, 5))


class Pads(nn.Module):
    """avg pooling whose divisor varies at the border (padding, ceil_mode,
    count_include_pad False) and a constant F.pad of all three axes."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(1, 3, (3, 3, 1), stride=(2, 1, 1), padding=(1, 1, 0))
        self.fc = nn.Linear(3 * 6 * 6 * 4, 4)

    def forward(self, x):
        y = torch.tanh(self.c(F.pad(x, (2, 1, 0, 2, 1, 0), value=0.3)))
        y = F.avg_pool3d(y, (2, 3, 3), stride=(1, 2, 3), padding=1, ceil_mode=True, count_include_pad=False)
        return self.fc(y.flatten(1))


def test_padding_and_border_divisors_exact():
    shape = (1, 8, 9, 7)
    net = calibrated(Pads(), shape)
    check_exact(net, volume(shape, seed=3), (2, 3, 2), (1, 2, 3))


class Norms(nn.Module):
    """Instance norm is global (its statistics span the volume); with running
    statistics in eval mode it is per voxel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(1, 4, 3, padding=1)
        self.n1 = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
        self.c2 = nn.Conv3d(4, 4, 3, padding=1)
        self.n2 = nn.InstanceNorm3d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.n1(self.c1(x)))
        y = F.relu(self.n2(self.c2(y)))
        return self.fc(F.adaptive_avg_pool3d(y, 1).flatten(1))


def test_instance_norm_is_global_and_exact():
    shape = (1, 8, 10, 8)
    net = calibrated(Norms(), shape)
    net.n1.running_mean.uniform_(-0.2, 0.2)
    net.n1.running_var.uniform_(0.5, 1.5)
    plan = check_exact(net, volume(shape, seed=5), (3, 3, 3), (2, 3, 2), moves=1e-4)
    g = plan.graph
    assert g[[l.name for l in g if l.op == "batch_norm"][0]].kind == Kind.POINT   # n1: running statistics
    norm = next(l for l in g if l.op == "instance_norm")
    assert norm.kind == Kind.GLOBAL
    text = explain_text(plan)
    assert "instance norm computes its statistics over the whole volume" in text or norm.name in plan.full_layers


def test_end_to_end_heatmap_is_a_volume_of_grid_cells():
    net = calibrated(Pads(), (1, 8, 9, 7))
    x = volume((1, 8, 9, 7), seed=1)
    exact = execute(volume_plan(net, x, (3, 3, 3), (2, 2, 2)), progress="off")
    naive = execute(volume_plan(net, x, (3, 3, 3), (2, 2, 2), mode="naive"), progress="off")
    assert exact.heatmap.shape == naive.heatmap.shape == (4, 4, 3)   # (nd, nh, nw) grid cells
    np.testing.assert_allclose(exact.heatmap, naive.heatmap, atol=1e-5, rtol=0)


def test_region_restricts_the_grid():
    net = calibrated(Pads(), (1, 8, 9, 7))
    x = volume((1, 8, 9, 7), seed=2)
    bounds = ((2, 7), (1, 9), (0, 4))   # (z, y, x)
    region = ast.Region.from_bounds(bounds) if hasattr(ast.Region, "from_bounds") else None
    if region is None:
        pytest.skip("the AST has no 3-D REGION yet (helper C's branch)")
    plan = check_exact(net, x, (2, 3, 2), (2, 2, 1), region=region)
    assert plan.grid.bounds == bounds
    zs, ys, xs = plan.positions()
    assert zs.min() == 2 and zs.max() + 2 == 7 and ys.max() + 3 == 9 and xs.max() + 2 == 4


def test_drilldown_on_a_volume():
    """Stage one at a coarser stride along all three axes (eq. 47 with a cube
    root), trilinear estimate, stage two exact at the positions it runs."""
    net = calibrated(Pads(), (1, 8, 9, 7))
    x = volume((1, 8, 9, 7), seed=6)
    plan = volume_plan(net, x, (2, 2, 2), (1, 1, 1), drilldown=ast.Drilldown(fraction=0.25, speedup=2.0))
    dd = plan.drilldown
    assert dd.stride_one == (2, 2, 2) and dd.on_coarse.shape == plan.grid.shape == (7, 8, 6)
    assert dd.on_coarse.sum() == dd.stage_one.n_positions
    done = execute(plan, progress="off")
    full = execute(volume_plan(net, x, (2, 2, 2), (1, 1, 1), mode="naive"), progress="off").heatmap
    assert done.heatmap.shape == full.shape
    computed = done.computed if getattr(done, "computed", None) is not None else dd.on_coarse
    np.testing.assert_allclose(done.heatmap[computed], full[computed], atol=1e-5, rtol=0)
    assert computed.sum() > dd.on_coarse.sum()    # stage two ran positions of its own


# -- memory ------------------------------------------------------------------------------

def test_tight_memory_limit_sizes_the_batches():
    shape = (1, 12, 16, 14)
    net = calibrated(Every3dOp(), shape)
    x = volume(shape, seed=4)
    loose = volume_plan(net, x, (4, 4, 4), (2, 2, 2))
    per, views = loose.per_position_bytes, loose.schedule.view_bytes
    limit = views + 5 * per + per // 2      # the views stay for the whole run, then 5.5 positions
    tight = volume_plan(net, x, (4, 4, 4), (2, 2, 2), memory_limit=str(limit))
    assert tight.batch_size == 5 < loose.batch_size
    assert views + tight.batch_size * tight.per_position_bytes <= limit
    with pytest.raises(PlanError, match="is too small: one position needs .* besides the views'"):
        volume_plan(net, x, (4, 4, 4), (2, 2, 2), memory_limit=str(views + per // 2))
    assert np.diff(tight.bounds).max() <= 5
    # it runs, in those batches, and equals the loose plan's map
    a = execute(tight, progress="off").heatmap
    b = execute(loose, progress="off").heatmap
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_per_position_bytes_cover_the_largest_patches():
    """The per-position estimate holds every layer's largest 3-D patch (all
    three axes) at once, so it is at least the biggest one."""
    shape = (1, 12, 16, 14)
    net = calibrated(Every3dOp(), shape)
    plan = volume_plan(net, volume(shape), (4, 4, 4), (2, 2, 2))
    biggest = max(l.channels * math.prod(int(n.max()) for n in plan.regions[l.name].sizes)
                  for l in plan.graph if l.spatial and l.name not in plan.full_layers)
    assert plan.per_position_bytes >= 4 * biggest
    assert plan.schedule.view_bytes > 0


# -- EXPLAIN -----------------------------------------------------------------------------

def test_explain_on_a_volume_shows_grid_speedup_and_views():
    shape = (1, 12, 16, 14)
    net = calibrated(Every3dOp(), shape)
    plan = volume_plan(net, volume(shape), (4, 4, 4), (4, 4, 4))
    text = explain_text(plan)
    nd, nh, nw = plan.grid.shape
    assert f"grid: {nd}x{nh}x{nw} = {plan.n_positions} positions" in text
    assert "patch: 4x4x4" in text and "input 1x12x16x14" in text
    assert f"R = {plan.cost.r_grid:.2f}" in text and plan.cost.r_grid > 1
    assert "views:" in text and "memory: views" in text
    assert "4x4x4 ->" in text   # the cost table's changed regions are 3-D


# -- 3-D networks people use -------------------------------------------------------------

def _monai(name):
    nets = pytest.importorskip("monai.networks.nets")
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=4)
    return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=4)


def _video(name):
    import torchvision.models.video as video
    return getattr(video, name)(weights=None, num_classes=5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "resnet18"])
def test_monai_3d_networks_exact_at_every_position(name):
    """MONAI DenseNet121 / ResNet18 (spatial_dims=3, one channel) on a 32^3
    volume: patch 8, stride 12 (27 positions, every border)."""
    shape = (1, 32, 32, 32)
    net = calibrated(_monai(name), shape, head=1.0)
    plan = check_exact(net, volume(shape, seed=7), (8, 8, 8), (12, 12, 12), reference=torch.float64)
    assert plan.grid.shape == (3, 3, 3) and plan.cost.r_grid > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18"])
def test_video_networks_exact_over_time_and_space(name):
    """torchvision's video CNNs on a 3x8x32x32 clip (C x T x H x W): the patch
    occludes 4 frames of an 8x12 window; 2x3x3 positions."""
    shape = (3, 8, 32, 32)
    net = calibrated(_video(name), shape, head=1.0)
    plan = check_exact(net, volume(shape, seed=8), (4, 8, 12), (4, 12, 10), reference=torch.float64)
    assert plan.grid.shape == (2, 3, 3) and plan.cost.r_grid > 1
