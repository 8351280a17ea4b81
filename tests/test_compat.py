"""The drop-ins against the real packages: ``kql.compat.captum.Occlusion`` vs
``captum.attr.Occlusion`` and ``kql.compat.monai.OcclusionSensitivity`` vs
``monai.visualize.OcclusionSensitivity``, on six architectures (plain,
residual, dense, depthwise, squeeze-and-excitation, fire modules), batches of
1 and 3, every baseline kind, strides that do and do not divide the image.
The bar: max |difference| <= 1e-5 relative to the output scale (:func:`close`).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

captum_attr = pytest.importorskip("captum.attr")
monai_visualize = pytest.importorskip("monai.visualize")

from kql.compat.captum import Occlusion  # noqa: E402
from kql.compat.monai import OcclusionSensitivity  # noqa: E402

TOL = 1e-5


def _plain():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


ARCHS = {
    "plain": _plain,
    "resnet18": lambda: tvm.resnet18(num_classes=10),                                  # residual
    "densenet": lambda: tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                     bn_size=2, num_classes=10),                          # dense
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10, width_mult=0.5),           # depthwise
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),               # SE, hardswish
    "squeezenet1_1": lambda: tvm.squeezenet1_1(num_classes=10),                         # fire modules
}

_NETS: dict = {}


def net(name: str) -> nn.Module:
    """The architecture with weights and batch-norm statistics drawn so that
    occluding a patch visibly moves every output (torchvision's init leaves
    some of these nets' outputs almost constant)."""
    if name not in _NETS:
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        m = ARCHS[name]()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    fan_in = mod.weight[0].numel()
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                    if mod.bias is not None:
                        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                elif isinstance(mod, nn.BatchNorm2d):
                    n = mod.num_features
                    mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    # mobilenet_v2's depth amplifies wide batch-norm gains (and float rounding)
                    # into logits of 1e2; the other nets need them for their maps not to be flat
                    narrow = name == "mobilenet_v2"
                    mod.running_var.copy_(torch.rand(n, generator=g) * (0.5 if narrow else 1.0)
                                          + (0.75 if narrow else 0.5))
                    mod.weight.copy_(torch.rand(n, generator=g) * (0.5 if narrow else 1.0) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
        _NETS[name] = m.eval()
    return _NETS[name]


def inputs(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def close(got: torch.Tensor, ref: torch.Tensor, output: torch.Tensor) -> float:
    """max |got - ref| relative to the output scale: the larger of the
    reference map's and of the scores the map is made of (``output``, the
    forward function's on the unoccluded inputs). Exact mode recomputes
    each layer on windows, so its floats round differently from a full
    forward pass; deep random nets amplify that rounding like any other
    input change, in proportion to their outputs."""
    assert tuple(got.shape) == tuple(ref.shape)
    assert float(ref.abs().max()) > 1e-3, "the reference map is flat: the test would compare nothing"
    scale = max(float(ref.abs().max()), float(output.abs().max()))
    return float((got - ref).abs().max()) / scale


def forward(fn, x, *args) -> torch.Tensor:
    with torch.no_grad():
        return fn(x, *args)


def top(fn, x):
    """The predicted class of each input: a target whose score is not 0 (ReLU'd outputs)."""
    cls = forward(fn, x).argmax(1).tolist()
    return cls[0] if len(cls) == 1 else cls


# (N, baseline kind, window, stride): every baseline kind, N = 1 and 3, strides
# that divide 32 - window and strides that do not (the last windows are clipped).
CASES = [
    (1, "scalar", 8, 4),
    (3, "channel", 8, 5),
    (3, "tensor", 6, 3),
    (1, "tensor", 7, 7),
]


def _baseline(kind: str, x: torch.Tensor):
    if kind == "scalar":
        return 0.5
    if kind == "channel":
        return torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("n, kind, window, stride", CASES)
def test_captum_parity(arch, n, kind, window, stride):
    model = net(arch)
    x = inputs(n)
    baseline = _baseline(kind, x)
    target = top(model, x)
    ref = captum_attr.Occlusion(model).attribute(x, (3, window, window), strides=stride, baselines=baseline,
                                                 target=target, perturbations_per_eval=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the incremental path: no fallback warning
        got = Occlusion(model).attribute(x, (3, window, window), strides=stride, baselines=baseline,
                                         target=target)
    assert close(got, ref, forward(model, x)) <= TOL


def test_captum_probabilities_of_a_function_around_the_model():
    model = net("resnet18")
    x = inputs(3)
    fn = lambda inp: torch.softmax(model(inp), dim=1)  # noqa: E731
    ref = captum_attr.Occlusion(fn).attribute(x, (3, 8, 8), strides=(3, 6, 5), target=torch.tensor([0, 5, 9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Occlusion(fn).attribute(x, (3, 8, 8), strides=(3, 6, 5), target=torch.tensor([0, 5, 9]))
    assert close(got, ref, forward(fn, x)) <= TOL


def test_captum_non_tensor_additional_forward_args():
    model = net("plain")
    x = inputs(1)
    fn = lambda inp, scale: model(inp) * scale  # noqa: E731
    ref = captum_attr.Occlusion(fn).attribute(x, (3, 6, 6), strides=5, target=2, additional_forward_args=3.0)
    got = Occlusion(fn).attribute(x, (3, 6, 6), strides=5, target=2, additional_forward_args=3.0)
    assert close(got, ref, forward(fn, x, 3.0)) <= TOL


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out if float(x.mean()) > -100 else -out


@pytest.mark.parametrize("why, model, window", [
    ("does not span all 3 channels", lambda: net("plain"), (1, 6, 6)),
    ("cannot trace", lambda: _Untraceable(net("plain")).eval(), (3, 6, 6)),
])
def test_captum_fallback_warns_once_and_still_matches(why, model, window):
    m = model()
    x = inputs(3, 20)
    baseline = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    ref = captum_attr.Occlusion(m).attribute(x, window, strides=(1, 4, 5), target=[0, 1, 2],
                                             baselines=baseline)
    with pytest.warns(UserWarning) as record:
        got = Occlusion(m).attribute(x, window, strides=(1, 4, 5), target=[0, 1, 2], baselines=baseline)
    mine = [r for r in record if "kql.compat.captum" in str(r.message)]
    assert len(mine) == 1 and why in str(mine[0].message) and "batched naive" in str(mine[0].message)
    assert close(got, ref, forward(m, x)) <= TOL


def test_float64_models_in_both_drop_ins():
    """Captum and MONAI run a float64 model as it is; the engine computes in
    float32: Captum's drop-in falls back to batched naive (warned, Captum's
    own computation), MONAI's runs a float32 copy (warned). Both equal the
    packages; the user's model stays float64."""
    m = copy.deepcopy(net("plain")).double()
    x = inputs(3, 20).double()
    ref = captum_attr.Occlusion(m).attribute(x, (3, 6, 6), strides=(3, 4, 5), target=[0, 1, 2])
    with pytest.warns(UserWarning, match="the input is torch.float64 .* batched naive"):
        got = Occlusion(m).attribute(x, (3, 6, 6), strides=(3, 4, 5), target=[0, 1, 2])
    assert close(got, ref, forward(m, x)) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_map, _ = monai_visualize.OcclusionSensitivity(m, mask_size=8, n_batch=16, verbose=False)(x[:1])
    with pytest.warns(UserWarning, match="float64 weights.*float32 copy"):
        got_map, _ = OcclusionSensitivity(m, mask_size=8, n_batch=16, verbose=False)(x[:1])
    assert close(got_map, ref_map.as_tensor().to(got_map.dtype), forward(m, x[:1]).softmax(1)) <= TOL
    assert {p.dtype for p in m.parameters()} == {torch.float64}


@pytest.mark.parametrize("call, error, text", [
    (lambda o, x: o.attribute(x, (3, 40, 4), strides=2, target=1), ValueError, "cannot exceed input"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=5, target=1), ValueError, "cannot be larger"),
    (lambda o, x: o.attribute(x, (4, 4), strides=2, target=1), ValueError, "should be a tuple of 3"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=(2, 2), target=1), ValueError, "invalid for input"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=2, target=12), ValueError, "out of range"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=2, target=[1, 2]), ValueError, "does not match"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=2, target=1, baselines="gray"), TypeError, "baseline"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=2, target=1, baselines=torch.zeros(5, 3)), ValueError,
     "does not broadcast"),
    (lambda o, x: o.attribute(x, (3, 4, 4), strides=2), ValueError, "one value per example"),
    (lambda o, x: o.attribute(x.numpy(), (3, 4, 4), strides=2, target=1), TypeError, "tensor"),
])
def test_captum_bad_input_is_a_clear_error(call, error, text):
    with pytest.raises(error, match=text):
        call(Occlusion(net("plain")), inputs(3, 16))


def test_captum_drop_in_runs_no_forward_pass_of_its_own():
    """The engine's unoccluded forward (its reference and materialization)
    is the only full-size pass: the drop-in checks the target on it instead
    of running the model once more.
    The first call also traces the model (shape propagation: one more pass,
    once per model and input shape)."""
    m, x = _plain().eval(), inputs(1, 16)
    full = []
    m[0].register_forward_hook(lambda mod, inp, out: full.append(tuple(inp[0].shape) == (1, 3, 16, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Occlusion(m).attribute(x, (3, 4, 4), strides=2, target=1)
        full.clear()
        Occlusion(m).attribute(x, (3, 4, 4), strides=2, target=1)
    assert sum(full) == 1


@pytest.mark.parametrize("target", [-1, -10, torch.tensor([-3])])
def test_captum_negative_targets_count_from_the_last_class(target):
    m, x = net("plain"), inputs(3, 16)
    ref = captum_attr.Occlusion(m).attribute(x, (3, 4, 4), strides=3, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the incremental path
        got = Occlusion(m).attribute(x, (3, 4, 4), strides=3, target=target)
    assert close(got, ref, forward(m, x)) <= TOL


@pytest.mark.parametrize("target", [[-1, 3, 2], torch.tensor([-2, 0, 9]), torch.tensor([1, 10, 2]), -11])
def test_captum_targets_out_of_range_are_a_value_error(target):
    """Captum indexes negative ints from the end but fails inside torch.gather
    (RuntimeError) on negative lists and tensors; here each is a ValueError."""
    with pytest.raises(ValueError, match="out of range"):
        Occlusion(net("plain")).attribute(inputs(3, 16), (3, 4, 4), strides=3, target=target)


class _Shaped(nn.Module):
    """The plain net's ten outputs, reshaped: ``(N, 10, 1)``, ``(N, 5, 2)`` or ``(N, 1)`` (their sum)."""

    def __init__(self, shape):
        super().__init__()
        self.body, self.shape = net("plain"), shape

    def forward(self, x):
        out = self.body(x)
        return out.sum(1, keepdim=True) if self.shape == (1,) else out.reshape(x.shape[0], *self.shape)


@pytest.mark.parametrize("shape, target", [((10, 1), 4), ((1,), None)])
def test_captum_outputs_captum_accepts_are_accepted(shape, target):
    m, x = _Shaped(shape).eval(), inputs(3, 16)
    ref = captum_attr.Occlusion(m).attribute(x, (3, 4, 4), strides=3, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Occlusion(m).attribute(x, (3, 4, 4), strides=3, target=target)
    assert close(got, ref, forward(m, x)) <= TOL


@pytest.mark.parametrize("shape, target, text", [
    ((5, 2), 1, "one value per example"),        # output[:, 1] is (N, 2)
    ((10, 1), [1, 2, 3], "must be 2D"),           # a list selects from a 2-D output only
    ((10, 1), None, "one value per example"),
])
def test_captum_several_values_per_example_are_refused(shape, target, text):
    """Captum 0.9 gives such outputs an attribution per output value, shaped
    (N x values, C, H, W); the drop-in computes one map per example and says so."""
    m, x = _Shaped(shape).eval(), inputs(3, 16)
    with pytest.raises(ValueError, match=text):
        Occlusion(m).attribute(x, (3, 4, 4), strides=3, target=target)


# -- MONAI --------------------------------------------------------------------------------
MONAI_CASES = [
    dict(mode="gaussian"),                                            # MONAI's default: overlap 0.6
    dict(mode="mean_img", overlap=0.5, mask_size=(7, 5)),              # steps 3 and 2, last windows shifted
    dict(mode=0.25, overlap=0.0, activate=False),                     # raw logits
    dict(mode="mean_patch", overlap=0.3, b_box=[4, 20, -1, 25]),      # a bounding box
    dict(mode=0.5, b_box=[1, 0, -1, 25]),     # a max of 0 ends the windows at row 3: zeros below, as MONAI
]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", range(len(MONAI_CASES)))
def test_monai_parity(arch, case):
    options = dict(MONAI_CASES[case])
    b_box = options.pop("b_box", None)
    options.setdefault("mask_size", 8)
    model = net(arch)
    x = inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation warnings
        ref_map, ref_cls = monai_visualize.OcclusionSensitivity(model, n_batch=16, verbose=False,
                                                                **options)(x, b_box=b_box)
    got_map, got_cls = OcclusionSensitivity(model, n_batch=16, verbose=False, **options)(x, b_box=b_box)
    out = forward(model, x)
    scores = out if options.get("activate") is False else out.softmax(1)
    assert close(got_map, ref_map.as_tensor(), scores) <= TOL
    agree = (got_cls == ref_cls.as_tensor()).float().mean()
    assert agree > 0.99  # argmax of maps equal to 1e-5; ties between classes could differ


def test_monai_activate_callable_and_module_kwargs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net("plain")

        def forward(self, x, scale: float = 1.0):
            return self.inner(x) * scale

    model = Scaled().eval()
    x = inputs(1, 24)
    options = dict(mask_size=6, mode="mean_img", overlap=0.5, activate=lambda out: out.sigmoid())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = monai_visualize.OcclusionSensitivity(model, verbose=False, **options)(x, scale=0.5)
    got, _ = OcclusionSensitivity(model, verbose=False, **options)(x, scale=0.5)
    assert close(got, ref.as_tensor(), forward(model, x, 0.5).sigmoid()) <= TOL


@pytest.mark.parametrize("x, kwargs, error, text", [
    (torch.zeros(2, 3, 16, 16), {}, ValueError, "batch size of 1"),
    (torch.zeros(1, 3, 16, 16), dict(mask_size=20), ValueError, "should be bigger than mask"),
    (torch.zeros(1, 3, 16, 16), dict(overlap=1.0), ValueError, "overlap"),
    (torch.zeros(1, 3, 16, 16), dict(mask_size=(4, 4, 4)), ValueError, "mask_size"),
    (torch.zeros(1, 3, 8, 8, 8, 8), {}, ValueError, "an image .* or a volume"),
    (torch.zeros(1, 3, 16, 16).numpy(), {}, TypeError, "Tensor"),
])
def test_monai_bad_input_is_a_clear_error(x, kwargs, error, text):
    with pytest.raises(error, match=text):
        OcclusionSensitivity(net("plain"), verbose=False, **kwargs)(x)


def test_monai_unknown_mode_is_monais_error():
    with pytest.raises(NotImplementedError):
        OcclusionSensitivity(net("plain"), mode="blur")
