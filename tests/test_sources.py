"""Tests for kql.sources: images, models, weights files, labels, preprocessing, fill values.

Error messages are asserted by exact text. Only small models are built
(efficientnet_lite0 once, resnet18, a few tiny modules); nothing is downloaded.
"""
from __future__ import annotations

import datetime
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from kql import sources
from kql.ast import Color, Label
from kql.errors import PlanError
from kql.sources import ModelSpec
from kql.sources.labels import imagenet_labels


@pytest.fixture(scope="module")
def lite0():
    return sources.load_model("efficientnet_lite0")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path so error messages show short relative paths."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_spec(name="vgg16", classes=1000, names=True, channels=3, mean=None, std=None, input_size=(224, 224)):
    """A spec with a dummy module, for label/preprocess/fill tests that need no real model."""
    class_names, aliases = (imagenet_labels(classes) if names else (None, None))
    return ModelSpec(name=name, module=nn.Identity(), input_size=input_size,
                     mean=mean or (0.0,) * channels, std=std or (1.0,) * channels, channels=channels,
                     class_names=class_names, weights="test", warning=None, num_classes=classes,
                     aliases=aliases)


def raises(exc_type, text):
    """pytest.raises matching the whole message exactly."""
    return pytest.raises(exc_type, match="^" + __import__("re").escape(text) + "$")


# ---------------------------------------------------------------------------
# sample images
# ---------------------------------------------------------------------------

def test_sample_images_are_bundled_photos():
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "retina",
                 "immunohistochemistry"):
        assert name in sources.SAMPLE_IMAGES
    for name, sample in sources.SAMPLE_IMAGES.items():
        assert os.path.isfile(sample.file), name
        assert sample.description
    assert "logo" not in sources.SAMPLE_IMAGES  # synthetic images are not listed


@pytest.mark.parametrize("name,shape", [("coffee", (400, 600, 3)), ("camera", (512, 512, 3)),
                                        ("Chelsea", (300, 451, 3))])
def test_load_sample(name, shape):
    img = sources.load_sample(name)
    assert img.shape == shape and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_load_sample_unknown():
    with raises(PlanError, "unknown sample image 'cofee'; did you mean 'coffee'? (SHOW IMAGES lists them)"):
        sources.load_sample("cofee")
    with raises(PlanError, "unknown sample image 'zzzz' (SHOW IMAGES lists them)"):
        sources.load_sample("zzzz")


# ---------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------

def test_load_image_file_errors(in_tmp):
    with raises(PlanError, "image file not found: 'x.png'"):
        sources.load_image("x.png")
    Path("x.png").write_bytes(b"\x89PNG but not really" * 10)
    with raises(PlanError, "cannot read image 'x.png': not a valid image file"):
        sources.load_image("x.png")
    Path("empty.png").write_bytes(b"")
    with raises(PlanError, "cannot read image 'empty.png': not a valid image file"):
        sources.load_image(Path("empty.png"))
    Path("d.png").mkdir()
    with raises(PlanError, "cannot read image 'd.png': it is a directory, not an image file"):
        sources.load_image("d.png")


def test_load_image_truncated_file(in_tmp):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save("full.jpg")
    data = Path("full.jpg").read_bytes()
    Path("cut.jpg").write_bytes(data[: len(data) // 2])
    with raises(PlanError, "cannot read image 'cut.jpg': not a valid image file"):
        sources.load_image("cut.jpg")


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("RGB", ".png"), ("RGBA", ".png"), ("RGB", ".jpg"),
                                      ("P", ".gif"), ("I;16", ".png"), ("1", ".bmp"), ("LA", ".png"),
                                      ("CMYK", ".tif")])
def test_load_image_file_modes(in_tmp, mode, ext):
    rgb = Image.fromarray(np.full((5, 7, 3), 200, np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((5, 7), 40000, np.uint16))
    img.save("img" + ext)
    out = sources.load_image("img" + ext)
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    if mode in ("RGB", "RGBA", "L", "LA") and ext == ".png":
        np.testing.assert_allclose(out, 200 / 255, atol=1e-6)
    if mode == "I;16":
        np.testing.assert_allclose(out, 40000 / 65535, atol=1e-6)


def test_load_image_applies_exif_orientation(in_tmp):
    img = Image.fromarray(np.zeros((4, 10, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save("rot.jpg", exif=exif)
    assert sources.load_image("rot.jpg").shape == (10, 4, 3)


def test_load_image_arrays():
    gray = np.array([[0, 255], [51, 102]], np.uint8)
    out = sources.load_image(gray)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], gray / 255, atol=1e-7)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

    np.testing.assert_allclose(sources.load_image(gray[:, :, None]), out)
    np.testing.assert_allclose(sources.load_image(np.full((2, 3, 3), 65535, np.uint16)), 1.0)
    np.testing.assert_allclose(sources.load_image(np.ones((2, 3), bool)), 1.0)
    f = np.random.default_rng(0).random((4, 5, 3))
    np.testing.assert_allclose(sources.load_image(f), f.astype(np.float32))
    assert sources.load_image(f) is not f


def test_load_image_rgba_over_white():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (0, 0, 0, 0)          # fully transparent -> white
    out = sources.load_image(rgba)
    np.testing.assert_allclose(out[0, 0], (1, 0, 0))
    np.testing.assert_allclose(out[0, 1], (1, 1, 1))


def test_load_image_array_errors():
    with raises(PlanError, "unsupported image shape (2, 3, 5) for array: expected HxW, HxWx1, HxWx3 or HxWx4"):
        sources.load_image(np.zeros((2, 3, 5)))
    with raises(PlanError, "unsupported image shape (3, 8, 8) for array: expected HxW, HxWx1, HxWx3 or "
                           "HxWx4; it looks channel-first: use a.transpose(1, 2, 0)"):
        sources.load_image(np.zeros((3, 8, 8)))
    with raises(PlanError, "unsupported image shape (4) for array: expected HxW, HxWx1, HxWx3 or HxWx4"):
        sources.load_image(np.zeros(4))
    with raises(PlanError, "array is empty: shape (0, 5, 3) has no pixels"):
        sources.load_image(np.zeros((0, 5, 3)))
    with raises(PlanError, "array is empty: shape (4, 0) has no pixels"):
        sources.load_image(np.zeros((4, 0)))
    with raises(PlanError, "array has float values from 0 to 255; float images must be in [0, 1] "
                           "(divide 0-255 data by 255, or pass it as uint8)"):
        sources.load_image(np.array([[0.0, 255.0]]))
    with raises(PlanError, "array contains NaN or infinite values"):
        sources.load_image(np.array([[0.0, np.nan]]))
    with raises(PlanError, "unsupported image dtype int64 for array: use uint8 (0-255), uint16 (0-65535), "
                           "float (0-1) or bool"):
        sources.load_image(np.zeros((2, 2), np.int64))
    with raises(PlanError, "cannot use a list as an image: pass a file path, a numpy array, a PIL image "
                           "or a torch tensor"):
        sources.load_image([[0, 1]])


def test_load_image_pil():
    img = Image.fromarray(np.full((3, 4, 3), 255, np.uint8))
    np.testing.assert_allclose(sources.load_image(img), 1.0)
    assert sources.load_image(img.convert("L")).shape == (3, 4, 3)
    assert sources.load_image(img.convert("P")).shape == (3, 4, 3)


def test_load_image_tensors():
    chw = torch.rand(3, 6, 8)
    hwc = chw.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(sources.load_image(chw), hwc)                          # CxHxW
    np.testing.assert_allclose(sources.load_image(chw[None]), hwc)                    # 1xCxHxW
    np.testing.assert_allclose(sources.load_image(torch.from_numpy(hwc.copy())), hwc)  # HxWxC
    np.testing.assert_allclose(sources.load_image(chw.half()), hwc, atol=1e-3)
    gray = sources.load_image(torch.rand(5, 7, requires_grad=True))
    assert gray.shape == (5, 7, 3)
    u8 = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    np.testing.assert_allclose(sources.load_image(u8), 1.0)
    # The rule: a first dimension of 1, 3 or 4 means channel-first.
    cube = torch.zeros(3, 3, 3)
    cube[0] = 1.0
    np.testing.assert_allclose(sources.load_image(cube)[..., 0], 1.0)
    with raises(PlanError, "unsupported image tensor shape (2, 3, 4, 5): expected HxW, CxHxW, HxWxC or "
                           "1xCxHxW with C = 1, 3 or 4"):
        sources.load_image(torch.zeros(2, 3, 4, 5))


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

def test_list_models():
    names = sources.list_models()
    assert names == sorted(names)
    assert "efficientnet_lite0" in names
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert len(names) == len(set(names))


def test_efficientnet_lite0_predicts_espresso(lite0):
    assert lite0.name == "efficientnet_lite0"
    assert lite0.input_size == (224, 224)
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert lite0.channels == 3 and lite0.num_classes == 1000 and lite0.warning is None
    assert lite0.class_names[967] == "espresso"
    assert not lite0.module.training
    x, display = sources.preprocess(sources.load_sample("coffee"), lite0)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    with torch.no_grad():
        p = lite0.module(x[None]).softmax(1)[0]
    assert int(p.argmax()) == 967
    assert float(p[967]) == pytest.approx(0.908, abs=0.02)


def test_efficientnet_lite0_copies_are_independent(lite0):
    again = sources.load_model("EfficientNet-Lite0")
    assert again.module is not lite0.module
    with torch.no_grad():
        again.module._fc.weight.zero_()
    third = sources.load_model("efficientnet_lite0")
    assert torch.equal(third.module._fc.weight, lite0.module._fc.weight)
    assert float(third.module._fc.weight.detach().abs().sum()) > 0


def test_unknown_model():
    with raises(PlanError, "unknown model 'vgg17'; did you mean 'vgg16'? (SHOW MODELS lists them)"):
        sources.load_model("vgg17")
    with raises(PlanError, "unknown model 'qqq' (SHOW MODELS lists them)"):
        sources.load_model("qqq")


def test_torchvision_random_weights():
    spec = sources.load_model("ResNet18")
    assert spec.name == "resnet18" and spec.input_size == (224, 224)
    assert spec.mean == sources.IMAGENET_MEAN and spec.std == sources.IMAGENET_STD
    assert spec.class_names[281] == "tabby cat" and spec.num_classes == 1000
    assert spec.weights == "random (no weights given)"
    assert spec.warning == ("no weights given for resnet18: using random weights, so the heatmap is not "
                            "meaningful (WEIGHTS '<file>.pth' loads a torchvision state dict)")
    assert not spec.module.training


def test_inception_v3_input_size():
    spec = sources.load_model("inception_v3")
    assert spec.input_size == (299, 299)
    assert spec.module.AuxLogits is None   # training-only head dropped
    with torch.no_grad():
        assert spec.module(torch.zeros(1, 3, 299, 299)).shape == (1, 1000)


@pytest.fixture(scope="module")
def resnet10(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("w") / "r10.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_state_dict_round_trip(resnet10, tmp_path, wrap):
    model, path = resnet10
    if wrap != "plain":
        state = model.state_dict()
        if wrap == "module_prefix":
            obj = {"module." + k: v for k, v in state.items()}
        else:
            obj = {wrap: state, "epoch": 3}
        path = tmp_path / "wrapped.pth"
        torch.save(obj, path)
    spec = sources.load_model("resnet18", weights=str(path))
    assert spec.num_classes == 10 and spec.class_names is None and spec.warning is None
    assert spec.weights == f"state dict '{path}'"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), model(x))


def test_state_dict_with_1000_classes_keeps_names(tmp_path):
    path = tmp_path / "r.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    spec = sources.load_model("resnet18", weights=path)
    assert spec.num_classes == 1000 and spec.class_names[967] == "espresso"


def test_weights_errors(in_tmp, resnet10):
    with raises(PlanError, "weights file not found: 'w.pth'"):
        sources.load_model("resnet18", weights="w.pth")
    not_torch = "cannot read weights 'w.pth': not a PyTorch file (write it with torch.save)"
    for content in (b"", b"hello world\n", os.urandom(512)):
        Path("w.pth").write_bytes(content)
        with raises(PlanError, not_torch):
            sources.load_model("resnet18", weights="w.pth")
    os.remove("w.pth")
    with zipfile.ZipFile("w.pth", "w") as z:
        z.writestr("a.txt", "x")
    with raises(PlanError, not_torch):
        sources.load_model("resnet18", weights="w.pth")
    torch.save([1, 2, 3], "w.pth")
    with raises(PlanError, "weights 'w.pth' hold a list, not a state dict (save model.state_dict() with "
                           "torch.save)"):
        sources.load_model("resnet18", weights="w.pth")
    torch.save(resnet10[0], "w.pth")
    with raises(PlanError, "weights 'w.pth' hold pickled code (torchvision.models.resnet.ResNet); loading "
                           "them would run code from the file. Save a state dict instead "
                           "(torch.save(model.state_dict(), ...)), or use LOAD MODEL 'w.pth' AS <name> "
                           "TRUSTED if you trust it"):
        sources.load_model("resnet18", weights="w.pth")


def test_weights_that_do_not_fit(in_tmp, resnet10):
    state = dict(resnet10[0].state_dict())
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean"):
        del state[key]
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(10, 256)
    torch.save(state, "w.pth")
    with raises(PlanError, "weights 'w.pth' do not fit resnet18: missing keys conv1.weight, bn1.weight, "
                           "bn1.bias (+1 more); unexpected keys extra.weight; shape mismatch for fc.weight: "
                           "file (10, 256) vs model (10, 512)"):
        sources.load_model("resnet18", weights="w.pth")
    # A state dict for another architecture.
    torch.save(nn.Linear(3, 4).state_dict(), "lin.pth")
    with raises(PlanError, "weights 'lin.pth' do not fit resnet18: missing keys conv1.weight, bn1.weight, "
                           "bn1.bias (+99 more); unexpected keys weight, bias"):
        sources.load_model("resnet18", weights="lin.pth")


def test_efficientnet_lite0_with_weights_file(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    torch.save({"model": lite0.module.state_dict()}, path)
    spec = sources.load_model("efficientnet_lite0", weights=path)
    assert spec.num_classes == 1000 and spec.class_names[967] == "espresso"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), lite0.module(x))


def test_googlenet_weights_without_aux_heads(tmp_path):
    model = torchvision.models.googlenet(num_classes=5, aux_logits=False, init_weights=False).eval()
    torch.save(model.state_dict(), tmp_path / "g.pth")
    spec = sources.load_model("googlenet", weights=tmp_path / "g.pth")
    assert spec.num_classes == 5 and spec.module.aux1 is None
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)   # torchvision's transform_input
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), model(x))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(in_tmp):
    torch.jit.save(torch.jit.script(tiny()), "ts.pt")
    with raises(PlanError, "cannot read model 'ts.pt': it is a TorchScript archive (torch.jit.save); KQL needs "
                           "an eager model: save torch.save(model.state_dict(), ...) and load it with "
                           "ARCHITECTURE <name>"):
        sources.load_model_file("ts.pt", trusted=True)


def test_missing_num_batches_tracked_is_fine(tmp_path, resnet10):
    state = {k: v for k, v in resnet10[0].state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    assert sources.load_model("resnet18", weights=tmp_path / "old.pth").num_classes == 10


# ---------------------------------------------------------------------------
# load_model_file
# ---------------------------------------------------------------------------

def test_load_model_file_state_dict(in_tmp, resnet10):
    torch.save(resnet10[0].state_dict(), "m.pt")
    with raises(PlanError, "'m.pt' holds a state dict, not a model: add ARCHITECTURE <name> to say which "
                           "architecture it is for (SHOW MODELS lists them)"):
        sources.load_model_file("m.pt")
    spec = sources.load_model_file("m.pt", architecture="resnet18", name="mine")
    assert spec.name == "mine" and spec.num_classes == 10


def test_load_model_file_pickled_module(in_tmp):
    model = torchvision.models.resnet18(num_classes=7)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(model, "m.pt")
    with raises(PlanError, "'m.pt' holds a pickled module; loading it would run code from the file. Add "
                           "TRUSTED if you trust it, or save a state dict and load it with ARCHITECTURE <name>"):
        sources.load_model_file("m.pt")
    spec = sources.load_model_file("m.pt", trusted=True)
    assert isinstance(spec.module, torchvision.models.ResNet) and not spec.module.training
    assert spec.name == "m" and spec.channels == 1 and spec.input_size is None
    assert spec.mean == (0.0,) and spec.std == (1.0,)
    assert spec.class_names is None and spec.num_classes == 7
    assert spec.weights == "pickled module 'm.pt' (TRUSTED)"


def test_load_model_file_errors(in_tmp):
    with raises(PlanError, "model file not found: 'nope.pt'"):
        sources.load_model_file("nope.pt")
    Path("t.pt").write_text("not torch")
    with raises(PlanError, "cannot read model 't.pt': not a PyTorch file (write it with torch.save)"):
        sources.load_model_file("t.pt")
    torch.save([1, 2], "l.pt")
    with raises(PlanError, "'l.pt' holds a list, not a torch.nn.Module (save the model with "
                           "torch.save(model, ...), or its state dict and load it with ARCHITECTURE <name>)"):
        sources.load_model_file("l.pt")
    torch.save(datetime.date(2020, 1, 1), "d.pt")
    with raises(PlanError, "'d.pt' holds a date, not a torch.nn.Module (save the model with "
                           "torch.save(model, ...), or its state dict and load it with ARCHITECTURE <name>)"):
        sources.load_model_file("d.pt", trusted=True)


def test_load_model_file_class_not_importable(in_tmp, monkeypatch):
    mod = types.ModuleType("kql_vanished_module")

    class Net(nn.Module):
        def forward(self, x):
            return x
    Net.__module__ = mod.__name__
    Net.__qualname__ = "Net"
    mod.Net = Net
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save(Net(), "gone.pt")
    monkeypatch.delitem(sys.modules, mod.__name__)
    with raises(PlanError, "cannot load 'gone.pt': it needs kql_vanished_module.Net, which cannot be imported "
                           "here (No module named 'kql_vanished_module'); import the module that defines it "
                           "first, or save a state dict and load it with ARCHITECTURE <name>"):
        sources.load_model_file("gone.pt", trusted=True)


# ---------------------------------------------------------------------------
# spec_from_module
# ---------------------------------------------------------------------------

def tiny(in_ch=3, classes=4):
    return nn.Sequential(nn.Conv2d(in_ch, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, classes))


def test_spec_from_module_defaults():
    m = tiny(1).train()
    spec = sources.spec_from_module("t", m)
    assert spec.module is m and not m.training
    assert (spec.channels, spec.mean, spec.std, spec.input_size) == (1, (0.0,), (1.0,), None)
    assert spec.num_classes == 4 and spec.class_names is None and spec.weights == "bound from Python"


def test_spec_from_module_options():
    spec = sources.spec_from_module("t", tiny(), input_size=32, mean=0.5, std=[0.1, 0.2, 0.3],
                                    labels=["a", "b, bee", "c", "d"])
    assert spec.input_size == (32, 32) and spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.1, 0.2, 0.3)
    assert spec.class_names == ["a", "b, bee", "c", "d"] and spec.num_classes == 4
    assert sources.resolve_label(spec, Label("name", "BEE")) == (1, "b, bee")


def test_spec_from_module_errors():
    with raises(PlanError, "model 't' must be a torch.nn.Module, got str"):
        sources.spec_from_module("t", "resnet")
    with raises(PlanError, "model 't' takes 2 input channels; KQL feeds images with 1 (gray) or 3 (RGB) channels"):
        sources.spec_from_module("t", tiny(2))
    with raises(PlanError, "mean for model 't' must be one finite number or 3 (one per channel), got (0.1, 0.2)"):
        sources.spec_from_module("t", tiny(), mean=(0.1, 0.2))
    with raises(PlanError, "std for model 't' must be > 0 per channel, got (1.0, 0.0, 1.0)"):
        sources.spec_from_module("t", tiny(), std=(1, 0, 1))
    with raises(PlanError, "input_size for model 't' must be (height, width) in pixels >= 1, got (0, 5)"):
        sources.spec_from_module("t", tiny(), input_size=(0, 5))
    with raises(PlanError, "model 't' has 4 classes but 2 labels were given: give one name per class"):
        sources.spec_from_module("t", tiny(), labels=["a", "b"])


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("espresso", (967, "espresso")),
    ("ESPRESSO", (967, "espresso")),
    ("tabby", (281, "tabby cat")),             # a synonym of "tabby, tabby cat"
    ("Tabby Cat", (281, "tabby cat")),
    ("tabby_cat", (281, "tabby cat")),
    ("tiger cat", (282, "a cat having a striped coat")),  # original name; display uses the clean name
    ("cardigan", (474, "cardigan")),           # clean name wins over the corgi's synonym
])
def test_resolve_label_by_name(lite0, value, expected):
    assert sources.resolve_label(lite0, Label("name", value)) == expected


def test_resolve_label_index_and_predicted():
    spec = fake_spec()
    assert sources.resolve_label(spec, Label()) == (None, None)
    assert sources.resolve_label(spec, Label("index", 967)) == (967, "espresso")
    assert sources.resolve_label(spec, Label("index", 0)) == (0, "tench")
    assert sources.resolve_label(fake_spec(names=False, classes=10), Label("index", 9)) == (9, None)


def test_resolve_label_errors(lite0):
    spec = fake_spec()
    with raises(PlanError, "label 1200 is out of range: vgg16 has 1000 classes (0-999)"):
        sources.resolve_label(spec, Label("index", 1200))
    with raises(PlanError, "label -1 is out of range: vgg16 has 1000 classes (0-999)"):
        sources.resolve_label(spec, Label("index", -1))
    with raises(PlanError, "unknown label 'tabby kat' for efficientnet_lite0; did you mean 'tabby cat'?"):
        sources.resolve_label(lite0, Label("name", "tabby kat"))
    with raises(PlanError, "unknown label 'qqqqqq' for efficientnet_lite0"):
        sources.resolve_label(lite0, Label("name", "qqqqqq"))
    with raises(PlanError, "model 'm' has no class names: use LABEL <index>"):
        sources.resolve_label(fake_spec("m", classes=10, names=False), Label("name", "cat"))
    with raises(PlanError, "label 'crane' is ambiguous for efficientnet_lite0: it names classes "
                           "134 ('crane bird'), 517 ('construction crane'); use LABEL <index>"):
        sources.resolve_label(lite0, Label("name", "crane"))


# ---------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------

def test_preprocess_resizes_and_normalises():
    spec = fake_spec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(32, 48))
    image = np.full((100, 80, 3), 0.75, np.float32)
    x, display = sources.preprocess(image, spec)
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32 and x.is_contiguous()
    assert display.shape == (32, 48, 3) and display.dtype == np.float32
    np.testing.assert_allclose(display, 0.75, atol=1e-6)
    torch.testing.assert_close(x, torch.full((3, 32, 48), 1.0))


def test_preprocess_keeps_size_without_input_size():
    rng = np.random.default_rng(1)
    image = rng.random((13, 17, 3)).astype(np.float32)
    x, display = sources.preprocess(image, fake_spec(input_size=None))
    np.testing.assert_array_equal(display, image)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), image)


def test_preprocess_one_channel_uses_luminance():
    image = np.zeros((4, 4, 3), np.float32)
    image[..., 0] = 1.0   # pure red
    x, display = sources.preprocess(image, fake_spec(channels=1, input_size=None))
    assert x.shape == (1, 4, 4)
    np.testing.assert_allclose(x.numpy(), 0.2125, atol=1e-6)
    np.testing.assert_allclose(display, 0.2125, atol=1e-6)   # gray, as the model sees it
    assert display.shape == (4, 4, 3)


def test_preprocess_rejects_bad_image():
    with raises(PlanError, "preprocess takes an HxWx3 image (load it with load_image), got shape (4, 4)"):
        sources.preprocess(np.zeros((4, 4)), fake_spec())


# ---------------------------------------------------------------------------
# fill_value
# ---------------------------------------------------------------------------

IMAGENET = dict(mean=sources.IMAGENET_MEAN, std=sources.IMAGENET_STD)


@pytest.mark.parametrize("color,rgb", [
    (Color("black"), (0, 0, 0)),
    (Color("gray"), (128 / 255,) * 3),
    (Color("value", (51,)), (0.2, 0.2, 0.2)),
    (Color("rgb", (255, 0, 102)), (1.0, 0.0, 0.4)),
])
def test_fill_value_normalised(color, rgb):
    spec = fake_spec(**IMAGENET)
    got = sources.fill_value(color, np.zeros((2, 2, 3)), spec)
    want = (np.array(rgb) - np.array(sources.IMAGENET_MEAN)) / np.array(sources.IMAGENET_STD)
    assert got.shape == (3,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_fill_value_mean_and_one_channel():
    display = np.zeros((2, 2, 3))
    display[0, 0] = (1.0, 0.5, 0.25)
    got = sources.fill_value(Color("mean"), display, fake_spec())
    np.testing.assert_allclose(got.numpy(), (0.25, 0.125, 0.0625))
    gray = sources.fill_value(Color("rgb", (255, 0, 0)), display, fake_spec(channels=1, mean=(0.5,), std=(0.5,)))
    assert gray.shape == (1,)
    np.testing.assert_allclose(gray.numpy(), [(0.2125 - 0.5) / 0.5], rtol=1e-6)


def test_fill_value_errors():
    spec = fake_spec()
    with raises(PlanError, "COLOR 300 is out of range: 300 is not in 0-255"):
        sources.fill_value(Color("value", (300,)), np.zeros((1, 1, 3)), spec)
    with raises(PlanError, "COLOR (10, -1, 0) is out of range: -1 is not in 0-255"):
        sources.fill_value(Color("rgb", (10, -1, 0)), np.zeros((1, 1, 3)), spec)
    with raises(PlanError, "COLOR RGB takes 3 values on the 0-255 scale, got (1, 2)"):
        sources.fill_value(Color("rgb", (1, 2)), np.zeros((1, 1, 3)), spec)
    with raises(PlanError, "unknown colour 'pink': use BLACK, GRAY, MEAN, a value 0-255 or (r, g, b)"):
        sources.fill_value(Color("pink"), np.zeros((1, 1, 3)), spec)
