"""The web API (kql serve) through Starlette's test client: every endpoint,
every kind of bad input, the queue, cancel, and that the server keeps serving.

One app (one KQL session, efficientnet_lite0 with its real ImageNet weights)
serves the module; the queue tests use a slow naive query and cancel it.
"""
from __future__ import annotations

import gc
import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from starlette.testclient import TestClient

from kql import sources
from kql.web import create_app
from kql.web.engine import RunRequest, approximate_support
from helpers import rand_pixels

LITE = "efficientnet_lite0"
SMALL = {"image": "sample-coffee", "model": LITE, "patch": 32, "stride": 16, "mode": "exact",
         "region": [64, 64, 160, 160]}       # 5x5 = 25 positions
SLOW = {"image": "sample-coffee", "model": LITE, "patch": 4, "stride": 2, "mode": "naive"}  # 111x111


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(max_bytes=2 * 2**20, max_pixels=2000 * 2000, max_queued=4)) as c:
        yield c


def png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(h: int = 48, w: int = 64) -> np.ndarray:
    return rand_pixels(h, w)


def crafted_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` with one tiny IDAT: a
    decompression bomb's shape without its payload."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def error(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message and "File \"" not in message
    return message


def wait(client, job_id: str, until=("done", "failed", "cancelled"), timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in until:
            return status
        assert time.monotonic() < deadline, f"job still {status['state']}: {status}"
        time.sleep(0.05)


def wait_for(predicate, client, job_id, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/api/jobs/{job_id}").json()
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"condition not reached: {status}"
        time.sleep(0.05)


def live_objects(*types) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in types)


# ---------------------------------------------------------------- page and options

def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="stage"' in page.text and "/static/app.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "fetch(" in client.get("/static/app.js").text
    assert client.get("/static/app.css").status_code == 200
    assert error(client.get("/static/../app.py")) == "not found"


def test_options_publish_the_choices(client):
    o = client.get("/api/options").json()
    models = {m["name"]: m for m in o["models"]}
    assert models[LITE]["input"] == [224, 224] and models[LITE]["source"] == "built-in"
    assert models["vgg16"]["weights"] == "random (the page loads no weight files)"
    assert {"name": "coffee", "id": "sample-coffee"}.items() <= \
        next(s for s in o["samples"] if s["name"] == "coffee").items()
    assert o["patches"] == [4, 8, 16, 32] and o["strides"] == [2, 4, 8, 16]
    assert o["modes"] == ["naive", "exact", "approximate"] and o["classes"] == [1, 3, 5]
    assert o["limits"]["upload_bytes"] > 0 and o["limits"]["upload_pixels"] > 0


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/api/nothing").status_code == 404 and error(client.get("/api/nothing")) == "not found"
    r = client.delete("/api/options")
    assert r.status_code == 405 and error(r) == "method not allowed"


# ---------------------------------------------------------------- approximate mode

def test_approximate_needs_a_calibration_and_says_how_to_make_one(client):
    r = client.get("/api/approximate", params={"model": LITE, "patch": 4})
    reason = (f"{LITE} has no SSIM calibration for patch 4 yet; make one in the kql shell with TUNE {LITE} ON "
              f"<sample images> PATCH 4 (e.g. TUNE {LITE} ON coffee, chelsea, astronaut PATCH 4), then reload "
              f"this page")
    assert r.json() == {"available": False, "ssim": [], "tau": {}, "reason": reason}
    assert "not available" not in reason
    bad = client.post("/api/explain", json={**SMALL, "patch": 4, "mode": "approximate", "ssim": 0.9})
    assert bad.status_code == 400
    assert error(bad) == f"approximate mode: {reason}"


def test_approximate_with_the_shipped_calibration(client):
    r = client.get("/api/approximate", params={"model": LITE, "patch": 16}).json()
    assert r["available"] and r["ssim"] == [0.8, 0.9, 0.95] and r["reason"] == ""
    assert 0 < r["tau"]["0.8"] <= r["tau"]["0.9"] <= r["tau"]["0.95"] <= 1
    ok = client.post("/api/explain", json={**SMALL, "patch": 16, "stride": 16, "mode": "approximate", "ssim": 0.9})
    assert ok.status_code == 200, ok.text
    assert f"τ = {r['tau']['0.9']:g} from APPROX SSIM 0.9 via built-in calibration" in ok.json()["explain"]
    # the page shows the plan chosen and its predicted SSIM
    assert ok.json()["approximate_plan"] == f"τ {r['tau']['0.9']:g}" and ok.json()["predicted_ssim"] >= 0.9
    req = RunRequest("sample-coffee", LITE, 16, 8, "approximate", 0.9, None)
    assert req.query == f"SELECT HEATMAP FROM img USING {LITE} PATCH 16 STRIDE 8 APPROX SSIM 0.9"


@pytest.mark.parametrize("params, message", [
    ({"model": "nope", "patch": 16}, "model must be one of"),
    ({"model": LITE, "patch": 5}, "patch must be one of 4, 8, 16, 32, got 5"),
    ({"model": LITE}, "patch must be one of 4, 8, 16, 32, got ''"),
])
def test_approximate_checks_its_arguments(client, params, message):
    r = client.get("/api/approximate", params=params)
    assert r.status_code == 400 and message in error(r)


# ---------------------------------------------------------------- images

def test_upload_png_and_read_it_back(client):
    r = client.post("/api/images", content=png(rgb()), headers={"X-Filename": "scan%201.png"})
    assert r.status_code == 201
    item = r.json()
    assert (item["width"], item["height"]) == (64, 48) and item["id"].startswith("u")
    assert item["name"] == "scan 1.png"
    back = client.get(f"/api/images/{item['id']}")
    assert back.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(back.content))), rgb())


@pytest.mark.parametrize("data, shape", [
    (png(rgb(), "JPEG", quality=95), (48, 64)),
    (png((rgb()[..., 0].astype(np.uint16) * 257)), (48, 64)),      # 16-bit gray
    (png(np.dstack([rgb(), np.full((48, 64), 128, np.uint8)])), (48, 64)),  # RGBA
    (png(rgb(), "WEBP"), (48, 64)),
    (png(rgb(), "BMP"), (48, 64)),
])
def test_upload_accepts_common_formats(client, data, shape):
    r = client.post("/api/images", content=data)
    assert r.status_code == 201, r.text
    assert (r.json()["height"], r.json()["width"]) == shape


def test_upload_of_an_animation_keeps_its_first_frame(client):
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    item = client.post("/api/images", content=buf.getvalue()).json()
    back = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{item['id']}").content)))
    assert back.shape == (8, 8, 3) and back.max() == 0


@pytest.mark.parametrize("data, status, message", [
    (b"", 400, "the upload is empty: choose an image file"),
    (b"%PDF-1.4 not an image", 400, "the upload is not an image: accepted formats are PNG, JPEG, GIF, BMP, "
                                    "TIFF, WEBP"),
    ("P6\n4 4\n255\n".encode() + bytes(48), 400, "PPM images are not accepted"),
    (png(rgb())[:60], 400, "the upload could not be decoded: the image file is damaged or truncated"),
    (crafted_png(3000, 3000), 413, "the image is 3000x3000 = 9.0 M pixels; the limit is 4.0 M (downscale it first)"),
    (crafted_png(100_000, 100_000), 413, "the image has far more pixels than the limit (a decompression bomb?)"),
    (bytes(3 * 2**20), 413, "the request is 3.0 MiB; the limit is 2.0 MiB"),
])
def test_upload_refuses_bad_files(client, data, status, message):
    r = client.post("/api/images", content=data)
    assert r.status_code == status
    assert error(r).startswith(message)


def test_upload_refuses_cmyk_and_animations_over_the_pixel_cap(client):
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, "JPEG")
    assert error(client.post("/api/images", content=cmyk.getvalue())) == \
        "CMYK images are not supported: save it as RGB"
    frames = [Image.new("L", (1000, 1000), v) for v in (0, 50, 100, 150, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r = client.post("/api/images", content=buf.getvalue())
    assert r.status_code == 413 and error(r).startswith("the image is 1000x1000 x 5 frames = 5.0 M pixels")


@pytest.mark.parametrize("path", ["/api/images/u0123456789abcdef", "/api/images/sample-nothing",
                                  "/api/images/sample-..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd",
                                  "/api/images/..%2Fapp.py"])
def test_images_are_named_by_the_server_only(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert error(r) == "not found" or error(r).startswith("unknown")


def test_sample_image_is_served(client):
    r = client.get("/api/images/sample-coffee")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (600, 400)


# ---------------------------------------------------------------- explain

def test_explain_estimates_before_running(client):
    r = client.post("/api/explain", json=SMALL)
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["query"] == (f"SELECT HEATMAP FROM img USING {LITE} PATCH 32 STRIDE 16 EXACT "
                          f"REGION (64, 64, 160, 160)")
    assert e["positions"] == 25 and e["mode"] == "exact"
    assert e["speedup"] > 1 and e["estimated_seconds"] > 0 and e["estimate_basis"]
    assert e["explain"].startswith("Plan (exact)") and "theoretical speedup" in e["explain"]
    naive = client.post("/api/explain", json={**SMALL, "mode": "naive", "region": None}).json()
    assert naive["mode"] == "naive" and naive["positions"] == 13 * 13


@pytest.mark.parametrize("change, message", [
    ({"model": "vgg16 WEIGHTS '/etc/passwd'"}, "model must be one of"),
    ({"model": None}, "model must be one of"),
    ({"image": "/etc/passwd"}, "unknown image"),
    ({"image": "sample-/etc/passwd"}, "unknown sample image '/etc/passwd'"),
    ({"image": ""}, "choose an image: a sample or an upload"),
    ({"image": 3}, "choose an image: a sample or an upload"),
    ({"patch": 5}, "patch must be one of 4, 8, 16, 32, got 5"),
    ({"patch": "16"}, "patch must be one of 4, 8, 16, 32, got '16'"),
    ({"patch": 16.0}, "patch must be one of 4, 8, 16, 32, got 16.0"),
    ({"patch": True}, "patch must be one of 4, 8, 16, 32, got True"),
    ({"stride": 3}, "stride must be one of 2, 4, 8, 16, got 3"),
    ({"mode": "fast"}, "mode must be one of naive, exact, approximate, got 'fast'"),
    ({"mode": "EXACT; SELECT"}, "mode must be one of naive, exact, approximate"),
    ({"region": [0, 0, 300, 100]}, "region [0, 0, 300, 100] must lie inside the 224x224 model input"),
    ({"region": [100, 0, 50, 100]}, "region [100, 0, 50, 100] must lie inside"),
    ({"region": [0, 0, 10.5, 100]}, "region must be [x0, y0, x1, y1], four whole numbers of pixels"),
    ({"region": [0, 0, 100]}, "region must be [x0, y0, x1, y1]"),
    ({"region": "0, 0, 100, 100); DROP"}, "region must be [x0, y0, x1, y1]"),
    ({"query": "SELECT ..."}, "unknown field 'query'"),
    ({"top": 4}, "top must be one of 1, 3, 5, got 4"),
    ({"top": "5; DROP"}, "top must be one of 1, 3, 5"),
    ({"region": [0, 0, 20, 20]}, "patch 32x32 does not fit region"),   # the planner's own message
])
def test_explain_refuses_bad_requests(client, change, message):
    r = client.post("/api/explain", json={**SMALL, **change})
    assert r.status_code in (400, 404), r.text
    assert message in error(r)


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "the request body must be JSON"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "the request must be a JSON object"),
    (b"\xff\xfe", {}, 400, "the request body must be JSON"),
    (b" " * (65 * 1024), {}, 413, "the request is 65.0 KiB; the limit is 64.0 KiB"),
])
def test_explain_refuses_bad_bodies(client, body, headers, status, message):
    r = client.post("/api/explain", content=body, headers=headers)
    assert r.status_code == status and error(r) == message


# ---------------------------------------------------------------- jobs

def test_job_runs_and_returns_the_heatmap(client):
    submitted = client.post("/api/jobs", json=SMALL)
    assert submitted.status_code == 202
    job = submitted.json()
    assert job["state"] in ("queued", "running") and job["id"].startswith("j")
    status = wait(client, job["id"])
    assert status["state"] == "done" and status["error"] is None and status["position"] == 0
    r = status["result"]
    assert r["label"] == "espresso" and r["probability"] == pytest.approx(0.908, abs=0.02)
    assert r["seconds"] > 0 and r["timings"]["occlusion"] > 0
    assert r["grid"] == [5, 5] and r["positions"] == 25 and r["mode"] == "exact"
    assert r["region"] == [64, 64, 160, 160] and r["input"] == [224, 224]
    assert r["range"][0] <= r["range"][1] <= 1 and len(r["colormap"]) == 11
    assert r["explain"].startswith("Plan (exact, analyzed)") and "measured:" in r["explain"]
    assert r["query"] == client.post("/api/explain", json=SMALL).json()["query"]
    assert status["progress"] == {"done": 25, "total": 25}
    overlay = Image.open(io.BytesIO(client.get(status["files"]["overlay.png"]).content))
    assert overlay.size == (224, 224) and overlay.mode == "RGBA"
    alpha = np.asarray(overlay)[..., 3]
    assert alpha[0, 0] == 0 and alpha[100, 100] == 255      # transparent outside the crop
    figure = client.get(status["files"]["figure.png"])
    assert figure.headers["content-type"] == "image/png" and len(figure.content) > 10_000


def test_a_job_for_the_top_classes_returns_a_map_per_class(client):
    """LABEL TOP 3 from the page: one run, an overlay per class for the page's class picker."""
    status = wait(client, client.post("/api/jobs", json={**SMALL, "top": 3}).json()["id"])
    assert status["state"] == "done", status["error"]
    r = status["result"]
    assert r["query"].endswith("LABEL TOP 3") and len(r["classes"]) == 3
    first, *rest = r["classes"]
    assert first["label"] == r["label"] == "espresso" and first["overlay"] == "overlay.png"
    assert first["range"] == r["range"] and first["probability"] == r["probability"]
    assert [c["overlay"] for c in rest] == ["overlay-1.png", "overlay-2.png"]
    assert len({c["label_index"] for c in r["classes"]}) == 3
    assert r["probability"] >= rest[0]["probability"] >= rest[1]["probability"]
    for c in r["classes"]:
        assert c["range"][0] <= c["range"][1] <= 1
        overlay = Image.open(io.BytesIO(client.get(status["files"][c["overlay"]]).content))
        assert overlay.size == (224, 224) and overlay.mode == "RGBA"
    # the single-class run names its one class the same way
    one = wait(client, client.post("/api/jobs", json=SMALL).json()["id"])["result"]
    assert [c["label"] for c in one["classes"]] == ["espresso"]


def test_queue_positions_cancel_and_memory(client):
    from kql.planner.plan import Plan
    from kql.result import HeatmapResult
    before = live_objects(Plan, HeatmapResult)

    first = client.post("/api/jobs", json=SLOW).json()
    second = client.post("/api/jobs", json=SLOW).json()
    third = client.post("/api/jobs", json={**SLOW, "mode": "exact"}).json()
    running = wait_for(lambda s: s["state"] == "running" and s["progress"]["done"] > 0, client, first["id"])
    assert running["progress"]["total"] == 111 * 111 and running["position"] == 0
    assert client.get(f"/api/jobs/{second['id']}").json()["position"] == 1
    assert client.get(f"/api/jobs/{third['id']}").json()["position"] == 2

    # a waiting job is cancelled at once and never runs
    cancelled = client.post(f"/api/jobs/{second['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled before it started"
    assert client.get(f"/api/jobs/{third['id']}").json()["position"] == 1

    # a running one at its next batch
    client.post(f"/api/jobs/{first['id']}/cancel")
    stopped = wait(client, first["id"])
    assert stopped["state"] == "cancelled" and stopped["error"] == "cancelled"
    assert stopped["progress"]["done"] < 111 * 111 and "result" not in stopped

    third_running = wait_for(lambda s: s["state"] == "running" and s["progress"]["done"] > 0, client, third["id"])
    assert third_running["position"] == 0
    client.post(f"/api/jobs/{third['id']}/cancel")
    assert wait(client, third["id"])["state"] == "cancelled"
    assert error(client.get(f"/api/jobs/{third['id']}/overlay.png")).startswith("no such file")

    # nothing of the cancelled jobs is left alive
    time.sleep(0.2)
    assert live_objects(Plan, HeatmapResult) == before
    # and the server goes on
    assert wait(client, client.post("/api/jobs", json=SMALL).json()["id"])["state"] == "done"


def test_failed_job_reports_one_line_and_frees_memory(client):
    from kql.planner.plan import Plan
    before = live_objects(Plan)
    job = client.post("/api/jobs", json={**SMALL, "region": [0, 0, 20, 20]}).json()
    status = wait(client, job["id"])
    assert status["state"] == "failed"
    assert status["error"].startswith("patch 32x32 does not fit region") and "\n" not in status["error"]
    time.sleep(0.2)
    assert live_objects(Plan) == before


def test_a_bug_while_running_is_reported_without_a_traceback(client, monkeypatch):
    engine = client.app.state.engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals /srv/kql/engine.py line 42")
    monkeypatch.setattr(engine.con, "explain", broken)
    status = wait(client, client.post("/api/jobs", json=SMALL).json()["id"])
    assert status["state"] == "failed"
    assert status["error"] == "internal error while running the query (the server log has details)"
    monkeypatch.undo()
    assert wait(client, client.post("/api/jobs", json=SMALL).json()["id"])["state"] == "done"


def test_a_bug_in_a_request_is_a_500_without_a_traceback(client, monkeypatch):
    def broken():
        raise ValueError("secret internals")
    monkeypatch.setattr(client.app.state.engine, "options", broken)
    r = TestClient(client.app, raise_server_exceptions=False).get("/api/options")
    assert r.status_code == 500 and error(r) == "internal error (the server log has details)"
    monkeypatch.undo()
    assert client.get("/api/options").status_code == 200


def test_unknown_jobs(client):
    for r in (client.get("/api/jobs/j0000000000000000"), client.post("/api/jobs/nope/cancel"),
              client.get("/api/jobs/nope/overlay.png")):
        assert r.status_code == 404
        assert error(r) == "unknown job: it never existed or has been forgotten"
    bad = client.post("/api/jobs", json={**SMALL, "stride": 1})
    assert bad.status_code == 400 and error(bad) == "stride must be one of 2, 4, 8, 16, got 1"


def test_the_queue_has_a_limit():
    with TestClient(create_app(max_queued=1)) as c:
        first = c.post("/api/jobs", json=SLOW).json()
        wait_for(lambda s: s["state"] == "running", c, first["id"])
        second = c.post("/api/jobs", json=SLOW)
        full = c.post("/api/jobs", json=SLOW)
        assert second.status_code == 202
        assert full.status_code == 429 and error(full) == "the queue is full (1 jobs waiting); try again later"
        # a model not traced yet waits for the running job: the estimate says so at once
        busy = c.post("/api/explain", json={**SMALL, "model": "resnet18"})
        assert busy.status_code == 503 and error(busy) == (
            "the estimate needs resnet18 loaded and timed on this machine, which waits for the running "
            "job; it is shown when that job ends")
        for job in (second.json(), first):
            c.post(f"/api/jobs/{job['id']}/cancel")
        assert wait(c, first["id"])["state"] == "cancelled"


def test_uploaded_image_runs_through_a_binding(client):
    """An upload is bound as ``img``: the query text never holds it."""
    cat = (sources.load_sample("chelsea") * 255).round().astype(np.uint8)
    item = client.post("/api/images", content=png(cat), headers={"X-Filename": "cat.png"}).json()
    req = {**SMALL, "image": item["id"]}
    e = client.post("/api/explain", json=req).json()
    assert "FROM img " in e["query"] and item["id"] not in e["query"]
    status = wait(client, client.post("/api/jobs", json=req).json()["id"])
    assert status["state"] == "done"
    assert status["result"]["label"] in ("Egyptian Mau", "tabby cat", "tiger cat")


def test_serve_command_parses_its_arguments(capsys):
    from kql.repl import main
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--host" in out and "127.0.0.1" in out and "--port" in out
    with pytest.raises(SystemExit):
        main(["serve", "--port", "not-a-port"])
    assert "invalid int value" in capsys.readouterr().err


def test_image_store_forgets_the_oldest_upload():
    from kql.web.errors import WebError
    from kql.web.uploads import ImageStore
    store = ImageStore(capacity=2)
    a, b = store.add("a.png", rgb()), store.add("b.png", rgb())
    store.get(a.id)                       # a is now the most recently used
    c = store.add("c\x00\n.png", rgb())   # evicts b
    assert len(store) == 2 and store.get(a.id) is a and c.name == "c.png"
    with pytest.raises(WebError) as info:
        store.get(b.id)
    assert info.value.status == 404 and info.value.message.startswith("unknown image")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upload_applies_the_exif_orientation_like_pillow(orientation):
    from PIL import ImageOps
    from kql.web.uploads import decode
    image = Image.fromarray(rgb(5, 7))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    assert np.array_equal(decode(buf.getvalue()), expected)


def test_estimate_never_runs_a_model_while_a_job_holds_the_engine(monkeypatch):
    """Calibrating the runtime estimate runs the model, which must not overlap
    a job (it may be tracing: torch.fx patches nn.Module.__call__ for the whole
    process). While a job holds the engine, a plan whose calibration is cached
    is explained; one that would calibrate is answered 503 without running."""
    from kql.executor import timing_cache
    from kql.planner.runtime import LayerTimings
    with TestClient(create_app()) as c:
        engine = c.app.state.engine
        first = c.post("/api/explain", json=SMALL).json()   # traces the model
        assert first["estimated_seconds"] > 0
        assert first["estimate_basis"] == "per-layer timings of this model on this machine"
        measured = []
        monkeypatch.setattr(timing_cache, "layer_timings",
                            lambda plan: measured.append(plan) or LayerTimings.fixed(plan))
        engine.busy = True
        with engine.lock:  # what a running job holds; the request thread cannot take it
            import threading

            def ask(answers):
                r = c.post("/api/explain", json=SMALL)
                answers.update(r.json(), status=r.status_code)
            monkeypatch.setattr(timing_cache, "is_profiled", lambda plan: False)
            uncached = {}
            t = threading.Thread(target=ask, args=(uncached,))
            t.start()
            t.join(120)
            monkeypatch.setattr(timing_cache, "is_profiled", lambda plan: True)
            cached = {}
            t = threading.Thread(target=ask, args=(cached,))
            t.start()
            t.join(120)
        engine.busy = False
        assert uncached["status"] == 503 and "waits for the running job" in uncached["error"]
        assert cached["status"] == 200 and cached["positions"] == 25
        assert cached["estimated_seconds"] == first["estimated_seconds"]
        assert len(measured) == 1  # only the cached plan's estimate was computed


def test_an_estimate_that_cannot_be_calibrated_says_why(client, monkeypatch):
    from kql.executor import timing_cache
    from kql.planner.runtime import LayerTimings

    def broken(plan):
        raise RuntimeError("the model failed on a batch of 8\nmore detail")
    monkeypatch.setattr(timing_cache, "layer_timings", broken)
    e = client.post("/api/explain", json=SMALL).json()
    assert e["estimated_seconds"] is None
    assert e["estimate_basis"] == "no estimate: calibrating failed (the model failed on a batch of 8)"
    assert e["positions"] == 25


