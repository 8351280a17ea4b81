"""The page in a real browser: Debian's headless Chromium driven by Playwright
against ``kql serve`` on a loopback port.

It chooses a sample, drags a crop, reads the estimate, runs, waits for the
heatmap, checks the label and time, crops again on the result and reruns,
then cancels a slow run; a screenshot of the result is saved as a test
artifact (``out/test-artifacts/web.png``, or ``$KQL_TEST_ARTIFACTS``).

`make test` installs ``chromium`` (apt) and ``playwright`` (pip); Playwright
never downloads a browser here. A missing browser fails this test: it is
part of the suite, not optional.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from kql.planner.geometry import grid_positions

pytestmark = pytest.mark.slow  # drives Chromium

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Flags this closed network needs: no sandbox as root, no GPU, nothing phoned home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("KQL_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
TIMEOUT_MS = int(os.environ.get("KQL_BROWSER_TIMEOUT_MS", 240_000))  # the CPU is shared: a run of seconds may take a minute
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server():
    """``kql serve`` in a thread, on a port the OS picked; stopped afterwards."""
    import uvicorn
    from kql.web import create_app
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser(server):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)"
    with tempfile.TemporaryDirectory(prefix="kql-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 980})
        yield context
        context.close()


@pytest.fixture
def browser_page(server, browser):
    """A fresh page per test, with the problems it ran into: script errors,
    console errors, answers of 400 and above (with the request), and requests
    that tried to leave the server."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    def bad_answer(response):
        if response.status >= 400:
            sent = response.request
            body = sent.post_data if "json" in (sent.headers.get("content-type") or "") else ""
            problems.append(f"answer {response.status}: {sent.method} {sent.url} {body or ''}".rstrip())
    page.on("response", bad_answer)

    def only_our_server(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            problems.append(f"request outside the server: {route.request.url}")
            route.abort()
    page.route("**/*", only_our_server)
    page.set_default_timeout(TIMEOUT_MS)
    yield page, problems
    page.close()


def drag(page, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Drag on the image stage between two points given in stage CSS pixels."""
    box = page.locator("#stage").bounding_box()
    page.mouse.move(box["x"] + start[0], box["y"] + start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + (start[0] + end[0]) / 2, box["y"] + (start[1] + end[1]) / 2, steps=4)
    page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=4)
    page.mouse.up()


def test_explain_a_prediction_in_the_browser(server, browser_page):
    page, problems = browser_page
    page.goto(server + "/")
    expect(page.locator("#run")).to_be_enabled()

    # choices: a sample, the model with real weights, a coarse grid so it runs in seconds
    page.select_option("#image-select", "sample-coffee")
    page.select_option("#model", "efficientnet_lite0")
    # approximate mode follows the calibrations: shipped for patch 8, 16 and 32, none for 4
    page.select_option("#patch", "16")
    expect(page.locator("#mode-approximate")).to_be_enabled()
    expect(page.locator("#ssim option")).to_have_count(3)
    expect(page.locator("#ssim")).to_contain_text(re.compile(r"0\.9 \(τ [\d.]+\)"))
    page.select_option("#patch", "4")
    expect(page.locator("#approx-note")).to_have_text(re.compile(r"Approximate: efficientnet_lite0 has no SSIM "
                                                                 r"calibration for patch 4 yet; make one .* TUNE"))
    expect(page.locator("#mode-approximate")).to_be_disabled()
    page.select_option("#patch", "32")
    page.select_option("#stride", "16")
    expect(page.locator("#mode-approximate")).to_be_enabled()
    page.check("input[name=mode][value=exact]")

    # crop: the stage shows the 224x224 model input at 448 CSS pixels, so 2 px per pixel
    drag(page, (100, 100), (340, 340))
    expect(page.locator("#region-text")).to_have_text(re.compile(r"crop x 50–170, y 50–170"))
    expect(page.locator("#selection")).to_be_visible()
    # the estimate before running: positions of the crop, time, theoretical speedup
    crop = len(grid_positions(50, 170, 32, 16)) ** 2
    expect(page.locator("#est-positions")).to_have_text(str(crop))
    expect(page.locator("#est-time")).to_have_text(re.compile(r"≈ \d"))
    expect(page.locator("#est-speedup")).to_have_text(re.compile(r"\d+\.\d\d×"))
    expect(page.locator("#explain")).to_contain_text("Plan (exact)")

    page.click("#run")
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#label")).to_have_text("espresso")
    expect(page.locator("#probability")).to_have_text(re.compile(r"^0\.\d{3}$"))
    expect(page.locator("#time")).to_have_text(re.compile(r"^\d+(\.\d)? (ms|s)$|min"))
    expect(page.locator("#result-positions")).to_have_text(str(crop))
    expect(page.locator("#overlay")).to_be_visible()
    expect(page.locator("#colorbar")).to_be_visible()
    expect(page.locator("#explain")).to_contain_text("measured:")
    expect(page.locator("#explain-what")).to_contain_text("REGION (50, 50, 170, 170)")
    # visible is not loaded: on a busy machine the PNG may still be decoding. Wait by reading the
    # element's properties, not with page.wait_for_function: that evals its string in the page,
    # which our CSP (script-src 'self', no 'unsafe-eval') rightly refuses in newer Chromium builds.
    overlay = page.locator("#overlay")
    expect(overlay).to_have_js_property("complete", True)
    expect(overlay).to_have_js_property("naturalWidth", 224)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    # the top 3 classes from one run: the class picker switches the overlay and the colour bar
    expect(page.locator("#class-pick-label")).to_be_hidden()
    page.select_option("#top", "3")
    page.click("#run")
    expect(page.locator("#explain-what")).to_contain_text("LABEL TOP 3")
    expect(page.locator("#class-pick-label")).to_be_visible()
    expect(page.locator("#class-pick option")).to_have_count(3)
    expect(page.locator("#label")).to_have_text("espresso")
    second = page.locator("#class-pick option").nth(1)
    page.select_option("#class-pick", second.get_attribute("value"))
    expect(page.locator("#label")).not_to_have_text("espresso")
    expect(page.locator("#label-what")).to_have_text("Class 2 of the top 3:")
    expect(page.locator("#cb-label")).not_to_contain_text("espresso")
    expect(page.locator("#overlay")).to_have_attribute("src", re.compile(r"overlay-1\.png"))
    page.select_option("#top", "1")

    # iterative refinement: crop again, on the heatmap, and rerun
    drag(page, (180, 180), (300, 300))
    expect(page.locator("#region-text")).to_have_text(re.compile(r"crop x 90–150, y 90–150"))
    page.click("#run")
    expect(page.locator("#explain-what")).to_contain_text("REGION (90, 90, 150, 150)")
    expect(page.locator("#result-positions")).to_have_text(str(len(grid_positions(90, 150, 32, 16)) ** 2))
    expect(page.locator("#label")).to_have_text("espresso")
    page.screenshot(path=str(ARTIFACTS / "web-refined.png"), full_page=True)

    # a slow run shows its progress and stops on Cancel
    page.click("#clear-region")
    page.select_option("#patch", "4")
    page.select_option("#stride", "2")
    page.check("input[name=mode][value=naive]")
    whole = len(grid_positions(0, 224, 4, 2)) ** 2
    expect(page.locator("#est-positions")).to_have_text(str(whole))
    page.click("#run")
    expect(page.locator("#status")).to_have_text(re.compile(rf"running: \d+ of {whole} positions"))
    expect(page.locator("#progress")).to_be_visible()
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text(re.compile(r"^cancelled"))
    expect(page.locator("#run")).to_be_enabled()
    expect(page.locator("#error")).to_have_text("")

    assert problems == []


def test_upload_refusal_is_shown_on_the_page(server, browser_page, tmp_path):
    page, problems = browser_page
    page.goto(server + "/")
    expect(page.locator("#run")).to_be_enabled()
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image at all")
    page.set_input_files("#upload", str(bogus))
    expect(page.locator("#error")).to_have_text(
        "upload refused: the upload is not an image: accepted formats are PNG, JPEG, GIF, BMP, TIFF, WEBP")
    from PIL import Image
    good = tmp_path / "square.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    page.set_input_files("#upload", str(good))
    expect(page.locator("#image-select")).to_have_value(re.compile(r"^u[0-9a-f]{16}$"))
    expect(page.locator("#image-select option:checked")).to_have_text("upload: square.png (40x30)")
    expect(page.locator("#error")).to_have_text("")
    expect(page.locator("#est-positions")).to_have_text(str(len(grid_positions(0, 224, 16, 8)) ** 2))
    # a 4xx answer is reported by the page itself, not logged as a script error
    assert [p for p in problems if "page error" in p] == []


def test_estimate_during_a_drag_uses_the_crop_already_made(server, browser_page):
    """A pending estimate that fires while the mouse is still down must not send
    the half-drawn rectangle (smaller than the patch: the server refuses it)."""
    page, problems = browser_page
    page.goto(server + "/")
    expect(page.locator("#run")).to_be_enabled()
    page.select_option("#patch", "32")
    page.select_option("#stride", "16")          # schedules an estimate 250 ms from now
    box = page.locator("#stage").bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 120, box["y"] + 120, steps=2)   # 10x10 model pixels so far
    expect(page.locator("#selection")).to_be_visible()
    page.wait_for_timeout(800)                   # the estimate fires mid-drag
    expect(page.locator("#est-positions")).to_have_text(str(len(grid_positions(0, 224, 32, 16)) ** 2))
    page.mouse.move(box["x"] + 340, box["y"] + 340, steps=4)
    page.mouse.up()
    expect(page.locator("#region-text")).to_have_text(re.compile(r"crop x 50–170, y 50–170"))
    expect(page.locator("#est-positions")).to_have_text(str(len(grid_positions(50, 170, 32, 16)) ** 2))
    expect(page.locator("#est-note")).not_to_contain_text("must")
    assert problems == []


def test_a_late_answer_about_an_earlier_patch_size_is_ignored(server, browser_page):
    """Patch 16 then 4, the answer about 16 arriving last: the page keeps what
    it was told about 4 (approximate unavailable: no calibration), and the
    estimate sent after the change asks for a mode that 4 allows."""
    page, problems = browser_page
    page.goto(server + "/")
    expect(page.locator("#run")).to_be_enabled()
    page.select_option("#patch", "16")
    expect(page.locator("#mode-approximate")).to_be_enabled()
    page.check("input[name=mode][value=approximate]")
    held = []

    def about_16(url: str) -> bool:
        return "/api/approximate" in url and url.endswith("patch=16")
    page.route(about_16, lambda route: held.append(route))
    page.select_option("#patch", "8")
    page.select_option("#patch", "16")           # this answer is held back
    page.select_option("#patch", "4")
    expect(page.locator("#approx-note")).to_have_text(re.compile(r"no SSIM calibration for patch 4"))
    expect(page.locator("#mode-approximate")).to_be_disabled()
    assert page.is_checked("input[name=mode][value=exact]")
    assert len(held) == 1
    held[0].continue_()                          # the stale answer: approximate available
    page.unroute(about_16)
    page.wait_for_timeout(500)
    expect(page.locator("#mode-approximate")).to_be_disabled()
    expect(page.locator("#approx-note")).to_have_text(re.compile(r"no SSIM calibration for patch 4"))
    expect(page.locator("#est-positions")).to_have_text(str(len(grid_positions(0, 224, 4, 8)) ** 2))
    assert problems == []
