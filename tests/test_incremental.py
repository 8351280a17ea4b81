"""Exact incremental inference against naive re-inference.

Every case checks two things over every position of its grid (borders
included): the heatmap probabilities agree within 1e-5, and the model's raw
outputs agree within 1e-4 of their scale. The second matters because a
random-weight network often gives nearly uniform probabilities, which would
agree even if the incremental executor were wrong; so each case also asserts
that the patch really moves the outputs by far more than the tolerance.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import kql
from kql.executor.incremental import IncrementalRunner
from kql.planner.graph import Kind
from kql.parser import parse
from kql.sources.models import trained_like
from helpers import naive_outputs, rand_image

M = torchvision.models


def check_exact(model, image, query, *, batch_sizes=(None,), full_path=True):
    """Compare EXACT with an independent naive loop over every grid position.

    Raw outputs are compared scale-relatively through the incremental runner;
    with ``full_path`` the query also runs end to end (``con.execute``) and
    its heatmap is held to 1e-5 on probabilities.
    """
    con = kql.connect(progress="off")
    model = model.eval()
    plan = con.plan(parse(f"{query} EXACT"), {"img": image, "net": model})
    ref = naive_outputs(plan, model)
    with torch.inference_mode():
        runner = IncrementalRunner(plan, model, plan.regions, plan.full_layers)
        idx = np.arange(plan.n_positions)
        got = torch.cat([runner.outputs(idx[s:s + 16]).reshape(len(idx[s:s + 16]), -1)
                         for s in range(0, len(idx), 16)])
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max |Δ output| {err:.3g} at scale {scale:.3g}"
    # The comparison means something only if occlusion moves the outputs well
    # past the tolerance: a wrong region then shows up as a large error.
    spread = (ref - ref.mean(0)).abs().max().item()
    assert spread > 1e-3 * max(scale, 1.0), f"outputs barely depend on the patch (spread {spread:.3g})"
    probs = torch.softmax(ref, 1)
    np.testing.assert_allclose(torch.softmax(got, 1).numpy(), probs.numpy(), atol=1e-5, rtol=0)
    if full_path:
        label = int(torch.softmax(model(plan.input[None]), 1).argmax())
        expected = probs[:, label].numpy().reshape(len(plan.ys), len(plan.xs))
        for batch in batch_sizes:
            clause = f" BATCH {batch}" if batch else ""
            exact = con.execute(f"{query} EXACT{clause}", img=image, net=model)
            assert exact.label == label
            np.testing.assert_allclose(exact.heatmap, expected, atol=1e-5, rtol=0)
    return plan


# -- architectures ----------------------------------------------------------------

def _tv(name, **kw):
    torch.manual_seed(0)
    return trained_like(getattr(M, name)(weights=None, **kw))


ARCHS = [
    # name, constructor, image size, query tail (small grids keep CI affordable)
    ("vgg16", lambda: _tv("vgg16"), (48, 56), "PATCH 12 STRIDE 14"),
    ("resnet18", lambda: _tv("resnet18"), (64, 64), "PATCH 16 STRIDE 16"),
    ("mobilenet_v2", lambda: _tv("mobilenet_v2"), (64, 64), "PATCH 12 STRIDE 17"),
    ("squeezenet1_0", lambda: _tv("squeezenet1_0"), (72, 72), "PATCH 16 STRIDE 19"),
    ("densenet121", lambda: _tv("densenet121"), (48, 48), "PATCH 16 STRIDE 16"),
    ("mobilenet_v3_small", lambda: _tv("mobilenet_v3_small"), (64, 64), "PATCH 16 STRIDE 16"),
    ("efficientnet_b0", lambda: _tv("efficientnet_b0"), (64, 64), "PATCH 16 STRIDE 16"),
    ("alexnet", lambda: _tv("alexnet"), (96, 96), "PATCH 24 STRIDE 24"),
    # channel split and shuffle as point layers
    ("shufflenet_v2_x1_0", lambda: _tv("shufflenet_v2_x1_0"), (64, 64), "PATCH 12 STRIDE 13"),
    # channels-last blocks between permutes, LayerNorm and Linear per pixel
    ("convnext_tiny", lambda: _tv("convnext_tiny"), (64, 64), "PATCH 16 STRIDE 16"),
]
SLOW_ARCHS = {"vgg16", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny"}  # -m "not slow" leaves them out


@pytest.mark.parametrize("name,make,size,tail", [
    pytest.param(*a, id=a[0], marks=[pytest.mark.slow] if a[0] in SLOW_ARCHS else []) for a in ARCHS])
def test_architecture_exact_over_whole_grid(name, make, size, tail):
    check_exact(make(), rand_image(*size), f"SELECT HEATMAP FROM img USING net {tail}", full_path=False)


@pytest.mark.slow
def test_inception_v3_at_299_corners():
    torch.manual_seed(0)
    net = trained_like(M.inception_v3(weights=None, aux_logits=False, init_weights=False))
    img = rand_image(299, 299)
    # Two regions at opposite corners cover both borders of every axis; a black
    # 32-pixel patch moves the logits enough for the comparison to bite.
    for region in ("(0, 0, 56, 56)", "(243, 243, 299, 299)"):
        check_exact(net, img, f"SELECT HEATMAP FROM img USING net PATCH 32 STRIDE 24 COLOR BLACK REGION {region}",
                    full_path=False)


@pytest.mark.slow  # the real model on a photo, naive and exact
def test_efficientnet_lite0_real_weights_on_a_photo():
    """The real model: probabilities themselves vary, so 1e-5 is a real bound."""
    con = kql.connect(progress="off")
    q = "SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 24 STRIDE 20 REGION (0, 0, 224, 64)"
    naive = con.execute(q + " NAIVE")
    exact = con.execute(q + " EXACT")
    assert naive.label_name == "espresso"
    assert naive.heatmap.max() - naive.heatmap.min() > 0.01
    np.testing.assert_allclose(exact.heatmap, naive.heatmap, atol=1e-5, rtol=0)


# -- grid shapes, regions, batches --------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 5, stride=2, padding=2)
        self.p = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.c3 = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.p(F.relu(self.c2(x)))
        x = F.relu(self.c3(x)) + x.repeat(1, 1, 1, 1)[:, :1].expand(-1, 12, -1, -1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("size,tail", [
    ((37, 53), "PATCH 7x5 STRIDE 4x6"),                       # non-square everything, uneven grid
    ((40, 40), "PATCH 9 STRIDE 7 REGION (3, 5, 33, 38)"),     # region crop, stride does not divide
    ((30, 44), "PATCH 30x4 STRIDE 1x9"),                      # patch as tall as the image
    ((24, 24), "PATCH 1 STRIDE 5"),
])
def test_grid_shapes_and_regions(size, tail):
    check_exact(trained_like(SmallNet()), rand_image(*size), f"SELECT HEATMAP FROM img USING net {tail}")


def test_batch_sizes_give_the_same_heatmap():
    check_exact(trained_like(SmallNet()), rand_image(33, 31), "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 3",
                batch_sizes=(1, 7, 64))


# -- layer kinds --------------------------------------------------------------------

class Zoo(nn.Module):
    """Every local op variant and a few merges in one net."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.dil = nn.Conv2d(3, 6, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.avg_a = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg_b = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True)
        self.pad = nn.ConstantPad2d((2, 0, 1, 3), 0.25)
        self.conv = nn.Conv2d(6, 6, (3, 1), stride=(1, 2))
        self.se_fc = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.dil(x))
        x = self.dw(x)
        a = self.avg_a(x)
        b = self.avg_b(a)[:, :, 1:, 1:]          # slicing: not recognised -> global, computed fully
        x = F.pad(a, (1, 1, 0, 2)) * 0.5
        x = self.conv(self.pad(x))
        gate = torch.sigmoid(self.se_fc(F.adaptive_avg_pool2d(x, 1)))
        x = x * gate                                # squeeze-and-excitation: whole map changes
        return self.head(x.amax((2, 3)) + b.mean((2, 3)))


class LocalOnly(nn.Module):
    """Local ops without a global op in the middle, so they run incrementally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.dil = nn.Conv2d(3, 6, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.avg_a = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg_b = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=True)
        self.maxp = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.pad = nn.ConstantPad2d((2, 0, 1, 3), 0.25)
        self.conv = nn.Conv2d(6, 6, (3, 1), stride=(1, 2))
        self.head = nn.Linear(6 * 9 * 5, 4)

    def forward(self, x):
        x = F.relu(self.dil(x))
        y = self.dw(x)
        x = self.avg_b(self.avg_a(y))
        x = self.maxp(F.pad(x, (1, 1, 0, 2)) * 0.5)
        x = self.conv(self.pad(x))
        return self.head(torch.flatten(x, 1))


def test_every_local_op_variant():
    plan = check_exact(trained_like(LocalOnly()), rand_image(40, 44), "SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 5")
    kinds = {layer.op: str(layer.kind) for layer in plan.graph.layers()}
    assert kinds["avg_pool2d"] == "local" and kinds["pad"] == "local" and kinds["max_pool2d"] == "local"


def test_unknown_ops_and_squeeze_excitation_fall_back_correctly():
    plan = check_exact(trained_like(Zoo()), rand_image(36, 36), "SELECT HEATMAP FROM img USING net PATCH 5 STRIDE 4")
    text = str(kql.connect(progress="off").explain(
        "SELECT HEATMAP FROM img USING net PATCH 5 STRIDE 4 EXACT", img=rand_image(36, 36), net=Zoo()))
    assert "not incremental (computed in full" in text
    mul = [layer for layer in plan.graph.layers() if layer.op == "mul" and len(layer.inputs) == 2]
    assert mul and all(str(layer.kind) == "merge" for layer in mul)
    # the SE gate is 1x1, so the gated map changes everywhere
    assert all((plan.regions[layer.name].area == np.prod(layer.out_hw)).all() for layer in mul)


def test_a_layer_in_full_mode_past_the_cutoff_still_exact():
    """Force the cutoff early: everything after the first conv runs in full."""
    from kql.executor.incremental import occlusion_probabilities
    from kql.executor.naive import occlusion_probabilities as naive_probs
    con = kql.connect(progress="off")
    img, net = rand_image(32, 32), SmallNet().eval()
    plan = con.plan(parse("SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 5 EXACT"), {"img": img, "net": net})
    first_conv = next(layer.name for layer in plan.graph.layers() if layer.op == "conv2d")
    names = [layer.name for layer in plan.graph.layers()]
    plan.schedule = dataclasses.replace(plan.schedule, full_layers=frozenset(names[names.index(first_conv) + 1:]))
    got, _ = occlusion_probabilities(plan, net, 2, progress="off")
    ref, _ = naive_probs(plan, net, 2, progress="off")
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


class MeanThenPoint(nn.Module):
    """A global mean pool whose only reader is a point layer (ConvNeXt's head:
    avgpool, then LayerNorm2d's permute), the cutoff after the point layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        m = F.adaptive_avg_pool2d(self.conv(x), 1)
        return self.fc(torch.flatten(F.relu(m) * 2.0, 1))


def test_global_mean_read_by_point_layers_only():
    """The incremental mean (the view's mean plus the patch's change) reads
    the pool's own view, kept although its reader runs on patches."""
    net = trained_like(MeanThenPoint())
    con = kql.connect(progress="off")
    plan = con.plan(parse("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 EXACT"),
                    {"img": rand_image(24, 24), "net": net})
    names = [layer.name for layer in plan.graph.layers()]
    flatten = next(layer.name for layer in plan.graph.layers() if layer.op == "flatten")
    ref = naive_outputs(plan, net)
    idx = np.arange(plan.n_positions)
    with torch.inference_mode():
        runner = IncrementalRunner(plan, net, plan.regions, frozenset(names[names.index(flatten):]))
        pool = next(layer for layer in plan.graph.layers() if layer.op == "avg_pool2d")
        assert runner._is_global_mean(pool)
        got = runner.outputs(idx)
    np.testing.assert_allclose(torch.softmax(got, 1).numpy(), torch.softmax(ref, 1).numpy(), atol=1e-5, rtol=0)


# -- layouts: channels-last blocks, channel split and shuffle -----------------------

class ChannelsLast(nn.Module):
    """ConvNeXt in miniature: LayerNorm and Linear between permutes to and from
    channels-last, a merge of two channels-last maps, a LayerNorm2d
    (permute -> F.layer_norm -> permute) and a downsampling conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.ds = nn.Conv2d(8, 12, 2, stride=2)
        self.norm2 = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y))))
        y = y + 0.5 * y.softmax(-1)
        x = x + self.scale * y.permute(0, 3, 1, 2)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        x = self.ds(x)
        x = self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class ChannelShuffle(nn.Module):
    """ShuffleNetV2 in miniature: channel split, a branch, cat, channel shuffle,
    and a map whose rows and columns are swapped and swapped back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat((a, F.relu(self.bn(self.c2(b)))), 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = self.c3(x)
        x = x + 0.5 * x.transpose(2, 3).sigmoid().transpose(2, 3)
        return self.fc(x.amax((2, 3)))


def check_every_cutoff(model, image, query):
    """Exact against naive with the IVM cutoff before every layer that reads or
    writes a map in another layout than channels first: each such layer runs once
    on patches in its own layout and once from its input pasted into its view."""
    con = kql.connect(progress="off")
    plan = con.plan(parse(f"{query} EXACT"), {"img": image, "net": model})
    ref = naive_outputs(plan, model)
    layers = plan.graph.layers()
    names = [layer.name for layer in layers]
    idx = np.arange(plan.n_positions)
    cuts = [i for i, layer in enumerate(layers) if layer.spatial_axes is not None or layer.in_spatial_axes]
    assert cuts
    for cut in cuts:
        with torch.inference_mode():
            runner = IncrementalRunner(plan, model, plan.regions, frozenset(names[cut:]))
            got = runner.outputs(idx).reshape(len(idx), -1)
        err = (got - ref).abs().max().item()
        assert err <= 1e-4 * max(ref.abs().max().item(), 1.0), f"cutoff before {names[cut]}: {err:.3g}"


@pytest.mark.parametrize("make", [ChannelsLast, ChannelShuffle])
def test_layouts_exact_at_every_cutoff(make):
    net = trained_like(make())
    plan = check_exact(net, rand_image(23, 29), "SELECT HEATMAP FROM img USING net PATCH 5x7 STRIDE 3x4",
                       batch_sizes=(None, 5))
    moved = [layer for layer in plan.graph.layers() if layer.op in ("permute", "reshape", "chunk")]
    assert moved and all(layer.kind == Kind.POINT for layer in moved)
    assert any(layer.spatial_axes is not None for layer in moved)  # a layout other than channels first
    check_every_cutoff(net, rand_image(20, 17), "SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 5")
