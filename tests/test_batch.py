"""Multi-image queries: FROM a folder or glob INTO a folder.

The manifest's contents, resuming (after a clean run, after a subprocess is
killed with SIGKILL mid-job, after a torn manifest line or a damaged result
file), corrupt and wrong-size images, the checks made before any image runs,
EXPLAIN, the streaming Python API, Ctrl-C and the shell. The ray executor is
in test_batch_ray.py. Models are tiny seeded nn.Sequentials on 24x32 images.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kql
from kql.jobs import batch
from kql.jobs.batch import BatchJob, ImageResult
from kql.jobs.manifest import sha256_file
from helpers import small_cnn

H, W = 24, 32
QUERY = "SELECT HEATMAP FROM '{src}' USING net PATCH 8 STRIDE 8 {extra} INTO '{out}'"
GOOD = ["a.png", "b.png", "c.jpg", "d.png"]


def net() -> nn.Module:
    return small_cnn()


def make_images(folder: Path, bad: bool = True) -> Path:
    """Four good images (one a JPEG), a corrupt one, one too small for the
    patch, and a text file a folder source leaves alone."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in GOOD:
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / name)
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / "small.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def by_name(items) -> dict:
    return {item.name: item for item in items}


@pytest.fixture
def con():
    return kql.connect(progress="off", threads=1)


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "scans")


# ---------------------------------------------------------------- a job and its manifest

def test_manifest_holds_one_line_per_image_with_the_query_and_the_files(con, images, tmp_path):
    out = tmp_path / "out"
    job = con.execute(QUERY.format(src=images, out=out, extra="LABEL 2"), net=net())
    assert isinstance(job, BatchJob) and len(job) == 6      # notes.txt is not an image file
    items = by_name(job)
    assert sorted(items) == sorted(GOOD + ["broken.png", "small.png"])
    assert job.counts == {"ok": 4, "skipped": 0, "failed": 2}

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == sorted(items)    # the local executor keeps file order
    query = f"SELECT HEATMAP FROM '{images}' USING net PATCH 8 STRIDE 8 LABEL 2 INTO '{out}'"
    for r in records:
        assert r["query"] == query and len(r["query_key"]) == 64
        assert r["image"] == str(images / r["name"])
        assert r["sha256"] == sha256_file(r["image"])
        assert (r["model"], r["device"], r["threads"], r["executor"]) == ("net", "cpu", 1, "local")
        assert r["tau"] is None and r["finished"].endswith("+00:00")
    for r in records:
        if r["name"] not in GOOD:
            continue
        assert r["status"] == "ok" and r["error"] is None and r["mode"] == "exact"
        assert r["label"] == 2 and r["label_name"] is None and 0 < r["p"] < 1
        assert (r["heatmap"], r["overlay"]) == (r["name"] + ".npy", r["name"] + ".png")
        heatmap = np.load(out / r["heatmap"])
        assert heatmap.shape == tuple(r["grid"]) == (3, 4) and heatmap.dtype == np.float32
        assert np.array_equal(heatmap, items[r["name"]].heatmap)
        assert r["heatmap_sha256"] == sha256_file(out / r["heatmap"])
        assert r["overlay_sha256"] == sha256_file(out / r["overlay"])
        assert Image.open(out / r["overlay"]).format == "PNG"
        assert set(r["timings"]) >= {"decode", "bind", "optimize", "reference", "occlusion", "render", "total"}
        # the heatmap is the one a single-image query gives
        single = con.execute(f"SELECT HEATMAP FROM '{r['image']}' USING net PATCH 8 STRIDE 8 LABEL 2",
                             net=net())
        assert np.allclose(single.heatmap, heatmap, atol=1e-6)
        assert items[r["name"]].result.p_original == r["p"]
    failed = {r["name"]: r for r in records if r["status"] == "failed"}
    assert failed["broken.png"]["error"] == f"cannot read image '{images / 'broken.png'}': not a valid image file"
    assert failed["small.png"]["error"] == "patch 8x8 does not fit image 6x6"
    assert "heatmap" not in failed["broken.png"] and failed["broken.png"]["mode"] is None
    assert sorted(os.listdir(out)) == sorted(
        [".kql.lock", "manifest.jsonl"] + [n + ext for n in GOOD for ext in (".npy", ".png")])
    assert str(job).startswith(f"6 images from '{images}' by net (local): 4 explained, 2 failed in ")
    assert str(items["broken.png"]) == f"failed  {images / 'broken.png'}: " \
                                       f"cannot read image '{images / 'broken.png'}': not a valid image file"
    assert re.match(rf"ok      {re.escape(str(images / 'a.png'))}: label 2 \(p=0\.\d{{3}}\) in ",
                    str(items["a.png"]))


def test_rerun_skips_valid_results_and_redoes_the_rest(con, images, tmp_path):
    out = tmp_path / "out"
    q = QUERY.format(src=images / "*.png", out=out, extra="")
    first = by_name(con.execute(q, net=net()))
    assert {n for n, i in first.items() if i.status == "ok"} == {"a.png", "b.png", "d.png"}

    # damage one result, change one image, and add one
    (out / "b.png.npy").write_bytes((out / "b.png.npy").read_bytes()[:-4])
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / "d.png")
    Image.fromarray(np.full((H, W, 3), 200, np.uint8)).save(images / "e.png")
    second = by_name(con.execute(q, net=net()))
    status = {n: i.status for n, i in second.items()}
    assert status == {"a.png": "skipped", "b.png": "ok", "d.png": "ok", "e.png": "ok",
                      "broken.png": "failed", "small.png": "failed"}
    assert np.array_equal(second["a.png"].heatmap, first["a.png"].heatmap)     # read back from disk
    assert second["a.png"].record == first["a.png"].record
    assert np.array_equal(second["b.png"].heatmap, first["b.png"].heatmap)

    # another query (other stride) trusts none of them; the same query again skips all
    other = by_name(con.execute(q.replace("STRIDE 8", "STRIDE 4"), net=net()))
    assert {i.status for n, i in other.items() if n.endswith(("a.png", "b.png", "d.png", "e.png"))} == {"ok"}
    again = by_name(con.execute(q.replace("STRIDE 8", "STRIDE 4"), net=net()))
    assert [i.status for n, i in sorted(again.items()) if n not in ("broken.png", "small.png")] == ["skipped"] * 4

    # other weights under the same name are another model
    retrained = net()
    with torch.no_grad():
        retrained[0].bias += 0.1
    assert {i.status for i in con.execute(q, net=retrained) if i.name == "a.png"} == {"ok"}


def test_a_torn_manifest_line_is_cut_off_and_its_image_redone(con, images, tmp_path):
    out = tmp_path / "out"
    q = QUERY.format(src=images / "[ab].png", out=out, extra="")
    con.execute(q, net=net()).run()
    manifest = out / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    manifest.write_bytes(lines[0] + lines[1][:40])           # killed while appending b.png's line
    (out / ".b.png.npy.0123456789ab.tmp").write_bytes(b"half")  # and a temporary file left behind
    status = {i.name: i.status for i in con.execute(q, net=net())}
    assert status == {"a.png": "skipped", "b.png": "ok"}
    lines = manifest.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(json.loads(line)["status"] == "ok" for line in lines)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ---------------------------------------------------------------- SIGKILL mid-job

SCRIPT = """
import sys, time
import torch
from torch import nn
import kql
from kql.jobs import batch

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()

explain = batch.ImageExplainer.explain
def slow(self, work):       # time for the parent to kill us between and inside images
    time.sleep(0.3)
    return explain(self, work)
batch.ImageExplainer.explain = slow

con = kql.connect(progress="off", threads=1)
for item in con.execute(sys.argv[1], net=net()):
    print(item.status, item.name, flush=True)
print("done", flush=True)
"""


def run_until(script: Path, query: str, oks: int | None) -> list[str]:
    """Run the job in a subprocess; SIGKILL it once it has printed ``oks`` ok
    lines (None: let it finish). Returns the lines it printed."""
    proc = subprocess.Popen([sys.executable, str(script), query], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.split())
            if oks is not None and sum(1 for s in seen if s[0] == "ok") == oks:
                time.sleep(0.15)        # into the next image's work (or its writes)
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=120)
    if oks is not None:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0 and seen[-1] == ["done"]
    return seen


@pytest.mark.slow  # subprocesses, killed and rerun
def test_sigkill_mid_job_then_rerun_does_every_image_exactly_once(tmp_path):
    images = make_images(tmp_path / "scans", bad=False)
    for i in range(4):      # eight images in all
        Image.fromarray(np.random.default_rng(i + 10).integers(0, 256, (H, W, 3), np.uint8)).save(
            images / f"x{i}.png")
    out = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    query = QUERY.format(src=images, out=out, extra="")

    def committed() -> list[str]:
        manifest = out / "manifest.jsonl"
        return [json.loads(line)["name"] for line in manifest.read_text().splitlines()] \
            if manifest.exists() else []

    names = sorted(GOOD + [f"x{i}.png" for i in range(4)])
    done: list[str] = []
    for oks in (2, 2, None):
        printed = run_until(script, query, oks=oks)
        if oks is None:
            printed = printed[:-1]
        # a run skips exactly what earlier runs committed and explains the rest in order
        # (the kill may land after a line is committed but before the child printed it)
        assert [name for status, name in printed if status == "skipped"] == done
        assert [status for status, _ in printed] == ["skipped"] * len(done) + ["ok"] * (len(printed) - len(done))
        now = committed()
        assert now[:len(done)] == done and now[len(done):] == names[len(done):len(now)]
        assert len(now) >= len(done) + (oks or 0)
        done = now
    assert done == names                                        # every image done exactly once
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == names          # every image done exactly once
    assert {r["status"] for r in records} == {"ok"}
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    # every result is whole, is the one its line describes, and is what one clean run computes
    clean = by_name(kql.connect(progress="off", threads=1).execute(
        QUERY.format(src=images, out=tmp_path / "clean", extra=""), net=net()))
    for r in records:
        assert sha256_file(out / r["heatmap"]) == r["heatmap_sha256"]
        assert sha256_file(out / r["overlay"]) == r["overlay_sha256"]
        assert np.array_equal(np.load(out / r["heatmap"]), clean[r["name"]].heatmap)


# ---------------------------------------------------------------- checks before any image runs

@pytest.mark.parametrize("source, into, message", [
    ("{tmp}/nowhere", "{tmp}/out", "image folder not found: '{tmp}/nowhere'"),
    ("{tmp}/scans/*.bmp", "{tmp}/out", "no files match '{tmp}/scans/*.bmp'"),
    ("{tmp}/empty", "{tmp}/out", "folder '{tmp}/empty' holds no image files (known extensions: .png, .jpg, "
                                 ".tif, ...; a glob such as '{tmp}/empty/*' takes every file)"),
    ("{tmp}/scans", "{tmp}/out.png", "INTO '{tmp}/out.png' is a file, but FROM '{tmp}/scans' names 6 images: "
                                     "INTO takes a folder for a multi-image query (e.g. INTO 'heatmaps/')"),
    ("{tmp}/scans", "{tmp}/scans/notes.txt", "cannot write into '{tmp}/scans/notes.txt': it is a file, "
                                             "not a folder"),
    ("{tmp}/scans", "{tmp}/no/out", "cannot write into '{tmp}/no/out': directory '{tmp}/no' does not "
                                    "exist (create it first)"),
    ("{tmp}/scans/*.png", "{tmp}/scans", "INTO '{tmp}/scans' holds the images of FROM '{tmp}/scans/*.png': "
                                         "the next run would read its overlays as images; choose another folder"),
])
def test_bad_sources_and_outputs_fail_before_any_work(con, images, tmp_path, source, into, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    q = QUERY.format(src=source, out=into, extra="").replace("{tmp}", str(tmp_path))
    with pytest.raises(kql.PlanError) as e:
        con.execute(q, net=net())
    assert str(e.value) == message.replace("{tmp}", str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_query_errors_fail_before_any_image_runs(con, images, tmp_path):
    # a fixed-size model is planned on a blank image first; labels are checked up front
    con.register_model("fixed", net(), input_size=(32, 32), labels=["x", "y", "z"])
    with pytest.raises(kql.PlanError, match=r"^patch 40x40 does not fit image 32x32$"):
        con.execute(f"SELECT HEATMAP FROM '{images}' USING fixed PATCH 40 STRIDE 8 INTO '{tmp_path}/o'")
    with pytest.raises(kql.PlanError, match=r"^unknown label 'q' for fixed"):
        con.execute(f"SELECT HEATMAP FROM '{images}' USING fixed PATCH 8 STRIDE 8 LABEL 'q'")
    with pytest.raises(kql.PlanError, match=r"^unknown model 'nett'"):
        con.execute(f"SELECT HEATMAP FROM '{images}' USING nett PATCH 8 STRIDE 8")
    assert not (tmp_path / "o").exists()


def test_two_jobs_cannot_write_into_one_folder(con, images, tmp_path):
    out = tmp_path / "out"
    q = QUERY.format(src=images, out=out, extra="")
    first = con.execute(q, net=net())
    next(first)                             # running: it holds the folder
    second = con.execute(q, net=net())
    with pytest.raises(kql.PlanError) as e:
        next(second)
    assert str(e.value) == (f"another job is writing into '{out}' (it holds '{out}/.kql.lock'); "
                            f"wait for it or choose another INTO folder")
    first.close()
    assert len(list(con.execute(q, net=net()))) == 6    # released


# ---------------------------------------------------------------- streaming API, Ctrl-C, no INTO

def test_execute_returns_a_lazy_iterator(con, images, tmp_path):
    out = tmp_path / "out"
    job = con.execute(QUERY.format(src=images, out=out, extra=""), net=net())
    assert iter(job) is job and not out.exists()           # nothing runs before iteration
    first = next(job)
    assert isinstance(first, ImageResult) and first.name == "a.png" and first.status == "ok"
    assert len(job.records()) == 1
    rest = list(job)
    assert len(rest) == 5 and job.counts["ok"] == 4
    # executescript runs a job to the end before the next statement
    results = con.executescript(f"SET progress = off; "
                                f"{QUERY.format(src=images, out=tmp_path / 'o2', extra='')};", net=net())
    assert results[1].counts == {"ok": 4, "skipped": 0, "failed": 2}


def test_without_into_results_are_streamed_and_nothing_is_written(con, images, tmp_path):
    job = con.execute(f"SELECT HEATMAP FROM '{images}/*.png' USING net PATCH 8 STRIDE 8", net=net())
    items = list(job)
    assert [i.status for i in items] == ["ok", "ok", "failed", "ok", "failed"]
    assert items[0].result.output_path is None and job.manifest is None and job.records() == []
    assert sorted(os.listdir(tmp_path)) == ["scans"]


def test_ctrl_c_stops_after_the_images_in_flight_and_a_rerun_resumes(con, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    q = QUERY.format(src=images, out=out, extra="")
    explain = batch.ImageExplainer.explain
    calls = []

    def interrupted_on_third(self, work):
        calls.append(work.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return explain(self, work)
    monkeypatch.setattr(batch.ImageExplainer, "explain", interrupted_on_third)
    job = con.execute(q, net=net())
    with pytest.raises(kql.QueryInterrupted) as e:
        list(job)
    assert str(e.value) == (f"interrupted after 2 of 6 images; the finished ones are in '{out}': "
                            f"rerun the query to resume")
    assert [json.loads(line)["name"] for line in (out / "manifest.jsonl").read_text().splitlines()] == \
        ["a.png", "b.png"]
    monkeypatch.setattr(batch.ImageExplainer, "explain", explain)
    assert [i.status for i in con.execute(q, net=net())] == ["skipped", "skipped", "failed", "ok", "ok",
                                                             "failed"]


# ---------------------------------------------------------------- EXPLAIN and the shell

def test_explain_shows_images_estimate_and_the_first_images_plan(con, images, tmp_path):
    out = tmp_path / "out"
    q = QUERY.format(src=images, out=out, extra="")
    text = str(con.explain(q, net=net()))
    lines = text.splitlines()
    assert lines[0] == f"Batch (6 images from '{images}' -> '{out}'; executor local, 1 thread per image)"
    assert lines[1] == "  images: 6 · 0 done earlier (valid in the manifest) · 6 to run"
    assert re.match(r"  estimated total: 6 x [\d.]+ ms ≈ [\d.]+ (ms|s) \(per image: the plan's runtime "
                    r"estimate for one image\)$", lines[2])
    assert f"Plan of the first image, '{images / 'a.png'}':" in lines
    assert "Occlude  patch: 8x8 · stride: 8x8 · color: GRAY · grid: 3x4 = 12 positions" in text
    assert not out.exists()                                   # EXPLAIN runs nothing
    analyzed = con.explain(q, analyze=True, net=net())
    assert isinstance(analyzed.result, BatchJob) and analyzed.result.counts["ok"] == 4
    assert re.search(r"  measured: 4 explained, 0 done earlier, 2 failed in [\d.]+ m?s", str(analyzed))
    assert "  images: 6 · 4 done earlier (valid in the manifest) · 2 to run" in str(con.explain(q, net=net()))
    with pytest.raises(kql.PlanError) as e:
        con.explain(QUERY.format(src=images / "*[nl].png", out=out, extra=""), net=net())
    assert str(e.value) == (f"none of the 2 images of '{images}/*[nl].png' can be planned (the first: "
                            f"cannot read image '{images / 'broken.png'}': not a valid image file)")


def test_the_shell_prints_a_line_per_image_and_a_summary(images, tmp_path, monkeypatch):
    import io

    from kql.repl import main
    torch.save(net(), tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main(["-c", "SET progress = off; LOAD MODEL 'net.pt' AS net TRUSTED; "
                         "SELECT HEATMAP FROM 'scans/[ab].png' USING net PATCH 8 STRIDE 8 INTO 'out';"],
                  stdout=stdout, stderr=stderr)
    assert status == 0, stderr.getvalue()
    lines = stdout.getvalue().splitlines()
    assert lines[2].startswith("ok      scans/a.png: label ") and lines[3].startswith("ok      scans/b.png: ")
    assert re.match(r"2 images from 'scans/\[ab\]\.png' by net \(local\): 2 explained in [\d.]+ m?s "
                    r"-> out \(manifest manifest.jsonl\)$", lines[4])


def test_output_names_keep_folders_and_extensions(con, tmp_path):
    root = tmp_path / "scans"
    for sub in ("left", "right"):
        (root / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / sub / "knee.png")
    items = list(con.execute(f"SELECT HEATMAP FROM '{root}/**/*.png' USING net PATCH 8 STRIDE 8 "
                             f"INTO '{tmp_path}/out'", net=net()))
    assert [i.name for i in items] == ["left__knee.png", "right__knee.png"]
    assert (tmp_path / "out" / "right__knee.png.npy").exists()
    # results written inside the source tree are not taken for images by the next run
    again = list(con.execute(f"SELECT HEATMAP FROM '{root}/**/*.png' USING net PATCH 8 STRIDE 8 "
                             f"INTO '{root}/out'", net=net()))
    again = list(con.execute(f"SELECT HEATMAP FROM '{root}/**/*.png' USING net PATCH 8 STRIDE 8 "
                             f"INTO '{root}/out'", net=net()))
    assert [(i.name, i.status) for i in again] == [("left__knee.png", "skipped"), ("right__knee.png", "skipped")]


def test_model_fingerprint_covers_buffers_and_scalars():
    from kql import sources
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()    # a 0-dim num_batches_tracked
    before = sources.spec_from_module("m", bn).fingerprint()
    assert before == sources.spec_from_module("m", bn).fingerprint()
    bn[1].running_mean += 1
    assert sources.spec_from_module("m", bn).fingerprint() != before
    assert sources.spec_from_module("m", bn, mean=0.5).fingerprint() != \
        sources.spec_from_module("m", bn).fingerprint()
    after = sources.spec_from_module("m", bn).fingerprint()
    bn[0].weight.data.mul_(2)      # through .data: no version bump, but the sampled values change
    assert sources.spec_from_module("m", bn).fingerprint() != after


def test_job_estimate_falls_back_to_the_flops_rate_without_a_runtime_estimate():
    from kql.planner.explain import estimate_job_seconds
    con = kql.connect(progress="off")
    plan = con.plan("SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 112 STRIDE 112 EXACT")

    class Broken:
        def get(self):
            raise RuntimeError("cannot calibrate")

    plan.runtime = Broken()
    per, total, how = estimate_job_seconds(plan, 4, 0.5)
    ratio = plan.estimates.infer_flops / plan.cost.full_flops
    assert per == pytest.approx(0.5 * (1 + ratio)) and total == pytest.approx(4 * per)
    assert how.startswith("1 + ") and how.endswith("measured on the first image")
