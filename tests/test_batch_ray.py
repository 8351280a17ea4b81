"""The ray executor of multi-image queries, on a local Ray instance.

One module-scoped instance (num_cpus=2, no dashboard) and one test: pytest
runs with xdist, which may send the tests of one module to different
workers, and each would start its own instance. Ray is a test dependency
(setup.cfg's test extra pulls in the ray extra), so this never skips.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray

import kql
from kql.jobs.manifest import sha256_file
from helpers import small_cnn as net
from test_batch import GOOD, QUERY, make_images  # the same images and query

pytestmark = pytest.mark.slow  # starts a local Ray cluster


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_heatmaps_of_local_bit_for_bit_and_resumes(local_ray, tmp_path):
    images = make_images(tmp_path / "scans")
    local = {i.name: i for i in kql.connect(progress="off", threads=1).execute(
        QUERY.format(src=images, out=tmp_path / "local", extra=""), net=net())}

    con = kql.connect(progress="off", threads=1, executor="ray")
    out = tmp_path / "ray"
    job = con.execute(QUERY.format(src=images, out=out, extra=""), net=net())
    items = {i.name: i for i in job}
    assert str(job).startswith(f"6 images from '{images}' by net (ray): 4 explained, 2 failed in ")
    assert {n: i.status for n, i in items.items()} == {n: i.status for n, i in local.items()}
    for name in GOOD:
        assert np.array_equal(items[name].heatmap, local[name].heatmap), name      # bit for bit
        assert items[name].result.p_original == local[name].result.p_original
    assert items["broken.png"].error == local["broken.png"].error
    assert items["small.png"].error == "patch 8x8 does not fit image 6x6"

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == sorted(items)
    assert {r["executor"] for r in records} == {"ray"} and {r["threads"] for r in records} == {1}
    assert len({r["worker"] for r in records}) == 2            # two actors (num_cpus=2, 1 thread each)
    for r in records:
        if r["status"] == "ok":
            assert sha256_file(out / r["heatmap"]) == r["heatmap_sha256"]
            assert np.array_equal(np.load(out / r["heatmap"]), np.load(tmp_path / "local" / r["heatmap"]))

    # a rerun on ray skips what is done, whichever executor did it
    (out / "c.jpg.npy").unlink()
    again = {i.name: i.status for i in con.execute(QUERY.format(src=images, out=out, extra=""), net=net())}
    assert again == {"a.png": "skipped", "b.png": "skipped", "c.jpg": "ok", "d.png": "skipped",
                     "broken.png": "failed", "small.png": "failed"}
    assert np.array_equal(np.load(out / "c.jpg.npy"), local["c.jpg"].heatmap)

    # a catalog model with real weights goes through the object store too; its exact plan runs the
    # Numba gather kernels, whose OpenMP threads once changed torch's sums (kernels/gather_cpu.py)
    lite = "SELECT HEATMAP FROM '{src}' USING efficientnet_lite0 PATCH 112 STRIDE 112 REGION (0, 0, 224, 112)"
    photos = tmp_path / "photos"
    photos.mkdir()
    from kql import sources
    (photos / "coffee.png").write_bytes(open(sources.SAMPLE_IMAGES["coffee"].file, "rb").read())
    here = [i.heatmap for i in kql.connect(progress="off", threads=1).execute(lite.format(src=photos))]
    here += [i.heatmap for i in kql.connect(progress="off", threads=1).execute(lite.format(src=photos))]
    there = [i for i in con.execute(lite.format(src=photos))]
    assert there[0].status == "ok" and there[0].record["label_name"] == "espresso"
    assert np.array_equal(here[0], here[1]) and np.array_equal(here[0], there[0].heatmap)
    assert ray.is_initialized()                 # KQL leaves an instance it did not start alone
    con.close()
    assert ray.is_initialized()
