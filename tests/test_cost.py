"""The cost model: incremental FLOPs by hand on tiny nets, and the speedup R of
real architectures against the Krypton papers."""
from __future__ import annotations

import functools
import time

import pytest

from kql.errors import PlanError
from kql.planner import graph as graph_mod
from kql.planner.cost import incremental_flops, theoretical_speedup
from kql.planner.plan import format_flops
from kql.planner.geometry import Rects, grid, propagate
from kql.planner.graph import Kind, Layer


class _Graph:
    """The part of CNNGraph the cost model reads, for a hand-built net."""

    def __init__(self, *layers):
        self._layers = list(layers)
        self.input = layers[0].name

    def layers(self):
        return self._layers

    def __getitem__(self, name):
        return next(layer for layer in self._layers if layer.name == name)


def _conv_net():
    # 2 -> 3 channels, 3x3/s1/p1 on 8x8: eq. 16 gives 2*3*3 * 3*8*8 = 3456 multiply-adds;
    # then a fully-connected layer 192 -> 10 (1920) after a flatten (0).
    return _Graph(
        Layer("x", "input", Kind.INPUT, out_shape=(2, 8, 8)),
        Layer("conv", "conv2d", Kind.LOCAL, inputs=("x",), kernel=(3, 3), padding=((1, 1), (1, 1)),
              in_shapes=((2, 8, 8),), out_shape=(3, 8, 8), flops=3456),
        Layer("flat", "flatten", Kind.GLOBAL, inputs=("conv",), in_shapes=((3, 8, 8),), out_shape=(192,)),
        Layer("fc", "linear", Kind.GLOBAL, inputs=("flat",), in_shapes=((192,),), out_shape=(10,), flops=1920),
    )


def test_incremental_flops_single_conv_by_hand():
    net = _conv_net()
    # 2x2 patches: in the middle, at the corner, hanging over the bottom-right corner
    regions = propagate(net, Rects.from_patches([3, 0, 7], [3, 0, 7], (2, 2)))
    assert regions["conv"] == Rects([2, 0, 6], [2, 0, 6], [6, 3, 8], [6, 3, 8])
    inc = incremental_flops(net, regions)
    # 3456 / 64 = 54 multiply-adds per output pixel: 4x4, 3x3 and 2x2 pixels
    assert inc["conv"].tolist() == [54.0 * 16, 54.0 * 9, 54.0 * 4]
    assert inc["fc"].tolist() == [1920.0] * 3          # global: always in full
    assert inc["x"].tolist() == inc["flat"].tolist() == [0.0] * 3


def test_nothing_changed_costs_nothing():
    net = _conv_net()
    regions = propagate(net, Rects.from_patches([20], [20], (2, 2)))   # outside the 8x8 image
    assert all(v.tolist() == [0.0] for v in incremental_flops(net, regions).values())


def test_speedup_by_hand():
    net = _conv_net()
    rep = theoretical_speedup(net, [3, 0], [3, 0], (2, 2))
    full = 3456 + 1920
    assert rep.full_flops == full
    assert rep.inc_flops.tolist() == [54 * 16 + 1920, 54 * 9 + 1920]
    assert rep.r_grid == pytest.approx(2 * full / (54 * 25 + 2 * 1920))
    # uniform: both positions recompute the largest conv region, 4x4
    assert rep.uniform_flops == 54 * 16 + 1920
    assert rep.r_uniform == pytest.approx(full / (54 * 16 + 1920))
    assert rep.r_positions.tolist() == pytest.approx([full / (54 * 16 + 1920), full / (54 * 9 + 1920)])
    assert theoretical_speedup(net, [3, 0], [3, 0], 2).r_grid == rep.r_grid      # int = square patch
    conv = rep.rows[1]
    assert (conv.name, conv.kind, conv.in_hw, conv.out_hw, conv.map_hw) == ("conv", "local", (2, 2), (4, 4), (8, 8))
    assert conv.inc_flops == pytest.approx(54 * 12.5)


def test_uniform_takes_largest_height_and_width_separately():
    # at the top edge the conv region is 3x4, at the left edge 4x3: one batch
    # tensor holding both must be 4x4
    rep = theoretical_speedup(_conv_net(), [0, 3], [3, 0], (2, 2))
    assert rep.inc_flops.tolist() == [54 * 12 + 1920] * 2
    assert rep.rows[1].out_hw == (4, 4)
    assert rep.uniform_flops == 54 * 16 + 1920


def test_r_grid_is_at_least_r_uniform():
    net = _conv_net()
    ys, xs = grid((8, 8), (3, 3), 1)
    rep = theoretical_speedup(net, ys, xs, (3, 3))
    assert rep.r_grid > rep.r_uniform > 1


def test_table_is_aligned():
    rep = theoretical_speedup(_conv_net(), [3], [3], (2, 2))
    lines = rep.table().splitlines()
    assert lines[0].split() == ["layer", "op", "kind", "patch", "in", "->", "out", "map", "FLOPs", "full",
                                "inc", "(mean)", "inc", "(uniform)"]
    conv = next(line for line in lines if line.startswith("conv"))
    assert conv.split() == ["conv", "conv2d", "local", "2x2", "->", "4x4", "8x8", "3.46K", "864", "864"]
    # the "->" of every row and the end of every number column line up
    rows = [line for line in lines if "->" in line]
    assert len({line.index("->") for line in rows}) == 1
    assert len({len(line) for line in lines[2:] if not line.startswith("-")}) == 1
    assert lines[-1].split()[-2:] == [f"{rep.r_grid:.2f}x", f"{rep.r_uniform:.2f}x"]
    assert rep.table(skip_zero=True).count("\n") == rep.table().count("\n") - 2   # x and flat


def test_errors_show_the_values():
    net = _conv_net()
    with pytest.raises(PlanError, match=r"^patch 0x4 must be at least 1x1$"):
        theoretical_speedup(net, [0], [0], (0, 4))
    with pytest.raises(PlanError, match=r"equal-length 1-D ys and xs, got shapes \(2,\) and \(3,\)"):
        theoretical_speedup(net, [0, 1], [0, 1, 2], (2, 2))
    with pytest.raises(PlanError, match="no patch positions"):
        theoretical_speedup(net, [], [], (2, 2))


def test_format_flops():
    assert [format_flops(x, sep="") for x in (0, 512, 3456, 15.47e9, 2.5e6)] == ["0", "512", "3.46K", "15.5G", "2.5M"]
    assert format_flops(15.47e9) == "15.5 G" and format_flops(5.49e4, unit="G") == "5.49e-05 GFLOPs"


# ---------------------------------------------------------------------------
# Real architectures, traced by planner.graph.trace
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _traced(name):
    """Each architecture traced once per test process (VGG16's random init alone takes seconds)."""
    import torchvision

    make, size = MODELS[name][:2]
    return graph_mod.trace(make(torchvision.models), (3, size, size))


# Expected bands. Krypton's Fig. 5 / workshop Fig. 6 put VGG16 at about 6.5-7.6
# for a 16x16 patch (the patch in the centre, one patch size per layer, FLOPs of
# conv and fc layers only); ResNet18 and Inception3 at about 2. Our r_uniform is
# that quantity with exact geometry (eq. 23 over-counts by one output after
# aligned stride-2 layers, which lowers Krypton's R a little) and with pooling,
# ReLU, BN and adds counted too (< 1 % of VGG16's FLOPs, a few % of the others').
# Neither effect moves R by more than ~5 %, so a +-10 % band around the value we
# derive by hand-checked geometry is tight enough to catch a wrong kind, a lost
# layer or a broken FLOP count, which all move R by far more.
MODELS = {
    # name: (constructor, input size, r_uniform band, r_grid band)
    "vgg16": (lambda tv: tv.vgg16(weights=None), 224, (6.0, 7.0), (8.5, 10.0)),
    "resnet18": (lambda tv: tv.resnet18(weights=None), 224, (1.95, 2.45), (2.5, 3.2)),
    "inception_v3": (lambda tv: tv.inception_v3(weights=None, aux_logits=True, init_weights=False), 299,
                     (1.6, 2.1), (1.7, 2.3)),
    "mobilenet_v2": (lambda tv: tv.mobilenet_v2(weights=None), 224, (1.65, 2.1), (2.0, 2.6)),
    # Channels-last blocks and channel shuffles are per pixel: ConvNeXt gets the R of its
    # channels-first equivalent (1x1 convs, channel LayerNorm: 1.36), ShuffleNetV2 that of
    # its convs. Recomputing everything after the first permute or shuffle gave 1.00 and 1.14.
    "convnext_tiny": (lambda tv: tv.convnext_tiny(weights=None), 224, (1.15, 1.4), (1.25, 1.5)),
    "shufflenet_v2_x1_0": (lambda tv: tv.shufflenet_v2_x1_0(weights=None), 224, (1.5, 1.85), (1.75, 2.15)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_speedup_of_real_architectures(name):
    _, size, uniform_band, grid_band = MODELS[name]
    g = _traced(name)
    for stride in (1, 4):
        ys, xs = grid((size, size), (16, 16), stride)
        t = time.process_time()
        rep = theoretical_speedup(g, ys, xs, (16, 16))
        seconds = time.process_time() - t
        print(f"{name} patch 16 stride {stride}: {len(ys)} positions, {rep.full_flops / 1e9:.2f} GFLOPs, "
              f"r_uniform {rep.r_uniform:.2f}, r_grid {rep.r_grid:.2f} ({seconds:.2f} s CPU)")
        assert rep.full_flops == g.total_flops
        assert uniform_band[0] <= rep.r_uniform <= uniform_band[1]
        assert grid_band[0] <= rep.r_grid <= grid_band[1]
        # border positions change less, so the exact grid beats uniform batching
        assert rep.r_grid > rep.r_uniform
        # every position costs at most what uniform batching pays for it
        assert rep.inc_flops.max() <= rep.uniform_flops * (1 + 1e-12)
        assert seconds < (2.0 if name == "vgg16" else 5.0)
        # the output layer (after the fc) is always recomputed in full
        assert rep.rows[-1].out_hw == (1, 1)


def test_vgg16_layers_match_krypton_geometry():
    """Patch 16 at the centre of VGG16: each 3x3/p1 conv adds one pixel per side,
    each 2x2/s2 pool halves (rounding out), as Krypton's Fig. 3 and eqs. 21-24 say."""
    rep = theoretical_speedup(_traced("vgg16"), [104], [104], (16, 16))
    convs = [r for r in rep.rows if r.op == "conv2d"]
    pools = [r for r in rep.rows if r.op == "max_pool2d"]
    # by hand: [104, 120) -> [103, 121) -> [102, 122) -pool-> [51, 61) -> [50, 62) -> [49, 63)
    # -pool-> [24, 32) -> ... -> [21, 35) -pool-> [10, 18) -> ... -> [7, 21) -pool-> [3, 11)
    # -> [2, 12) -> [1, 13) -> [0, 14) -pool-> [0, 7): the whole 7x7 map
    assert [c.out_hw[0] for c in convs] == [18, 20, 12, 14, 10, 12, 14, 10, 12, 14, 10, 12, 14]
    assert [p.out_hw[0] for p in pools] == [10, 8, 8, 8, 7]
    assert [p.map_hw[0] for p in pools] == [112, 56, 28, 14, 7]
    # conv FLOPs scale with the changed area (eq. 18 over eq. 16)
    c = convs[0]
    assert c.inc_flops == pytest.approx(c.full_flops * 18 * 18 / (224 * 224))
