"""Patch geometry against brute force: run the torch op on an image and on a
copy that differs only inside a patch, and compare what changed with what
``kql.planner.geometry`` predicts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from kql.planner.geometry import (Rects, changed_out, grid, out_region, pad_changed_out, propagate,
                                  read_range, read_region)
from kql.planner.graph import Kind, Layer

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Random window layers: a Layer description and the torch function it describes
# ---------------------------------------------------------------------------

@dataclass
class Case:
    layer: Layer
    fn: object            # (1, C, H, W) float64 -> output
    minimal: bool         # every output whose window reads the patch really changes


def _layer(op, c_in, h, w, out, **kw) -> Layer:
    return Layer(name=op, op=op, kind=Kind.LOCAL, inputs=("x",), in_shapes=((c_in, h, w),),
                 out_shape=tuple(out.shape[1:]), **kw)


@st.composite
def window_cases(draw):
    kind = draw(st.sampled_from(["conv", "max_pool", "max_pool_asym", "avg_pool", "pad"]))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    pair = lambda lo, hi: (draw(st.integers(lo, hi)), draw(st.integers(lo, hi)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    if kind == "conv":
        groups = draw(st.integers(1, 3))
        c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        k, s, d = pair(1, 7), pair(1, 4), pair(1, 3)
        t, b, l, r = (draw(st.integers(0, 3)) for _ in range(4))
        assume(h + t + b >= d[0] * (k[0] - 1) + 1 and w + l + r >= d[1] * (k[1] - 1) + 1)
        weight = torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=torch.float64)
        bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
        # asymmetric padding the way TF "same" models do it: F.pad, then an unpadded conv
        fn = lambda x: F.conv2d(F.pad(x, (l, r, t, b)), weight, bias, stride=s, dilation=d, groups=groups)
        params = dict(kernel=k, stride=s, dilation=d, groups=groups, padding=((t, b), (l, r)))
        minimal = True
        op = "conv2d"
    elif kind in ("max_pool", "avg_pool"):
        c_in = draw(st.integers(1, 2))
        k, s = pair(1, 5), pair(1, 4)
        p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
        ceil = draw(st.booleans())
        if kind == "max_pool":
            d = pair(1, 3)
            fn = lambda x: F.max_pool2d(x, k, s, p, dilation=d, ceil_mode=ceil)
            params = dict(dilation=d, pad_value=-math.inf)
            minimal = False  # the max may come from an unchanged pixel
            op = "max_pool2d"
        else:
            cip = draw(st.booleans())
            fn = lambda x: F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=cip)
            params = dict(count_include_pad=cip)
            minimal = True
            op = "avg_pool2d"
        params.update(kernel=k, stride=s, padding=((p[0], p[0]), (p[1], p[1])), ceil_mode=ceil)
    elif kind == "max_pool_asym":
        c_in = 1
        k, s = pair(1, 5), pair(1, 4)
        t, b, l, r = (draw(st.integers(0, 3)) for _ in range(4))
        ceil = draw(st.booleans())
        assume(h + t + b >= k[0] and w + l + r >= k[1])
        fn = lambda x: F.max_pool2d(F.pad(x, (l, r, t, b), value=-math.inf), k, s, ceil_mode=ceil)
        params = dict(kernel=k, stride=s, padding=((t, b), (l, r)), ceil_mode=ceil, pad_value=-math.inf)
        minimal = False
        op = "max_pool2d"
    else:
        c_in = 1
        mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
        lo = -2 if mode == "constant" else 0   # negative constant pads crop
        t, b, l, r = (draw(st.integers(lo, 3)) for _ in range(4))
        if mode == "reflect":
            assume(max(t, b) < h and max(l, r) < w)
        if mode == "circular":
            assume(max(t, b) <= h and max(l, r) <= w)
        assume(h + t + b >= 1 and w + l + r >= 1)
        fn = lambda x: F.pad(x, (l, r, t, b), mode=mode)
        params = dict(padding=((t, b), (l, r)), extra={"mode": mode})
        minimal = True
        op = "pad"

    x = torch.zeros(1, c_in, h, w, dtype=torch.float64)
    try:
        out = fn(x)
    except RuntimeError:  # a combination torch rejects (pad too large for the kernel, ...)
        assume(False)
    assume(out.shape[2] >= 1 and out.shape[3] >= 1)
    return Case(_layer(op, c_in, h, w, out, **params), fn, minimal)


@st.composite
def patch_in(draw, h, w):
    y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    return y0, x0, draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))


def _bbox(mask: torch.Tensor) -> Rects:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return Rects.empty(1)
    return Rects(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def _inside(mask: torch.Tensor, r: Rects) -> torch.Tensor:
    m = torch.zeros_like(mask)
    m[int(r.y0[0]):int(r.y1[0]), int(r.x0[0]):int(r.x1[0])] = True
    return m


@SETTINGS
@given(data=st.data())
def test_window_layers_against_brute_force(data):
    case = data.draw(window_cases())
    layer = case.layer
    _, h, w = layer.in_shapes[0]
    y0, x0, y1, x1 = data.draw(patch_in(h, w))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.rand(1, layer.in_shapes[0][0], h, w, generator=gen, dtype=torch.float64)
    x2 = x.clone()
    x2[..., y0:y1, x0:x1] = torch.rand(x2[..., y0:y1, x0:x1].shape, generator=gen, dtype=torch.float64) + 2

    out, out2 = case.fn(x), case.fn(x2)
    changed = (out != out2).any(dim=1)[0]
    pred = out_region(layer, [Rects(y0, x0, y1, x1)])

    # (a) safety: every output that changed lies inside the prediction
    assert not (changed & ~_inside(changed, pred)).any(), (layer, (y0, x0, y1, x1), pred)
    # (b) minimality: the prediction is the bounding box of what changed
    if case.minimal:
        assert _bbox(changed) == pred, (layer, (y0, x0, y1, x1), pred, _bbox(changed))
    # (c) sufficiency: outside the read region the input may hold anything
    if pred.is_empty[0]:
        return
    rd = read_region(layer, pred)
    keep = torch.zeros(h, w, dtype=torch.bool)
    keep[max(int(rd.y0[0]), 0):max(int(rd.y1[0]), 0), max(int(rd.x0[0]), 0):max(int(rd.x1[0]), 0)] = True
    x3 = torch.where(keep, x2, torch.rand(x2.shape, generator=gen, dtype=torch.float64) - 5)
    out3 = case.fn(x3)
    m = _inside(changed, pred)
    assert torch.equal(out3[..., m], out2[..., m]), (layer, pred, rd)


# ---------------------------------------------------------------------------
# 1-D maps: by hand, and Krypton's equations as upper bounds
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, k, s, p, d, n_out, expected", [
    # VGG 3x3/s1/p1 on 224, patch 16: grows one pixel each side, cut at the border
    (100, 116, 3, 1, 1, 1, 224, (99, 117)),
    (0, 16, 3, 1, 1, 1, 224, (0, 17)),
    (208, 224, 3, 1, 1, 1, 224, (207, 224)),
    # 2x2/s2 max pool on 224 -> 112
    (99, 117, 2, 2, 0, 1, 112, (49, 59)),
    (100, 116, 2, 2, 0, 1, 112, (50, 58)),     # aligned: 8 outputs, eq. 23 says 9
    (0, 17, 2, 2, 0, 1, 112, (0, 9)),
    # Krypton Fig. 4 (a)/(b): stride == kernel == 3, a 3-wide patch
    (3, 6, 3, 3, 0, 1, 5, (1, 2)),             # aligned: 1 output, eq. 23 says 2
    (4, 7, 3, 3, 0, 1, 5, (1, 3)),             # shifted: 2 outputs, as eq. 23
    # stride > kernel: a patch in the gap between windows changes nothing
    (2, 3, 2, 3, 0, 1, 4, (0, 0)),
    # dilation 2, one changed pixel: outputs 3, 5, 7 read it; bounding range
    (5, 6, 3, 1, 2, 2, 10, (3, 8)),
    # empty input range
    (5, 5, 3, 1, 1, 1, 10, (0, 0)),
])
def test_changed_out_by_hand(a, b, k, s, p, d, n_out, expected):
    assert changed_out(a, b, k=k, s=s, p=p, d=d, n_out=n_out) == expected


def test_read_range_by_hand():
    assert read_range(99, 117, k=3, s=1, p=1) == (98, 118)
    assert read_range(0, 17, k=3, s=1, p=1) == (-1, 18)      # reaches into the padding
    assert read_range(50, 58, k=2, s=2, p=0) == (100, 116)
    assert read_range(3, 8, k=3, s=1, p=2, d=2) == (1, 10)
    assert read_range(4, 4, k=3, s=1, p=1) == (0, 0)


def test_pad_changed_out_by_hand():
    assert pad_changed_out(0, 2, before=2, n_in=8, n_out=12) == (2, 4)
    assert pad_changed_out(0, 2, before=2, n_in=8, n_out=12, mode="reflect") == (1, 4)
    assert pad_changed_out(0, 1, before=2, n_in=8, n_out=12, mode="replicate") == (0, 3)
    assert pad_changed_out(7, 8, before=2, n_in=8, n_out=12, mode="circular") == (1, 10)
    assert pad_changed_out(0, 2, before=-3, n_in=8, n_out=5) == (0, 0)   # cropped away


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 60), n=st.integers(1, 30), k=st.integers(1, 7), s=st.integers(1, 4),
       p=st.integers(0, 3))
def test_krypton_eqs_21_24_are_upper_bounds(a, n, k, s, p):
    """Eq. 21's start is exact, eq. 23's width an upper bound that is exact away
    from the border when the stride is 1."""
    n_in = a + n + 40
    n_out = (n_in + 2 * p - k) // s + 1
    o0, o1 = changed_out(a, a + n, k=k, s=s, p=p, n_out=n_out)
    k_o0 = max(math.ceil((p + a - k + 1) / s), 0)            # eq. 21
    k_w = min(math.ceil((n + k - 1) / s), n_out)              # eq. 23
    assert o1 - o0 <= k_w
    if o1 > o0:  # (with s > k a patch in the gap between windows changes nothing)
        assert o0 == k_o0
    if s == 1 and a + p - k + 1 >= 0 and o1 < n_out:
        assert (o0, o1 - o0) == (k_o0, k_w)


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, 200)
    b = a + rng.integers(0, 10, 200)
    for k, s, p, d in [(3, 1, 1, 1), (7, 2, 3, 1), (3, 2, 2, 3), (1, 4, 0, 1)]:
        n_out = (60 + 2 * p - d * (k - 1) - 1) // s + 1
        o0, o1 = changed_out(a, b, k=k, s=s, p=p, d=d, n_out=n_out)
        assert o0.dtype == np.int64 and o0.shape == (200,)
        assert [(int(u), int(v)) for u, v in zip(o0, o1)] == \
            [changed_out(int(u), int(v), k=k, s=s, p=p, d=d, n_out=n_out) for u, v in zip(a, b)]


# ---------------------------------------------------------------------------
# Rects
# ---------------------------------------------------------------------------

def test_rects_algebra():
    r = Rects([0, 2, 5], [0, 2, 5], [4, 6, 5], [4, 6, 9])
    assert r.is_empty.tolist() == [False, False, True]
    assert r.area.tolist() == [16, 16, 0]
    assert r[2] == Rects.empty(1)                      # empties are normalised
    assert r[:2] == Rects([0, 2], [0, 2], [4, 6], [4, 6])
    assert r[np.array([True, False, True])] == Rects([0, 0], [0, 0], [4, 0], [4, 0])
    other = Rects([1, 0, 3], [3, 0, 1], [2, 0, 4], [8, 0, 2])
    # bounding box; the empty side is ignored at position 1 and 2
    assert r.union(other) == Rects([0, 2, 3], [0, 2, 1], [4, 6, 4], [8, 6, 2])
    assert r.intersect(other) == Rects([1, 0, 0], [3, 0, 0], [2, 0, 0], [4, 0, 0])
    assert Rects([-3], [5], [4], [20]).clip(8, 10) == Rects([0], [5], [4], [10])
    assert Rects([-3], [12], [4], [20]).clip(8, 10) == Rects.empty(1)
    assert Rects.full(2, 7, 9) == Rects([0, 0], [0, 0], [7, 7], [9, 9])
    assert Rects.full(2, 7, 9) != Rects.full(3, 7, 9)
    assert r.shift(1, -2) == Rects([1, 3, 0], [-2, 0, 0], [5, 7, 0], [2, 4, 0])
    assert r.contains(Rects([1, 0, 0], [1, 0, 0], [3, 9, 0], [3, 9, 0])).tolist() == [True, False, True]
    assert Rects.from_patches([3], [4], (2, 5)) == Rects(3, 4, 5, 9)


def test_grid_matches_algorithm_1_loop():
    ys, xs = grid((224, 224), (16, 16), 4)
    assert len(ys) == 53 * 53 and (int(ys[-1]), int(xs[-1])) == (208, 208)
    assert (int(ys[1]), int(xs[1])) == (0, 4)
    with pytest.raises(ValueError, match="patch 300x300 does not fit image 224x224"):
        grid((224, 224), (300, 300), 1)


# ---------------------------------------------------------------------------
# A small DAG (chain, residual add, squeeze-and-excitation gate, fc) by hand
# ---------------------------------------------------------------------------

class _Graph:
    """The part of CNNGraph the geometry reads, for a hand-built net."""

    def __init__(self, layers, fns):
        self._layers, self.fns = layers, fns
        self.input = layers[0].name

    def layers(self):
        return self._layers

    def __getitem__(self, name):
        return next(layer for layer in self._layers if layer.name == name)

    def run(self, x):
        vals = {}
        for layer in self._layers:
            vals[layer.name] = x if layer.kind == Kind.INPUT else self.fns[layer.name](*(vals[i] for i in layer.inputs))
        return vals


def _small_net():
    g = torch.Generator().manual_seed(0)
    wt = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    w1, w2, w3, wfc = wt(4, 3, 3, 3), wt(4, 4, 3, 3), wt(4, 4, 1, 1), wt(5, 4 * 8 * 8)
    L = lambda name, op, kind, ins, shapes, out, **kw: Layer(name, op, kind, inputs=ins, in_shapes=shapes,
                                                             out_shape=out, **kw)
    c3, c4, m16, m8 = (3, 17, 17), (4, 17, 17), (4, 16, 16), (4, 8, 8)
    layers = [
        L("x", "input", Kind.INPUT, (), (), c3),
        L("conv1", "conv2d", Kind.LOCAL, ("x",), (c3,), c4, kernel=(3, 3), padding=((1, 1), (1, 1))),
        L("relu1", "relu", Kind.POINT, ("conv1",), (c4,), c4),
        L("pool", "max_pool2d", Kind.LOCAL, ("relu1",), (c4,), m16, kernel=(2, 2), stride=(1, 1)),
        L("conv2", "conv2d", Kind.LOCAL, ("pool",), (m16,), m8, kernel=(3, 3), stride=(2, 2),
          padding=((1, 1), (1, 1))),
        L("conv3", "conv2d", Kind.LOCAL, ("pool",), (m16,), m8, stride=(2, 2)),
        L("add", "add", Kind.MERGE, ("conv2", "conv3"), (m8, m8), m8),
        L("squeeze", "adaptive_avg_pool2d", Kind.GLOBAL, ("add",), (m8,), (4, 1, 1)),
        L("gate", "sigmoid", Kind.POINT, ("squeeze",), ((4, 1, 1),), (4, 1, 1)),
        L("excite", "mul", Kind.MERGE, ("add", "gate"), (m8, (4, 1, 1)), m8),
        L("flat", "flatten", Kind.GLOBAL, ("excite",), (m8,), (256,)),
        L("fc", "linear", Kind.GLOBAL, ("flat",), ((256,),), (5,)),
    ]
    fns = {
        "conv1": lambda x: F.conv2d(x, w1, padding=1), "relu1": F.relu,
        "pool": lambda x: F.max_pool2d(x, 2, 1),
        "conv2": lambda x: F.conv2d(x, w2, stride=2, padding=1),
        "conv3": lambda x: F.conv2d(x, w3, stride=2),
        "add": torch.add, "squeeze": lambda x: F.adaptive_avg_pool2d(x, 1), "gate": torch.sigmoid,
        "excite": torch.mul, "flat": lambda x: x.flatten(1), "fc": lambda x: F.linear(x, wfc),
    }
    return _Graph(layers, fns)


def test_propagate_small_dag_against_brute_force():
    net = _small_net()
    ys, xs = grid((17, 17), (3, 3), 2)
    regions = propagate(net, Rects.from_patches(ys, xs, (3, 3)))
    x = torch.rand(1, 3, 17, 17, dtype=torch.float64)
    base = net.run(x)
    for i, (y, x0) in enumerate(zip(ys, xs)):
        x2 = x.clone()
        x2[..., y:y + 3, x0:x0 + 3] = 5.0
        occluded = net.run(x2)
        for layer in net.layers():
            a, b = base[layer.name], occluded[layer.name]
            changed = (a != b).reshape(1, -1, 1, 1) if a.dim() == 2 else (a != b)
            changed = changed.any(dim=1)[0]
            r = regions[layer.name][i]
            assert not (changed & ~_inside(changed, r)).any(), (layer.name, i, r)
            # exact until the first ReLU / max pool, which may hide a change
            if layer.name in ("x", "conv1"):
                assert _bbox(changed) == r, (layer.name, i, r, _bbox(changed))
    # the gate is 1x1 and changes, so the gated map changes everywhere
    assert regions["excite"] == Rects.full(len(ys), 8, 8)
    assert regions["fc"] == Rects.full(len(ys), 1, 1)


def test_merge_broadcast_and_global():
    layer = Layer("mul", "mul", Kind.MERGE, inputs=("a", "g"), in_shapes=((4, 8, 8), (4, 1, 1)),
                  out_shape=(4, 8, 8))
    a = Rects([2, 0], [3, 0], [5, 0], [6, 0])
    assert out_region(layer, [a, Rects.empty(2)]) == a
    assert out_region(layer, [a, Rects.full(2, 1, 1)]) == Rects.full(2, 8, 8)
    # broadcast along one axis only: a (C, 1, W) row spans the height, keeps its columns
    row = Layer("add", "add", Kind.MERGE, inputs=("a", "r"), in_shapes=((4, 8, 8), (4, 1, 8)),
                out_shape=(4, 8, 8))
    assert out_region(row, [Rects.empty(2), Rects([0, 0], [3, 0], [1, 0], [5, 0])]) == \
        Rects([0, 0], [3, 0], [8, 0], [5, 0])
    assert out_region(row, [a, Rects([0, 0], [1, 0], [1, 0], [2, 0])]) == Rects([0, 0], [1, 0], [8, 0], [6, 0])
    fc = Layer("fc", "linear", Kind.GLOBAL, inputs=("a",), in_shapes=((256,),), out_shape=(5,))
    assert out_region(fc, [Rects([0, 0], [0, 0], [1, 0], [1, 0])]) == Rects([0, 0], [0, 0], [1, 0], [1, 0])


# ---------------------------------------------------------------------------
# Traced torchvision models, every layer, against brute force
# ---------------------------------------------------------------------------

class _Recorder(torch.fx.Interpreter):
    """Runs a traced GraphModule and keeps a copy of every node's value (copies,
    because torchvision's in-place ReLUs overwrite the tensors they read)."""

    def run_node(self, n):
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.values[n.name] = value.clone()
        return value

    def record(self, x):
        self.values = {}
        self.run(x)
        return self.values


def _changed_maps(a: torch.Tensor, b: torch.Tensor, axes: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """(N, H, W) masks of what differs between a batch-1 base value and a batch of N,
    for a map whose spatial axes are ``axes`` (``Layer.out_axes``; none: a 1x1 map).

    "Differs" is beyond float64 rounding: a conv over a batch of N may sum in
    another order than over one image, which moves unchanged outputs by 1e-16.
    """
    diff = (a - b).abs() > 1e-9 * max(a.abs().max().item(), 1.0)
    if not axes:
        return diff.reshape(len(b), 1, 1, -1).any(dim=3)
    others = [d for d in range(1, diff.dim()) if d - 1 not in axes]
    diff = diff.permute(0, *(a + 1 for a in axes), *others)
    return diff.reshape(*diff.shape[:1 + len(axes)], -1).any(dim=-1)


def _region_masks(r: Rects, h: int, w: int) -> torch.Tensor:
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    col = lambda v: torch.tensor(v).view(-1, 1, 1)   # (Rects arrays are read-only)
    return (col(r.y0) <= ys) & (ys < col(r.y1)) & (col(r.x0) <= xs) & (xs < col(r.x1))


@pytest.mark.slow
@pytest.mark.parametrize("name, size, patch", [
    ("resnet18", 64, 8),              # stride-2 convs with padding, residual adds
    ("mobilenet_v2", 64, 8),          # depthwise (groups) convs, relu6
    ("efficientnet_b0", 64, 8),       # squeeze-and-excitation: the 1x1 gate is broadcast
    ("inception_v3", 96, 12),         # cat, F.avg_pool2d / F.max_pool2d, 1x7 and 7x1 convs
    ("squeezenet1_0", 64, 8),         # max pool with ceil_mode
    ("convnext_tiny", 64, 8),         # channels-last blocks: permute, LayerNorm, Linear
    ("shufflenet_v2_x1_0", 64, 8),    # channel split (chunk) and shuffle (view, transpose, view)
])
def test_propagate_traced_models_against_brute_force(name, size, patch):
    """Every layer of a traced model: what changes lies inside the predicted region."""
    import torchvision

    from kql.planner.graph import trace

    kwargs = dict(aux_logits=True, init_weights=False) if name == "inception_v3" else {}
    torch.manual_seed(0)
    g = trace(getattr(torchvision.models, name)(weights=None, **kwargs), (3, size, size))
    g.module.double()
    # a 5x5 grid from corner to corner and two off-grid positions, all in one batch
    ys, xs = grid((size, size), (patch, patch), (size - patch) // 4)
    ys, xs = np.append(ys, [5, size - patch - 3]), np.append(xs, [size - patch - 1, 7])
    regions = propagate(g, Rects.from_patches(ys, xs, (patch, patch)))
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    batch = x.repeat(len(ys), 1, 1, 1)
    for i, (y, x0) in enumerate(zip(ys.tolist(), xs.tolist())):
        batch[i, :, y:y + patch, x0:x0 + patch] = 0.5 + torch.rand(3, patch, patch, dtype=torch.float64)
    rec = _Recorder(g.module)
    with torch.no_grad():
        base, occluded = rec.record(x), rec.record(batch)
    first_conv = next(layer.name for layer in g.layers() if layer.op == "conv2d")
    for layer in g.layers():
        changed = _changed_maps(base[layer.name], occluded[layer.name], layer.out_axes)
        inside = _region_masks(regions[layer.name], *changed.shape[1:])
        outside = (changed & ~inside).flatten(1).any(dim=1)
        assert not outside.any(), (name, layer.name, layer.op, np.flatnonzero(outside.numpy()))
        if layer.name == first_conv:   # exact up to the first non-linearity
            assert torch.equal(changed, inside), (name, layer.name)
    # the logits change at every position
    assert regions[g.output] == Rects.full(len(ys), 1, 1)
