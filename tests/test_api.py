"""The Python API: kql.connect(), Connection.execute / executescript / explain,
register_image / register_model, every statement, and the HeatmapResult.

Models are tiny bound nn.Sequentials on 12x16 images; the one torchvision
model (squeezenet1_0 with 10 classes, for LOAD MODEL) runs a single position.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import kql
from kql.planner.explain import Explanation, plan_tree
from kql.planner.plan import Plan
from kql.result import HeatmapResult
from kql.settings import Settings
from kql.table import Table
from helpers import rand_pixels

H, W = 12, 16
PIXELS = rand_pixels(H, W)
LABELS = ["cat", "dog", "bird"]


def tiny(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes)).eval()


def probabilities(model, pixels_uint8) -> torch.Tensor:
    x = torch.from_numpy(pixels_uint8.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0]


@pytest.fixture
def con():
    c = kql.connect(progress="off")
    c.register_image("img", PIXELS)
    c.register_model("net", tiny(), labels=LABELS)
    return c


QUERY = "SELECT HEATMAP FROM {} USING net PATCH 4 STRIDE 3 NAIVE"


# ---------------------------------------------------------------- bindings

def test_image_bindings_of_every_kind_give_the_same_heatmap(con, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(PIXELS).save(path)
    expected = con.execute(QUERY.format("img"))
    bindings = {
        "numpy": PIXELS,
        "float numpy": PIXELS.astype(np.float32) / 255,
        "PIL": Image.fromarray(PIXELS),
        "tensor CxHxW": torch.from_numpy(PIXELS).permute(2, 0, 1).contiguous(),
        "path str": str(path),
        "path object": path,
    }
    for kind, image in bindings.items():
        r = con.execute(QUERY.format("picture"), picture=image)
        assert r.heatmap.shape == (4, 5), kind
        np.testing.assert_allclose(r.heatmap, expected.heatmap, rtol=0, atol=1e-6, err_msg=kind)
    quoted = con.execute(QUERY.format(f"'{path}'"))
    np.testing.assert_allclose(quoted.heatmap, expected.heatmap, rtol=0, atol=1e-6)


def test_model_binding_for_one_query(con):
    other = tiny(seed=5)
    r = con.execute("SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4 LABEL 1", m=other)
    assert r.model == "m" and r.label == 1 and r.label_name is None
    assert r.p_original == pytest.approx(float(probabilities(other, PIXELS)[1]), abs=1e-6)
    # The binding lasts one query only.
    with pytest.raises(kql.PlanError, match="unknown model 'm'"):
        con.execute("SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4")


def test_bindings_win_over_session_names(con):
    flipped = PIXELS[::-1].copy()
    r = con.execute(QUERY.format("img"), img=flipped)
    assert r.p_original == pytest.approx(float(probabilities(con.catalog.models["net"].module, flipped).max()),
                                         abs=1e-6)
    assert "bound image 'img'" in plan_tree(r.plan).find("Scan").lines()[0]


def test_register_image_and_model():
    con = kql.connect(progress="off")
    con.register_image("photo", Image.fromarray(PIXELS))
    model = tiny(seed=3)
    con.register_model("clf", model, input_size=(8, 10), mean=0.5, std=(0.25, 0.25, 0.25), labels=LABELS)
    assert con.catalog.images["photo"].shape == (H, W, 3)
    spec = con.catalog.models["clf"]
    assert (spec.input_size, spec.mean, spec.std, spec.class_names) == ((8, 10), (0.5,) * 3, (0.25,) * 3, LABELS)
    r = con.execute("SELECT HEATMAP FROM photo USING clf PATCH 2 STRIDE 2 LABEL 'dog'")
    assert r.image.shape == (8, 10, 3)                    # resized to the model's input
    assert (r.label, r.label_name) == (1, "dog")
    assert r.heatmap.shape == (4, 5)
    rows = {row[0]: row for row in con.execute("SHOW MODELS").rows}
    assert rows["clf"] == ["clf", "session", "8x10", "bound from Python"]
    rows = {row[0]: row for row in con.execute("SHOW IMAGES").rows}
    assert rows["photo"] == ["photo", "session", f"{H}x{W}"]


def test_connect_settings_and_close():
    con = kql.connect(progress="off", batch_size=3, mode="naive", memory_limit="1GB")
    assert dict(con.settings.rows()).items() >= {"device": "cpu", "batch_size": "3", "memory_limit": "953.7 MiB",
                                                 "progress": "off", "mode": "naive"}.items()
    with con:
        con.register_image("img", PIXELS)
        r = con.execute("SELECT HEATMAP FROM img USING m PATCH 4 STRIDE 4", m=tiny())
        assert r.mode == "naive" and r.plan.batch_size == 3
    assert con.catalog.images == {}                     # closed: names forgotten
    with pytest.raises(kql.PlanError, match="unknown setting 'colour'"):
        kql.connect(colour="red")


# ---------------------------------------------------------------- statements

def test_executescript(con):
    results = con.executescript("""
        SET batch_size = 2;   -- a comment
        SELECT HEATMAP FROM img USING net PATCH 6 STRIDE 6 NAIVE;
        SHOW SETTINGS;
        HELP patch
    """)
    assert len(results) == 4
    assert results[0] == "batch_size = 2"
    assert isinstance(results[1], HeatmapResult) and results[1].plan.batch_size == 2
    assert isinstance(results[2], Table) and ["batch_size", "2"] in results[2].rows
    assert results[3].startswith("PATCH <n>[x<m>]")
    assert con.executescript("-- nothing\n") == []


def test_executescript_with_bindings(con):
    results = con.executescript("SELECT HEATMAP FROM a USING m PATCH 4 STRIDE 4 LABEL 0;"
                                "SELECT HEATMAP FROM a USING m PATCH 4 STRIDE 4 LABEL 2",
                                a=PIXELS, m=tiny())
    assert [r.label for r in results] == [0, 2]


def test_explain_returns_text_plan_and_speedup(con):
    e = con.explain(QUERY.format("img"))
    assert isinstance(e, Explanation) and isinstance(e.plan, Plan) and e.result is None
    assert str(e) == e.text and e.text.startswith("Plan (naive)\n")
    assert e.plan.mode == "naive" and e.plan.n_positions == 20
    assert e.speedup == e.plan.cost.r_grid and e.speedup > 1
    assert f"theoretical speedup of incremental vs naive: R = {e.speedup:.2f}" in e.text
    assert [s["op"] for s in e.steps] == ["Heatmap", "Infer", "Occlude", "Preprocess", "Scan"]
    # EXPLAIN as a statement gives the same text; explain() also takes an EXPLAIN.
    assert con.execute("EXPLAIN " + QUERY.format("img")).text == e.text
    assert con.explain("EXPLAIN " + QUERY.format("img")).text == e.text
    assert "measured:" not in e.text and "actual" not in e.text


def test_explain_analyze_shows_measured_times(con):
    e = con.execute("EXPLAIN ANALYZE SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 EXACT")
    assert e.text.startswith("Plan (exact, analyzed)\n")
    measured = [line for line in e.text.splitlines() if line.startswith("measured: ")]
    assert len(measured) == 1
    for stage in ("bind", "optimize", "reference", "occlusion", "total"):
        assert re.search(rf"\b{stage} \d+(\.\d+)? (ms|s)\b", measured[0]), stage
    assert re.search(r"\(\d+(\.\d+)? (ms|s) per position\)", measured[0])
    infer = next(line for line in e.text.splitlines() if "Infer" in line)
    assert " · actual " in infer
    assert isinstance(e.result, HeatmapResult) and e.result.plan_text == e.text
    assert set(e.result.timings) >= {"bind", "optimize", "reference", "occlusion", "total"}
    assert all(t >= 0 for t in e.result.timings.values())
    # explain(analyze=True) is the same thing, and the heatmap is the query's.
    again = con.explain("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 3 EXACT", analyze=True)
    assert again.text.startswith("Plan (exact, analyzed)\n")
    naive = con.execute(QUERY.format("img"))
    np.testing.assert_allclose(again.result.heatmap, naive.heatmap, rtol=0, atol=1e-5)


def test_describe(con):
    t = con.execute("DESCRIBE net INPUT 8x10")
    assert isinstance(t, Table)
    assert t.columns == ["layer", "op", "kind", "geometry", "output", "FLOPs"]
    assert [(r[1], r[2]) for r in t.rows] == [
        ("input", "input"), ("conv2d", "local"), ("relu", "point"), ("conv2d", "local"), ("relu", "point"),
        ("avg_pool2d", "local"), ("flatten", "global"), ("linear", "global"), ("output", "output")]
    assert t.rows[1][3:5] == ["k3x3 s1x1 p(1,1,1,1)", "4x8x10"]
    assert t.rows[3][3:5] == ["k3x3 s2x2 p(0,0,0,0)", "6x3x4"]
    assert t.title.startswith("net: input 3x8x10, 9 layers, ")
    assert t.title.endswith("weights: bound from Python")
    text = con.execute("DESCRIBE net INPUT 8x10 PATCH 3 STRIDE 2")
    assert isinstance(text, str) and text.startswith(t.title + "\nlayer ")
    # Rows 0, 2, 4, 5 (last one flush) x columns 0, 2, 4, 6, 7: 20 positions.
    last = text.splitlines()[-1]
    assert last.startswith("theoretical speedup of incremental vs naive: R = ")
    assert "(exact regions over 20 positions; " in last


def test_show_models(con):
    t = con.execute("SHOW MODELS")
    assert t.columns == ["model", "source", "input", "weights"]
    rows = {r[0]: r for r in t.rows}
    assert t.rows[0] == ["net", "session", "any", "bound from Python"]      # session models first
    assert rows["efficientnet_lite0"][1:3] == ["built-in", "224x224"]
    assert rows["resnet18"] == ["resnet18", "torchvision", "224x224", "random unless WEIGHTS '<file>.pth'"]
    assert rows["inception_v3"][2] == "299x299"


def test_show_images(con):
    t = con.execute("SHOW IMAGES")
    assert t.rows[0] == ["img", "session", f"{H}x{W}"]
    assert ["coffee", "sample (scikit-image)", ""] in t.rows
    assert ["phantom", "sample volume (synthetic)", "1x64x64x64"] in t.rows
    assert str(t).endswith("(a quoted path also works: FROM 'photo.png', FROM 'ct.nii.gz', FROM 'clip.npy')")


def test_set_and_show_settings(con):
    rows = con.execute("SHOW SETTINGS").rows
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(Settings)]     # every setting, in order
    assert rows[:5] == [
        ["device", "cpu"], ["batch_size", "0 (from memory_limit)"], ["memory_limit", "2.0 GiB"],
        ["progress", "off"], ["mode", "auto"]]
    assert con.execute("SET batch_size = 8") == "batch_size = 8"
    assert con.execute("SET memory_limit = 512MiB") == "memory_limit = 512.0 MiB"
    assert con.execute("SET Mode = 'NAIVE'") == "mode = naive"
    assert con.execute("SET progress = on") == "progress = on"
    assert con.execute("SET progress = off") == "progress = off"
    assert con.execute("SHOW SETTINGS").rows[:5] == [
        ["device", "cpu"], ["batch_size", "8"], ["memory_limit", "512.0 MiB"], ["progress", "off"],
        ["mode", "naive"]]
    r = con.execute("SELECT HEATMAP FROM img USING net PATCH 2 STRIDE 2")
    assert r.mode == "naive" and r.plan.batch_size == 8


def test_load_image(con, tmp_path):
    path = tmp_path / "pic.png"
    Image.fromarray(PIXELS[:, ::-1]).save(path)
    assert con.execute(f"LOAD IMAGE '{path}' AS pic") == f"image 'pic' loaded from '{path}' ({H}x{W})"
    np.testing.assert_array_equal(con.catalog.images["pic"], PIXELS[:, ::-1].astype(np.float32) / 255)
    assert ["pic", "session", f"{H}x{W}"] in con.execute("SHOW IMAGES").rows
    r = con.execute(QUERY.format("pic"))
    direct = con.execute(QUERY.format("x"), x=PIXELS[:, ::-1].copy())
    np.testing.assert_allclose(r.heatmap, direct.heatmap, rtol=0, atol=1e-6)


def test_load_model_state_dict(con, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    path = tmp_path / "sq.pth"
    torch.save(model.state_dict(), path)
    assert con.execute(f"LOAD MODEL '{path}' AS sq ARCHITECTURE squeezenet1_0") == (
        f"model 'sq' loaded from '{path}' (state dict '{path}')")
    rows = {r[0]: r for r in con.execute("SHOW MODELS").rows}
    assert rows["sq"] == ["sq", "session", "224x224", f"state dict '{path}'"]
    assert con.execute("DESCRIBE sq").title.startswith("sq: input 3x224x224, ")
    r = con.execute("SELECT HEATMAP FROM img USING sq PATCH 224 STRIDE 224 LABEL 7 NAIVE")
    assert r.heatmap.shape == (1, 1) and r.label == 7 and r.label_name is None   # 10 classes: no names
    # The loaded weights are the file's: compare with the model itself on the preprocessed input.
    with torch.no_grad():
        p = torch.softmax(model(r.plan.input[None]), dim=1)[0, 7]
    assert r.p_original == pytest.approx(float(p), abs=1e-5)


def test_help(con):
    overview = con.execute("HELP")
    assert overview.startswith("KQL explains a CNN's prediction by occlusion")
    assert "SELECT HEATMAP FROM <image> USING <model> PATCH <n> STRIDE <n> [clauses]" in overview
    assert con.execute("HELP patch").startswith("PATCH <n>[x<m>]")
    assert con.execute("HELP SELECT").startswith("SELECT HEATMAP FROM <image> USING <model>")


def test_execute_takes_a_parsed_statement(con):
    from kql.parser import parse
    r = con.execute(parse(QUERY.format("img")))
    np.testing.assert_allclose(r.heatmap, con.execute(QUERY.format("img")).heatmap, rtol=0, atol=0)


# ---------------------------------------------------------------- the result

def test_result(con, tmp_path):
    r = con.execute("SELECT HEATMAP FROM img USING net PATCH 5x4 STRIDE 3 LABEL 'dog' NAIVE")
    assert isinstance(r, HeatmapResult)
    # Rows 0, 3, 6, 7 (12 - 5 = 7 is not a multiple of 3); columns 0, 3, 6, 9, 12.
    assert r.ys.tolist() == [0, 3, 6, 7] and r.xs.tolist() == [0, 3, 6, 9, 12]
    assert r.heatmap.shape == (len(r.ys), len(r.xs)) == (4, 5)
    assert r.heatmap.dtype == np.float32
    assert (r.label, r.label_name, r.label_text) == (1, "dog", "dog")
    assert r.p_original == pytest.approx(float(probabilities(con.catalog.models["net"].module, PIXELS)[1]),
                                         abs=1e-6)
    np.testing.assert_array_equal(r.drop, np.float32(r.p_original) - r.heatmap)
    assert (r.patch, r.stride, r.model, r.mode) == ((5, 4), (3, 3), "net", "naive")
    assert r.image.shape == (H, W, 3) and r.warnings == []
    assert r.pixel_map().shape == (H, W) and not np.isnan(r.pixel_map()).any()
    assert str(r).startswith("heatmap 4x5 of 'dog' (label 1, p=")
    assert ", naive: 20 positions in " in str(r)

    npy, png = tmp_path / "h.npy", tmp_path / "h.png"
    assert r.save(npy) == str(npy) and r.output_path == str(npy)
    np.testing.assert_array_equal(np.load(npy), r.heatmap)
    assert r.save(png) == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_predicted_label(con):
    r = con.execute("SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 LABEL PREDICTED")
    probs = probabilities(con.catalog.models["net"].module, PIXELS)
    assert r.label == int(probs.argmax()) and r.label_name == LABELS[r.label]
    assert r.p_original == pytest.approx(float(probs.max()), abs=1e-6)


@pytest.mark.parametrize("ext", ["npy", "png"])
def test_into_writes_the_file(con, tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    r = con.execute(f"SELECT HEATMAP FROM img USING net PATCH 4 STRIDE 4 INTO '{path}'")
    assert r.output_path == str(path) and path.is_file()
    assert str(r).endswith(f" -> {path}")
    assert "save" in r.timings
    if ext == "npy":
        np.testing.assert_array_equal(np.load(path), r.heatmap)
    else:
        with Image.open(path) as im:
            assert im.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out.{ext}"]     # no temporary file left


def test_sample_images_by_name_in_any_case(con):
    e = con.explain("SELECT HEATMAP FROM Coffee USING net PATCH 200 STRIDE 200 NAIVE")
    assert e.root.find("Scan").lines()[0] == "Scan  sample image 'coffee' (400x600)"
    assert e.plan.n_positions == 2 * 3


# ---------------------------------------------------------------- small API promises

def test_a_binding_may_be_called_query():
    con = kql.connect(progress="off")
    r = con.execute("SELECT HEATMAP FROM query USING net PATCH 4 STRIDE 4 LABEL 1", query=PIXELS, net=tiny())
    assert r.heatmap.shape == (3, 4)
    e = con.explain("SELECT HEATMAP FROM query USING net PATCH 4 STRIDE 4", query=PIXELS, net=tiny())
    assert "bound image 'query'" in e.text


@pytest.mark.parametrize("settings,message", [
    ({"batch_size": -1}, "batch_size takes a whole number (0 = sized from memory_limit), got -1"),
    ({"colour": "red"}, "unknown setting 'colour'; settings are "),
])
def test_a_bad_connect_argument_is_a_value_error(settings, message):
    with pytest.raises(ValueError) as info:
        kql.connect(**settings)
    assert isinstance(info.value, kql.SettingError) and isinstance(info.value, kql.PlanError)
    assert str(info.value).startswith(message)


def test_str_of_a_parse_error_shows_the_line_and_a_caret():
    with pytest.raises(kql.ParseError) as info:
        kql.connect().execute("SELECT HEATMAP FORM coffee USING vgg16 PATCH 16 STRIDE 4")
    assert str(info.value).splitlines()[1:] == ["SELECT HEATMAP FORM coffee USING vgg16 PATCH 16 STRIDE 4",
                                                " " * 15 + "^"]
    assert str(info.value).startswith("line 1, column 16: ")


class _FakeRay:
    """What kql.jobs.distributed asks of the ray module."""

    def __init__(self):
        self.running = False

    def is_initialized(self):
        return self.running

    def init(self, **kwargs):
        self.running = True

    def shutdown(self):
        self.running = False


def test_close_stops_a_ray_instance_only_when_no_other_connection_uses_it(monkeypatch):
    from kql.jobs import distributed
    fake = _FakeRay()
    monkeypatch.setattr(distributed, "require_ray", lambda: fake)
    monkeypatch.setitem(__import__("sys").modules, "ray", fake)
    monkeypatch.setattr(distributed, "_started_here", False)
    monkeypatch.setattr(distributed, "_users", __import__("weakref").WeakSet())
    one, two, bystander = kql.connect(), kql.connect(), kql.connect()
    distributed.connect("", one)          # one's job starts the instance
    distributed.connect("", two)          # two's job reuses it
    bystander.close()                     # never ran a job on it
    assert fake.running
    one.close()
    assert fake.running                   # two still uses it
    two.close()
    assert not fake.running
