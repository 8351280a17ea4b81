"""Tests of the tracer and the layer DAG (``kql.planner.graph``).

Real torchvision architectures with random weights (never downloaded), each
built and traced once, in one test. The independent references are the models
themselves: eager forward shapes (module hooks), and, for every local layer,
the functional op called from the stored parameters on the explicitly padded
input, which must reproduce what the module computed (bit for bit, except
adaptive pooling rewritten as a window, whose sum runs in another order).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections import Counter, defaultdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from kql.errors import PlanError
from kql.planner.graph import CNNGraph, Kind, Layer, trace

M = torchvision.models



FIX_HINT = (" (KQL plans over a torch.fx trace: replace Python if/for on tensor values in that module "
            "with tensor ops such as torch.where)")

def _lite0():
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0")


# name -> (constructor, image size). Random weights only: nothing is downloaded.
MODELS = {
    "vgg16": (lambda: M.vgg16(weights=None, init_weights=False), 224),
    "resnet18": (lambda: M.resnet18(weights=None), 224),
    "mobilenet_v2": (lambda: M.mobilenet_v2(weights=None), 224),
    "squeezenet1_0": (lambda: M.squeezenet1_0(weights=None), 224),
    "densenet121": (lambda: M.densenet121(weights=None), 224),
    "inception_v3": (lambda: M.inception_v3(weights=None, aux_logits=True, init_weights=False), 299),
    "mobilenet_v3_small": (lambda: M.mobilenet_v3_small(weights=None), 224),
    "efficientnet_b0": (lambda: M.efficientnet_b0(weights=None), 224),
    "efficientnet_lite0": (_lite0, 224),
    "convnext_tiny": (lambda: M.convnext_tiny(weights=None), 224),
    "shufflenet_v2_x1_0": (lambda: M.shufflenet_v2_x1_0(weights=None), 224),
}

# Layers per kind, per model: the classification table the planner relies on.
KINDS = {
    "vgg16": dict(input=1, local=19, point=17, global_=4, merge=0, output=1),
    "resnet18": dict(input=1, local=22, point=37, global_=2, merge=8, output=1),
    "mobilenet_v2": dict(input=1, local=53, point=88, global_=2, merge=10, output=1),
    "squeezenet1_0": dict(input=1, local=30, point=27, global_=1, merge=8, output=1),
    "densenet121": dict(input=1, local=125, point=246, global_=2, merge=58, output=1),
    "inception_v3": dict(input=1, local=108, point=189, global_=2, merge=15, output=1),
    "mobilenet_v3_small": dict(input=1, local=62, point=77, global_=3, merge=15, output=1),
    "efficientnet_b0": dict(input=1, local=98, point=124, global_=2, merge=25, output=1),
    "efficientnet_lite0": dict(input=1, local=67, point=83, global_=2, merge=9, output=1),
    # Pointwise although they look global: channels-last blocks, channel split and shuffle.
    "convnext_tiny": dict(input=1, local=23, point=159, global_=2, merge=18, output=1),
    "shufflenet_v2_x1_0": dict(input=1, local=57, point=183, global_=2, merge=16, output=1),
}


def traced(name: str) -> tuple[nn.Module, CNNGraph]:
    """Build an architecture with seeded random weights and trace it."""
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make()
    return model, trace(model, (3, size, size))


def count(g: CNNGraph, **match) -> int:
    return sum(all(getattr(layer, k) == v for k, v in match.items()) for layer in g)


# ---------------------------------------------------------------------------
# Every architecture
# ---------------------------------------------------------------------------

def check_kinds_and_lint(name: str, g: CNNGraph) -> None:
    g.lint()
    kinds = Counter(str(layer.kind) for layer in g)
    expected = {k.rstrip("_"): v for k, v in KINDS[name].items()}
    assert {k: kinds.get(k, 0) for k in expected} == expected
    assert g.input_shape == (3, MODELS[name][1], MODELS[name][1])
    assert g[g.output].out_shape == (1000,)
    # Only ops the planner knows: nothing global for want of recognising it.
    assert [(layer.name, layer.reason) for layer in g if layer.reason] == []
    # Everything listed as an input is an image-dependent tensor layer, and
    # constants (weights, BN statistics) never are.
    assert all(layer.kind is not Kind.INPUT or not layer.inputs for layer in g)
    assert not any(node.op == "get_attr" and node.name in g for node in g.module.graph.nodes)


# ---------------------------------------------------------------------------
# Architectures one by one
# ---------------------------------------------------------------------------

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def check_vgg16(model, g):
    """Convs, pools and FLOPs."""
    convs = [layer for layer in g if layer.op == "conv2d"]
    assert len(convs) == 13
    for c in convs:
        assert (c.kind, c.kernel, c.stride, c.padding, c.dilation, c.groups, c.pad_value) == \
            (Kind.LOCAL, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, 0.0)
    pools = [layer for layer in g if layer.op == "max_pool2d"]
    assert [(p.kind, p.kernel, p.stride, p.pad_value) for p in pools] == \
        [(Kind.LOCAL, (2, 2), (2, 2), float("-inf"))] * 5
    # Krypton eq. 16 by hand: C_in * 3 * 3 * C_out * H * W per conv.
    q, c_in, hw = 0, 3, 224
    for v in VGG16_CFG:
        if v == "M":
            hw //= 2
        else:
            q += c_in * 9 * v * hw * hw
            c_in = v
    assert q == sum(c.flops for c in convs)
    assert q == pytest.approx(15.35e9, rel=2e-3)
    fc = 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    assert sum(layer.flops for layer in g if layer.op == "linear") == fc
    assert g.total_flops == pytest.approx(15.5e9, rel=5e-3)
    # AdaptiveAvgPool2d((7, 7)) on a 7x7 map is a 1x1 window: the identity.
    avg = g["avgpool"]
    assert (avg.op, avg.kind, avg.kernel, avg.stride) == ("avg_pool2d", Kind.LOCAL, (1, 1), (1, 1))
    assert [g[n].op for n in ("flatten", "classifier_0", "classifier_2")] == ["flatten", "linear", "dropout"]
    assert g["classifier_2"].kind is Kind.POINT and g["classifier_2"].flops == 0


def check_resnet18(model, g):
    """The adds of the skip connections are merges."""
    adds = [layer for layer in g if layer.op == "add"]
    assert len(adds) == 8 and all(a.kind is Kind.MERGE and len(a.inputs) == 2 for a in adds)
    first = g["add"]
    assert first.inputs == ("layer1_0_bn2", "maxpool") and first.in_shapes == ((64, 56, 56),) * 2
    assert g.consumers("maxpool") == ["layer1_0_conv1", "add"]
    assert g["conv1"].padding == ((3, 3), (3, 3)) and g["conv1"].stride == (2, 2)
    assert g["maxpool"].padding == ((1, 1), (1, 1)) and g["maxpool"].pad_value == float("-inf")
    # The downsampling shortcut: a 1x1 conv with stride 2.
    ds = g["layer2_0_downsample_0"]
    assert (ds.kernel, ds.stride, ds.padding, ds.out_shape) == ((1, 1), (2, 2), ((0, 0), (0, 0)), (128, 28, 28))
    assert g["avgpool"].kernel == (7, 7) and g["avgpool"].kind is Kind.LOCAL


def check_mobilenet_v2(model, g):
    """Depthwise convs keep their groups."""
    dw = [layer for layer in g if layer.op == "conv2d" and layer.groups > 1]
    assert len(dw) == 17
    for c in dw:
        assert c.groups == c.in_shapes[0][0] == c.out_shape[0] and c.kernel == (3, 3)
        assert c.flops == c.out_shape[0] * c.out_hw[0] * c.out_hw[1] * 9  # C_in/groups = 1
    assert count(g, op="relu6", kind=Kind.POINT) == 35
    pool = g["adaptive_avg_pool2d"]  # F.adaptive_avg_pool2d(x, (1, 1)) on 7x7
    assert (pool.target, pool.op, pool.kernel, pool.stride) == \
        ("torch.nn.functional.adaptive_avg_pool2d", "avg_pool2d", (7, 7), (7, 7))


def check_squeezenet1_0(model, g):
    """Fire modules cat two branches; pools use ceil_mode."""
    cats = [layer for layer in g if layer.op == "cat"]
    assert len(cats) == 8 and all(c.kind is Kind.MERGE and len(c.inputs) == 2 for c in cats)
    assert all(c.extra["dim"] == 1 and c.out_shape[0] == sum(s[0] for s in c.in_shapes) for c in cats)
    pools = [layer for layer in g if layer.op == "max_pool2d"]
    assert [(p.kernel, p.stride, p.ceil_mode) for p in pools] == [((3, 3), (2, 2), True)] * 3
    assert [p.out_hw for p in pools] == [(54, 54), (27, 27), (13, 13)]  # floor mode would give 54, 26, 12
    assert g["classifier_3"].kernel == (13, 13)


def check_densenet121(model, g):
    """Dense blocks cat many tensors."""
    merges = [layer for layer in g if layer.op == "cat" and layer.kind is Kind.MERGE]
    assert len(merges) == 5 + 11 + 23 + 15 + 4  # dense layers after the first, plus each block's output
    assert max(len(c.inputs) for c in merges) == 25  # block 3: its input + 24 layers
    # The first dense layer of a block concatenates one tensor: a point copy.
    singles = [layer for layer in g if layer.op == "cat" and layer.kind is Kind.POINT]
    assert len(singles) == 4 and all(len(c.inputs) == 1 for c in singles)
    trans = [layer for layer in g if layer.op == "avg_pool2d"]
    assert [t.kernel for t in trans] == [(2, 2)] * 3 + [(7, 7)]  # transitions, then F.adaptive_avg_pool2d


def check_inception_v3(model, g):
    """Functional pools inside the Inception blocks are local."""
    fmax = [layer for layer in g if layer.target == "torch.nn.functional.max_pool2d"]
    favg = [layer for layer in g if layer.target == "torch.nn.functional.avg_pool2d"]
    assert len(fmax) == 2 and all((p.kernel, p.stride, p.kind) == ((3, 3), (2, 2), Kind.LOCAL) for p in fmax)
    assert len(favg) == 9
    assert all((p.kernel, p.stride, p.padding, p.count_include_pad) == ((3, 3), (1, 1), ((1, 1), (1, 1)), True)
               for p in favg)
    asym = [layer for layer in g if layer.op == "conv2d" and layer.kernel in ((1, 7), (7, 1), (1, 3), (3, 1))]
    assert asym and all(c.padding == tuple(((k // 2, k // 2)) for k in c.kernel) for c in asym)
    assert g[g.output].in_shapes == ((1000,),)


def check_squeeze_excitation(model, g):
    """The SE gate x * sigmoid(fc(pool(x))) is a merge, never a point op."""
    muls = [layer for layer in g if layer.op == "mul"]
    assert muls and all(m.kind is Kind.MERGE for m in muls)
    for m in muls:
        gate = [s for s in m.in_shapes if s[1:] == (1, 1)]
        full = [s for s in m.in_shapes if s[1:] != (1, 1)]
        assert len(gate) == 1 and len(full) == 1 and m.out_shape == full[0]
        # One operand is the gate: the (hard) sigmoid of the squeezed map.
        sources = {g[i].op for i in m.inputs}
        assert sources & {"sigmoid", "hardsigmoid"}
    assert count(g, op="mul", kind=Kind.POINT) == 0


def check_efficientnet_b0(model, g):
    """Stochastic depth is the identity in eval."""
    check_squeeze_excitation(model, g)
    sd = [layer for layer in g if layer.target == "torchvision.ops.stochastic_depth.stochastic_depth"]
    assert len(sd) == 9 and all((s.op, s.kind, s.flops) == ("dropout", Kind.POINT, 0) for s in sd)


def check_efficientnet_lite0(model, g):
    """TF-style static 'same' padding: ZeroPad2d then functional conv2d."""
    pads = [layer for layer in g if layer.op == "pad"]
    assert len(pads) == 17 and all(p.kind is Kind.LOCAL and p.pad_value == 0.0 for p in pads)
    stem = g["_conv_stem_static_padding"]  # 3x3 stride 2 on 224: TF 'SAME' pads 0 top/left, 1 bottom/right
    assert stem.padding == ((0, 1), (0, 1)) and stem.out_shape == (3, 225, 225)
    conv = g[g.consumers(stem.name)[0]]
    assert (conv.op, conv.target, conv.kind, conv.stride, conv.padding) == \
        ("conv2d", "torch.conv2d", Kind.LOCAL, (2, 2), ((0, 0), (0, 0)))
    assert conv.extra["weight"].data_ptr() == model._conv_stem.weight.data_ptr()
    assert conv.extra["bias"] is None and conv.inputs == (stem.name,)
    dw = [layer for layer in g if layer.op == "conv2d" and layer.groups > 1]
    assert len(dw) == 16 and all(c.groups == c.in_shapes[0][0] for c in dw)
    # bs = inputs.size(0); x.view(bs, -1): a shape query is not an input.
    view = g["view"]
    assert (view.op, view.kind, view.inputs) == ("flatten", Kind.GLOBAL, ("_avg_pooling",))


def check_convnext_tiny(model, g):
    """Every block runs channels-last between two permutes: depthwise 7x7 conv,
    permute, LayerNorm over C, Linear, GELU, Linear, permute back; all of it per
    pixel. Only the classifier's flatten and Linear are global."""
    assert [(layer.name, layer.op) for layer in g if layer.kind is Kind.GLOBAL] == \
        [("classifier_1", "flatten"), ("classifier_2", "linear")]
    block = [g[n] for n in ("permute_2", "features_1_0_block_2", "features_1_0_block_3",
                            "features_1_0_block_4", "features_1_0_block_5", "permute_3")]
    assert [(b.op, b.kind, b.out_shape, b.out_axes) for b in block] == [
        ("permute", Kind.POINT, (56, 56, 96), (0, 1)), ("layer_norm", Kind.POINT, (56, 56, 96), (0, 1)),
        ("linear", Kind.POINT, (56, 56, 384), (0, 1)), ("gelu", Kind.POINT, (56, 56, 384), (0, 1)),
        ("linear", Kind.POINT, (56, 56, 96), (0, 1)), ("permute", Kind.POINT, (96, 56, 56), (1, 2))]
    assert g["features_1_0_block_0"].kind is Kind.LOCAL and g["features_1_0_block_0"].groups == 96
    assert [b.input_axes(0) for b in block] == [(1, 2)] + [(0, 1)] * 5
    assert block[0].spatial_axes == (0, 1) and block[-1].spatial_axes is None  # None: channels first
    assert block[2].flops == 56 * 56 * 96 * 384 and block[0].flops == 0
    assert all(b.out_hw == (56, 56) and b.channels == b.out_shape[-1] for b in block[:-1])
    # LayerNorm2d of the stem and the downsamplings: permute -> F.layer_norm -> permute.
    norms = [layer for layer in g if layer.target == "torch.nn.functional.layer_norm"]
    assert len(norms) == 5 and all(n.kind is Kind.POINT and n.extra["normalized_shape"] == (n.out_shape[-1],)
                                   for n in norms)
    assert count(g, op="linear", kind=Kind.POINT) == 36 and count(g, op="permute", kind=Kind.POINT) == 46


def check_shufflenet_v2_x1_0(model, g):
    """Channel split (``x.chunk(2, dim=1)``) and channel shuffle (``view`` to
    (groups, C/groups, H, W), ``transpose(1, 2)``, ``view`` back) are per pixel."""
    assert [(layer.name, layer.op) for layer in g if layer.kind is Kind.GLOBAL] == \
        [("mean", "mean"), ("fc", "linear")]
    shuffle = [g[n] for n in ("view", "transpose", "contiguous", "view_1")]
    assert [(s.op, s.kind, s.out_shape, s.out_axes) for s in shuffle] == [
        ("reshape", Kind.POINT, (2, 58, 28, 28), (2, 3)), ("permute", Kind.POINT, (58, 2, 28, 28), (2, 3)),
        ("contiguous", Kind.POINT, (58, 2, 28, 28), (2, 3)), ("reshape", Kind.POINT, (116, 28, 28), (1, 2))]
    assert shuffle[0].inputs == ("cat",) and all(s.channels == 116 for s in shuffle)
    # x1, x2 = x.chunk(2, dim=1): two point layers reading the shuffled map, the halves of its channels.
    halves = [g[n] for n in g.consumers("view_1")]
    assert [(h.op, h.kind, h.out_shape, h.extra["start"]) for h in halves] == \
        [("chunk", Kind.POINT, (58, 28, 28), 0), ("chunk", Kind.POINT, (58, 28, 28), 58)]
    assert count(g, op="chunk", kind=Kind.POINT) == 26 and count(g, op="reshape", kind=Kind.POINT) == 32


# ---------------------------------------------------------------------------
# Shapes against the eager model, and local params against the functional op
# ---------------------------------------------------------------------------

def check_eager_shapes(name: str, model: nn.Module, g: CNNGraph) -> None:
    """Every module call's output shape equals the eager forward's (hooks)."""
    seen: dict[str, list] = defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, i, o, p=path: seen[p].append(tuple(o.shape[1:])))
             for path, m in model.named_modules() if path]
    size = MODELS[name][1]
    try:
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    assert g[g.output].out_shape == tuple(out.shape[1:])
    by_target: dict[str, list] = defaultdict(list)
    for layer in g:
        if g.fx_node(layer.name).op == "call_module":
            by_target[layer.target].append(layer.out_shape)
    assert by_target and all(by_target[t] == seen[t] for t in by_target)


def _functional(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """What an executor does: pad explicitly, then the op with padding 0."""
    (t, b), (l, r) = layer.padding
    if layer.op == "pad":
        return F.pad(x, (l, r, t, b), value=layer.pad_value)
    if layer.op == "avg_pool2d" and not layer.count_include_pad:
        # Padding must not count in the divisor, so it cannot be materialised.
        return F.avg_pool2d(x, layer.kernel, layer.stride, (t, l), layer.ceil_mode, False,
                            layer.extra["divisor_override"])
    xp = F.pad(x, (l, r, t, b), value=layer.pad_value)
    if layer.op == "conv2d":
        return F.conv2d(xp, layer.extra["weight"], layer.extra["bias"], layer.stride, 0,
                        layer.dilation, layer.groups)
    if layer.op == "max_pool2d":
        return F.max_pool2d(xp, layer.kernel, layer.stride, 0, layer.dilation, layer.ceil_mode)
    if layer.op == "avg_pool2d":
        return F.avg_pool2d(xp, layer.kernel, layer.stride, 0, layer.ceil_mode, True,
                            layer.extra["divisor_override"])
    raise AssertionError(f"unexpected local op {layer.op}")


class _LocalChecker(torch.fx.Interpreter):
    """Runs the traced module; at each local layer compares the module's output
    with the functional op called from the layer's stored parameters."""

    def __init__(self, g: CNNGraph):
        super().__init__(g.module)
        self.g = g
        self.checked: Counter = Counter()

    def run_node(self, n):
        layer = self.g[n.name] if n.name in self.g else None
        if layer is None or layer.kind is not Kind.LOCAL:
            return super().run_node(n)
        x = self.env[self.g.fx_node(layer.inputs[0])].clone()  # before an in-place ReLU touches it
        out = super().run_node(n)
        ref = _functional(layer, x)
        if layer.ceil_mode:  # explicit padding can allow one more window than PyTorch keeps
            ref = ref[..., : out.shape[2], : out.shape[3]]
        assert tuple(out.shape[1:]) == layer.out_shape
        assert ref.shape == out.shape, (layer.name, ref.shape, out.shape)
        if "adaptive_output_size" in layer.extra:
            torch.testing.assert_close(ref, out, rtol=1e-5, atol=1e-6, msg=layer.name)
        else:
            assert torch.equal(ref, out), (layer.name, (ref - out).abs().max())
        self.checked[layer.op] += 1
        return out


def check_locals(g: CNNGraph) -> Counter:
    checker = _LocalChecker(g)
    torch.manual_seed(1)
    with torch.no_grad():
        checker.run(torch.randn(1, *g.input_shape))
    return checker.checked


# Each architecture is built and traced once, in one test, so that pytest-xdist
# workers never trace the same model twice.
SPECIFIC = {
    "vgg16": check_vgg16, "resnet18": check_resnet18, "mobilenet_v2": check_mobilenet_v2,
    "squeezenet1_0": check_squeezenet1_0, "densenet121": check_densenet121,
    "inception_v3": check_inception_v3, "mobilenet_v3_small": check_squeeze_excitation,
    "efficientnet_b0": check_efficientnet_b0, "efficientnet_lite0": check_efficientnet_lite0,
    "convnext_tiny": check_convnext_tiny, "shufflenet_v2_x1_0": check_shufflenet_v2_x1_0,
}
EAGER_SHAPES = {"resnet18", "squeezenet1_0", "efficientnet_lite0", "convnext_tiny", "shufflenet_v2_x1_0"}
LOCALS_CHECKED = {  # local layers re-run from their params, by op
    "squeezenet1_0": {"conv2d": 26, "max_pool2d": 3, "avg_pool2d": 1},
    "mobilenet_v2": {"conv2d": 52, "avg_pool2d": 1},
    "efficientnet_lite0": {"conv2d": 49, "pad": 17, "avg_pool2d": 1},
}  # inception's functional F.max_pool2d / F.avg_pool2d are re-run in the Zoo: cheaper


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_architecture(name):
    model, g = traced(name)
    check_kinds_and_lint(name, g)
    SPECIFIC[name](model, g)
    if name in EAGER_SHAPES:
        check_eager_shapes(name, model, g)
    if name in LOCALS_CHECKED:
        assert check_locals(g) == LOCALS_CHECKED[name]


# ---------------------------------------------------------------------------
# Small models: every rule of the classification, by name
# ---------------------------------------------------------------------------

class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.same4 = nn.Conv2d(3, 4, 4, padding="same")
        self.same_dil = nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False)
        self.valid = nn.Conv2d(4, 4, (3, 1), padding="valid", stride=(2, 1))
        self.reflect_conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.pool_ceil = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg_excl = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.avg_div = nn.AvgPool2d(2, divisor_override=3)
        self.cpad = nn.ConstantPad2d((1, 0, 2, 3), 1.5)
        self.rpad = nn.ReflectionPad2d(1)
        self.lrn = nn.LocalResponseNorm(3)
        self.amax_ok = nn.AdaptiveMaxPool2d((1, 3))
        self.aavg_bad = nn.AdaptiveAvgPool2d(3)
        self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 0.5))
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3))

    def forward(self, x):
        x = self.same4(x)
        x = self.same_dil(x)
        x = F.conv2d(x, self.w, stride=1, padding=(1, 2), dilation=1, groups=2)
        x = self.valid(x)
        r = self.reflect_conv(x)
        x = self.pool_ceil(x * 2)
        x = self.avg_excl(x + self.scale)
        x = self.avg_div(x)
        y = F.max_pool2d(x, 2, 1, 1, 1, True)
        z = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        x = self.cpad(x)
        a = self.rpad(x)
        b = F.pad(x, (-1, 0, 0, 0))
        c = self.lrn(x)
        d = torch.softmax(x, dim=1)
        e = F.interpolate(x, scale_factor=2)
        f = self.amax_ok(x)
        h = torch.cat([x, x], 2)
        i, j = F.max_pool2d(x, 2, return_indices=True)
        k = self.bn_batch(x)
        m = x.view(x.size(0), -1)
        n = x.mean(1, keepdim=True)
        o = 1 - x
        p = torch.cat([x, torch.zeros(1, 2, x.shape[2], x.shape[3])], 1)
        q = x.mean((2, 3))
        s = self.aavg_bad(x)
        return (r.sum() + y.sum() + z.sum() + a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum()
                + h.sum() + i.sum() + k.sum() + m.sum() + n.sum() + o.sum() + p.sum() + q.sum()
                + s.sum()).reshape(1, 1) + x.flatten(1)[:, :1]


ZOO_TABLE = [
    # name, op, kind, kernel, stride, padding, dilation, groups, ceil_mode, count_include_pad, pad_value
    ("same4", "conv2d", "local", (4, 4), (1, 1), ((1, 2), (1, 2)), (1, 1), 1, False, True, 0.0),
    ("same_dil", "conv2d", "local", (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), 1, False, True, 0.0),
    ("conv2d", "conv2d", "local", (3, 3), (1, 1), ((1, 1), (2, 2)), (1, 1), 2, False, True, 0.0),
    ("valid", "conv2d", "local", (3, 1), (2, 1), ((0, 0), (0, 0)), (1, 1), 1, False, True, 0.0),
    ("pool_ceil", "max_pool2d", "local", (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1, True, True, float("-inf")),
    ("avg_excl", "avg_pool2d", "local", (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, False, False, 0.0),
    ("avg_div", "avg_pool2d", "local", (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), 1, False, True, 0.0),
    ("max_pool2d", "max_pool2d", "local", (2, 2), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, True, True, float("-inf")),
    ("avg_pool2d", "avg_pool2d", "local", (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1, True, False, 0.0),
    ("cpad", "pad", "local", (1, 1), (1, 1), ((2, 3), (1, 0)), (1, 1), 1, False, True, 1.5),
    ("amax_ok", "max_pool2d", "local", (7, 2), (7, 2), ((0, 0), (0, 0)), (1, 1), 1, False, True, float("-inf")),
]

ZOO_OTHERS = [
    # name, op, kind, reason
    ("reflect_conv", "conv2d", "global", "padding_mode 'reflect' is not zero padding"),
    ("mul", "mul", "point", None),
    ("add", "add", "point", None),
    ("rpad", "pad", "global", "'reflect' padding is not constant"),
    ("pad", "pad", "global", "negative padding (-1, 0, 0, 0) crops the input"),
    ("lrn", "local_response_norm", "point", None),
    ("softmax", "softmax", "point", None),
    ("interpolate", "interpolate", "global", "interpolation is not modelled as a local window"),
    ("cat", "cat", "global", "cat along dim 2 of 4D tensors (not the channels)"),
    ("getitem", "getitem", "global",
     "element of the tuple returned by torch.nn.functional.max_pool2d_with_indices"),
    ("bn_batch", "batch_norm", "global",
     "batch_norm uses the statistics of the batch (training mode or track_running_stats=False)"),
    ("view", "flatten", "global", None),
    ("mean", "mean", "point", None),
    ("sub", "sub", "point", None),
    ("cat_1", "cat", "point", None),
    ("mean_1", "mean", "global", None),
    ("aavg_bad", "adaptive_avg_pool2d", "global",
     "adaptive pooling 7x6 -> 3x3 is not one window (7x6 is not a multiple of 3x3)"),
]


@functools.lru_cache(maxsize=None)
def zoo() -> CNNGraph:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # PyTorch: 'same' with an even kernel copies the input once
        warnings.simplefilter("ignore", UserWarning)
        return trace(Zoo(), (3, 16, 16))


@pytest.mark.parametrize("row", ZOO_TABLE, ids=[r[0] for r in ZOO_TABLE])
def test_zoo_local_params(row):
    name, *expected = row
    layer = zoo()[name]
    got = [layer.op, str(layer.kind), layer.kernel, layer.stride, layer.padding, layer.dilation,
           layer.groups, layer.ceil_mode, layer.count_include_pad, layer.pad_value]
    assert got == expected


@pytest.mark.parametrize("row", ZOO_OTHERS, ids=[r[0] for r in ZOO_OTHERS])
def test_zoo_classification(row):
    name, op, kind, reason = row
    layer = zoo()[name]
    assert (layer.op, str(layer.kind), layer.reason) == (op, kind, reason)


def test_zoo_details():
    g = zoo()
    g.lint()
    assert g["avg_div"].extra["divisor_override"] == 3
    assert g["conv2d"].extra["weight"].shape == (4, 2, 3, 3) and g["conv2d"].inputs == ("same_dil",)
    # Arithmetic with constants keeps the constant and its side for an executor.
    assert g["mul"].extra == {"const": 2, "const_index": 1}
    assert g["sub"].extra == {"const": 1, "const_index": 0}
    assert torch.equal(g["add"].extra["const"], torch.full((1, 4, 1, 1), 0.5))
    # Shape queries are not inputs, and a tensor built from them is a constant.
    assert g["view"].inputs == ("cpad",)
    assert g["cat_1"].inputs == ("cpad",) and g["cat_1"].extra["operands"][1].shape == (1, 2, 7, 6)
    assert "zeros" not in g
    # A tuple result is not a layer; its elements read what the tuple read.
    assert "max_pool2d_1" not in g and g["getitem_1"].inputs == ("cpad",)
    assert g["same4"].flops == 4 * 16 * 16 * 3 * 4 * 4 and g["cpad"].flops == 0
    assert g["mean_1"].flops == 4 * 7 * 6  # a reduction: one per input element


def test_zoo_local_params_reproduce_the_module():
    assert check_locals(zoo()) == {"conv2d": 4, "max_pool2d": 3, "avg_pool2d": 3, "pad": 1}


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, 2)


class Unknowns(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.shift = Roll()
        self.up = nn.ConvTranspose2d(4, 4, 2)

    def forward(self, x):
        return self.up(self.shift(self.conv(x)).flip(2))


class _After(nn.Module):
    """A 3x3 conv to a (1, 8, 6, 10) map, then ``f``; the layer under test is ``f``'s last."""

    def __init__(self, f):
        super().__init__()
        self.conv, self.f, self.fc = nn.Conv2d(3, 8, 3, padding=1), f, nn.Linear(8, 16)

    def forward(self, x):
        return self.f(self, self.conv(x))


LAYOUTS = [
    # what, f, op, kind, out_shape, out_axes, reason
    ("channels-last", lambda m, x: x.permute(0, 2, 3, 1), "permute", "point", (6, 10, 8), (0, 1), None),
    ("and back", lambda m, x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), "permute", "point", (8, 6, 10),
     (1, 2), None),
    ("swap H and W", lambda m, x: x.transpose(2, 3), "permute", "point", (8, 10, 6), (2, 1), None),
    ("batch moves", lambda m, x: x.permute(1, 0, 2, 3), "permute", "global", (1, 6, 10), (1, 2), None),
    ("layer norm over C", lambda m, x: F.layer_norm(x.permute(0, 2, 3, 1), (8,)), "layer_norm", "point",
     (6, 10, 8), (0, 1), None),
    ("layer norm over the map", lambda m, x: F.layer_norm(x, (8, 6, 10)), "layer_norm", "global",
     (8, 6, 10), (1, 2), "layer_norm over the last 3 axes of (8, 6, 10) spans the pixels"),
    ("linear over C", lambda m, x: m.fc(x.permute(0, 2, 3, 1)), "linear", "point", (6, 10, 16), (0, 1), None),
    ("linear over W", lambda m, x: F.linear(x, torch.ones(3, 10)), "linear", "global", (8, 6, 3), (1, 2), None),
    ("channel groups", lambda m, x: x.view(x.size(0), 2, 4, 6, 10), "reshape", "point", (2, 4, 6, 10),
     (2, 3), None),
    ("mean over a group axis", lambda m, x: x.reshape(1, 2, 4, 6, 10).mean(1), "mean", "point", (4, 6, 10),
     (1, 2), None),
    ("softmax over C, channels-last", lambda m, x: x.permute(0, 2, 3, 1).softmax(-1), "softmax", "point",
     (6, 10, 8), (0, 1), None),
    ("flatten the pixels", lambda m, x: x.flatten(2), "reshape", "global", (8, 60), (), None),
    ("shape of another image tensor", lambda m, x: x.view_as(x + 1), "reshape", "global", (8, 6, 10), (1, 2),
     "reshape reads 2 image tensors"),
    ("split channels", lambda m, x: x.split([3, 5], dim=1)[1], "chunk", "point", (5, 6, 10), (1, 2), None),
    ("split rows", lambda m, x: x.chunk(2, dim=2)[0], "getitem", "global", (8, 3, 10), (1, 2),
     "element of the tuple returned by Tensor.chunk"),
    ("add across layouts", lambda m, x: x.permute(0, 2, 3, 1) + x.permute(0, 2, 3, 1).transpose(1, 2).reshape(
        1, 6, 10, 8), "add", "global", (6, 10, 8), (1, 2),
     "add of maps whose pixels lie along different axes [(0, 1), (1, 2)]"),
]


@pytest.mark.parametrize("row", LAYOUTS, ids=[r[0] for r in LAYOUTS])
def test_layouts(row):
    """Ops that only move or regroup the per-pixel values are point layers with a layout."""
    what, f, op, kind, out_shape, axes, reason = row
    g = trace(_After(f), (3, 6, 10))
    g.lint()
    last = g[g.producers(g.output)[0]]
    assert (last.op, str(last.kind), last.out_shape, last.out_axes, last.reason) == \
        (op, kind, out_shape, axes, reason)


def test_unknown_ops_are_global_with_a_reason():
    g = trace(Unknowns(), (3, 8, 8))
    g.lint()
    assert [(layer.name, layer.op, str(layer.kind), layer.reason) for layer in g][1:] == [
        ("conv", "conv2d", "local", None),
        ("roll", "unknown", "global", "not recognised: torch.roll"),
        ("flip", "unknown", "global", "not recognised: Tensor.flip"),
        ("up", "unknown", "global", "not recognised: up (ConvTranspose2d)"),
        ("output", "output", "output", None),
    ]
    assert g["roll"].flops == 4 * 6 * 6


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(y, inplace=True)  # y is now relu(y) too
        w = self.conv2(z) + y
        v = self.act(w)  # v is w
        return w.mul_(2) + v + y  # 2v + 2v + relu(y)


def test_in_place_ops_redirect_later_readers():
    g = trace(InPlace(), (3, 8, 8))
    g.lint()
    assert [(layer.name, layer.inputs) for layer in g][2:] == [
        ("relu", ("conv",)), ("conv2", ("relu",)), ("add", ("conv2", "relu")), ("act", ("add",)),
        ("mul_", ("act",)), ("add_1", ("mul_", "mul_")), ("add_2", ("add_1", "relu")),
        ("output", ("add_2",)),
    ]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class WithBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.block = nn.Sequential(nn.Identity(), Branchy())

    def forward(self, x):
        return self.block(self.stem(x))


def test_data_dependent_control_flow_names_the_module():
    with pytest.raises(PlanError) as e:
        trace(WithBranch(), (3, 8, 8))
    assert str(e.value) == ("cannot trace model: module 'block.1' (Branchy) failed: "
                            "symbolically traced variables cannot be used as inputs to control flow" + FIX_HINT)


def test_control_flow_at_top_level():
    with pytest.raises(PlanError) as e:
        trace(Branchy(), (3, 8, 8))
    assert str(e.value) == ("cannot trace model: top-level module (Branchy) failed: "
                            "symbolically traced variables cannot be used as inputs to control flow" + FIX_HINT)


def test_shape_propagation_failure_names_node_and_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(PlanError) as e:
        trace(model, (1, 8, 8))
    msg = str(e.value)
    assert msg.startswith("cannot propagate shapes through node '_0' (module '0', Conv2d) on input "
                          "(1, 1, 8, 8): ")
    assert "3 channels" in msg and "\n" not in msg


@pytest.mark.parametrize("shape", [(224, 224), (1, 1, 3, 224, 224), (3, 0, 8), (3, 8.5, 8), "abc"])
def test_input_shape_must_be_chw(shape):
    with pytest.raises(PlanError) as e:
        trace(nn.Conv2d(3, 4, 3), shape)
    assert str(e.value) == (f"input_shape must be (C, H, W) of one image or (C, D, H, W) of one volume with "
                            f"positive ints (the model gets a (1, C, H, W) or (1, C, D, H, W) batch), "
                            f"got {shape!r}")


def test_model_must_return_one_tensor():
    class Two(nn.Module):
        def forward(self, x):
            return x, x
    with pytest.raises(PlanError, match=r"^cannot plan Two: forward returns tuple; KQL needs one tensor"):
        trace(Two(), (3, 8, 8))


def test_extra_forward_arguments_use_their_defaults():
    class Scaled(nn.Module):
        def forward(self, x, scale=None):
            return x if scale is None else x * scale
    g = trace(Scaled(), (3, 8, 8))
    assert [layer.op for layer in g] == ["input", "output"]


# ---------------------------------------------------------------------------
# The CNNGraph API and lint()
# ---------------------------------------------------------------------------

def test_graph_api():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    g = trace(model, (3, 8, 8))
    assert model.training is False
    names = [layer.name for layer in g]
    assert names == ["input_1", "_0", "_1", "_2", "_3", "_4", "output"] == list(g.dag.nodes)
    assert len(g) == 7 and g.layers() == list(g) and "_1" in g and "nope" not in g
    assert (g.input, g.output, g.input_shape) == ("input_1", "output", (3, 8, 8))
    assert g.dag.nodes["_0"]["layer"] is g["_0"] and list(g.dag.edges) == list(zip(names, names[1:]))
    assert g.consumers("_0") == ["_1"] and g.producers("_1") == ["_0"] and g.consumers("output") == []
    assert g.fx_node("_0").target == "0" and g["_0"].target == "0"
    assert g.total_flops == 8 * 64 * 27 + 8 * 64 + 8 * 16 * 4 + 128 * 10
    assert [str(layer.kind) for layer in g] == ["input", "local", "point", "local", "global", "global", "output"]
    assert repr(g) == "CNNGraph(Sequential, 7 layers, input 3x8x8, 1.61e-05 GFLOPs)"
    with pytest.raises(KeyError, match="no layer named 'conv'"):
        g["conv"]
    with pytest.raises(KeyError, match="no fx node named 'conv'"):
        g.fx_node("conv")


def _tiny() -> CNNGraph:
    return trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (3, 8, 8))


def _rebuild(g: CNNGraph, name: str, **changes) -> CNNGraph:
    layers = [dataclasses.replace(layer, **changes) if layer.name == name else layer for layer in g]
    return CNNGraph(g.module, layers, g.input_shape)


def test_lint_reports_shape_mismatch():
    g = _rebuild(_tiny(), "_1", in_shapes=((4, 5, 5),))
    with pytest.raises(AssertionError) as e:
        g.lint()
    assert str(e.value) == ("layer '_1' (relu) input 0 '_0' produces shape (4, 6, 6) "
                            "but the layer expects (4, 5, 5)")


def test_lint_reports_unknown_input_and_cycle():
    with pytest.raises(AssertionError, match=r"^layer '_1' \(relu\) input 0 'ghost' is not a layer"):
        _rebuild(_tiny(), "_1", inputs=("ghost",)).lint()
    with pytest.raises(AssertionError, match=r"^the graph has a cycle"):
        _rebuild(_tiny(), "_0", inputs=("_1",), in_shapes=((4, 6, 6),)).lint()


def test_lint_reports_local_params_that_do_not_give_the_shape():
    with pytest.raises(AssertionError) as e:
        _rebuild(_tiny(), "_0", padding=((1, 1), (1, 1))).lint()
    assert str(e.value) == ("layer '_0' (conv2d): kernel (3, 3) stride (1, 1) padding ((1, 1), (1, 1)) "
                            "dilation (1, 1) ceil_mode False on (8, 8) give (8, 8), the model produced (6, 6)")


def test_lint_reports_duplicate_names():
    g = _tiny()
    layers = list(g)
    layers.insert(2, dataclasses.replace(layers[1]))
    with pytest.raises(AssertionError, match=r"^layer names are not unique: \['_0'\]"):
        CNNGraph(g.module, layers, g.input_shape).lint()
