"""Multi-image queries: the local executor vs Ray with 1 and 2 workers, side by side.

    .venv/bin/python benchmarks/batch_bench.py                 # 8 photos, efficientnet_lite0
    .venv/bin/python benchmarks/batch_bench.py --images 4 --stride 16   # 13x13 positions

Everything runs in one process on one local Ray instance (``--cpus``, default
2), over the bundled sample photos copied into a temporary folder, every run
INTO a fresh folder (nothing is skipped). Each configuration runs the job on
``n/2`` and on ``n`` images, interleaved, so a wall time splits into

    wall(n) = fixed + n * per_image / workers

``per_image`` (the slope) is what one more image costs one worker: decode,
plan, reference and occlusion inference, overlay rendering, writing. ``fixed``
(the intercept) is paid once per job: starting and importing the actors,
shipping and deserialising the model, the first trace, the driver's setup.
Ray's own start-up (``ray.init``) is measured separately: a cluster pays it
once, not per job. Every configuration runs with the same torch thread count
(``--threads``, default 1), so all heatmaps must be equal bit for bit; the
script checks it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images in the large job (the small has half)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per image, every executor")
    ap.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray instance")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration and size (min taken)")
    args = ap.parse_args(argv)

    import ray
    import torch

    import kql
    from kql import sources

    work = tempfile.mkdtemp(prefix="kql_batch_bench_")
    folder = {}
    names = [n for n in sources.SAMPLE_IMAGES][: args.images]
    if len(names) < args.images:
        print(f"only {len(names)} sample photos: using those", file=sys.stderr)
    sizes = sorted({max(1, len(names) // 2), len(names)})
    for n in sizes:
        folder[n] = os.path.join(work, f"in{n}")
        os.makedirs(folder[n])
        for name in names[:n]:
            src = sources.SAMPLE_IMAGES[name].file
            shutil.copy(src, os.path.join(folder[n], name + os.path.splitext(src)[1]))

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    configs = [("local", dict(executor="local")),
               ("ray, 1 worker", dict(executor="ray", workers=1)),
               ("ray, 2 workers", dict(executor="ray", workers=2))]
    query = (f"SELECT HEATMAP FROM '{{src}}' USING {args.model} PATCH {args.patch} STRIDE {args.stride} "
             f"INTO '{{out}}'")
    walls: dict = {}
    per_image_worker: dict = {}
    heatmaps: dict = {}
    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"threads per image {args.threads}; ray.init {ray_start:.1f} s", flush=True)
    # Warm up this process once (the model's weights from disk, Numba's kernels from their cache):
    # a session pays that once, not per job. Ray's actors are new for every job, so their start-up
    # stays in the figures: it is part of a job's fixed cost.
    t = time.perf_counter()
    list(kql.connect(progress="off", threads=args.threads).execute(
        query.format(src=folder[sizes[0]], out=os.path.join(work, "warmup"))))
    print(f"  warm-up (local, {sizes[0]} images, not counted): {time.perf_counter() - t:.1f} s", flush=True)
    run = 0
    for _ in range(args.repeat):
        for n in sizes:
            for label, opts in configs:
                run += 1
                con = kql.connect(progress="off", threads=args.threads, **opts)
                out = os.path.join(work, f"out{run}")
                t = time.perf_counter()
                job = con.execute(query.format(src=folder[n], out=out))
                items = list(job)
                wall = time.perf_counter() - t
                bad = [i for i in items if i.status != "ok"]
                if bad:
                    print(f"{label}: {bad[0]}", file=sys.stderr)
                    return 1
                walls.setdefault((label, n), []).append(wall)
                per_image_worker.setdefault(label, []).extend(
                    r["timings"]["total"] for r in job.records())
                for i in items:
                    heatmaps.setdefault(i.name, []).append(i.heatmap)
                print(f"  {label:<15} {n:>2} images: {wall:6.1f} s", flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    equal = all(all(np.array_equal(h[0], x) for x in h[1:]) for h in heatmaps.values())
    small, large = sizes[0], sizes[-1]
    print()
    print(f"{args.model}, PATCH {args.patch} STRIDE {args.stride}, {large} images "
          f"(and {small} for the fit), threads per image {args.threads}")
    print(f"{'executor':<15} {'wall ' + str(small):>9} {'wall ' + str(large):>9} {'img/min':>8} "
          f"{'per image':>10} {'fixed':>7} {'worker s/img':>13}")
    results = {}
    for label, opts in configs:
        a, b = min(walls[(label, small)]), min(walls[(label, large)])
        workers = opts.get("workers", 1)
        slope = (b - a) / (large - small) if large > small else b / large
        fixed = b - slope * large
        results[label] = (a, b, slope, fixed)
        print(f"{label:<15} {a:8.1f}s {b:8.1f}s {60 * large / b:8.1f} {slope * workers:9.2f}s "
              f"{fixed:6.1f}s {statistics.median(per_image_worker[label]):12.2f}s")
    print()
    lo, r1, r2 = results["local"], results["ray, 1 worker"], results["ray, 2 workers"]
    print(f"ray 2 workers vs 1 worker, {large} images: {r1[1] / r2[1]:.2f}x faster "
          f"(per-image throughput {r1[2] / r2[2]:.2f}x)")
    print(f"ray 1 worker vs local, {large} images: {lo[1] / r1[1]:.2f}x "
          f"(fixed overhead {r1[3] - lo[3]:+.1f} s, per image {r1[2] / lo[2]:.2f}x)")
    print(f"ray.init: {ray_start:.1f} s (once per cluster, not per job)")
    print(f"heatmaps equal bit for bit across executors: {equal}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
