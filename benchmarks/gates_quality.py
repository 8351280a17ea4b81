"""Approximate SE gates (GATES LOCAL / FROZEN) on a really trained SE network (run by hand; prints a table).

The network is kql.zoo's Fashion-MNIST CNN with a squeeze-and-excitation gate
after each conv (``zoo.fmnist_se_cnn``, trained here once and cached). Gate
approximation is not tuned on anything, so every test image is held out; the
images are Fashion-MNIST test images from index 1000 (where approx_quality.py
takes its held-out ones too).

For each query, per image: the SSIM of its heatmap against EXACT's
(``kql.tune.heatmap_ssim``: skimage, data range of the exact map, window 7),
and the time of NAIVE, EXACT and each approximate query, interleaved in one
process after a warm-up, minimum of ``--repeat``; speedups are medians over the
images of the per-image ratios.

    .venv/bin/python benchmarks/gates_quality.py
    .venv/bin/python benchmarks/gates_quality.py --images 40 --patch 4 --stride 1 --repeat 2

``--contract``: gate freezing inside the ``APPROX SSIM`` contract instead.
``TUNE`` (in a temporary store, never the user's) on test images
0..``--tune``-1 measures gate freezing with the default τ grid; then, on the
held-out images from ``--first`` (never tuned on), for s = 0.8, 0.9, 0.95: the
plan ``APPROX SSIM s`` chose, the SSIM of each heatmap against EXACT's, and
the time of NAIVE, EXACT and each APPROX SSIM query, interleaved per image
after a warm-up (minimum of ``--repeat``); speedups are medians over the
images of the per-image ratios. The machine's load (``os.getloadavg``) is
printed before and after.

    .venv/bin/python benchmarks/gates_quality.py --contract --tune 10 --images 24 --repeat 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import kql
from kql import datasets, tune, zoo

TARGETS = (0.8, 0.9, 0.95)

QUERIES = ("APPROX TAU 1 GATES LOCAL", "APPROX TAU 1 GATES FROZEN", "APPROX TAU 0.5",
           "APPROX TAU 0.5 GATES LOCAL")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--first", type=int, default=1000, help="first test image (default 1000)")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contract", action="store_true", help="APPROX SSIM 0.8/0.9/0.95 after a TUNE")
    ap.add_argument("--tune", type=int, default=10, help="with --contract: TUNE on test images 0..N-1")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    net = zoo.trained_fmnist_net(Path(tempfile.gettempdir()) / "kql-zoo", architecture="se")
    accuracy = zoo.evaluate_fmnist(net, count=1000)
    con = kql.connect(progress="off")
    con.register_model("fmnist_se", net, **zoo.FMNIST_SPEC)
    images, _ = datasets.load_fashion_mnist("test")
    base = f"SELECT HEATMAP FROM img USING fmnist_se PATCH {opts.patch} STRIDE {opts.stride}"
    if opts.contract:
        return contract(con, opts, images, base, accuracy)
    plans = {q: con.plan(f"{base} {q}", {"img": images[0]}) for q in ("EXACT",) + QUERIES}
    con.execute(f"{base} EXACT", img=images[0])                       # warm-up
    ssim = {q: [] for q in QUERIES}
    ratio = {q: [] for q in QUERIES}
    naive_ratio, flat = [], 0
    for i in range(opts.first, opts.first + opts.images):
        img = images[i]
        best, maps = interleaved(con, base, img, ("NAIVE", "EXACT") + QUERIES, opts.repeat)
        exact = maps["EXACT"]
        if np.ptp(exact) < tune.FLAT:
            flat += 1
            continue
        naive_ratio.append(best["NAIVE"] / best["EXACT"])
        for q in QUERIES:
            ssim[q].append(tune.heatmap_ssim(exact, maps[q]))
            ratio[q].append(best["EXACT"] / best[q])
        print(f"image {i}: " + ", ".join(f"{q.split('APPROX ')[1]} {ssim[q][-1]:.3f}" for q in QUERIES),
              file=sys.stderr, flush=True)
    header(opts, accuracy, plans["EXACT"], naive_ratio,
           f"{len(naive_ratio)} held-out test images from {opts.first} ({flat} with a flat exact map left out)")
    head = (f"{'query':<28} {'R':>5} {'SSIM median':>11} {'min':>6} {'≥0.9':>6} {'≥0.8':>6} "
            f"{'vs exact':>9} {'vs naive':>9}")
    print(head)
    print("-" * len(head))
    for q in QUERIES:
        s = np.array(ssim[q])
        vs_naive = np.median(np.array(ratio[q]) * np.array(naive_ratio))
        print(f"{q:<28} {plans[q].cost.r_grid:>5.2f} {np.median(s):>11.3f} {s.min():>6.3f} "
              f"{(s >= 0.9).mean():>6.0%} {(s >= 0.8).mean():>6.0%} {np.median(ratio[q]):>8.2f}x "
              f"{vs_naive:>8.2f}x")
    return 0


def interleaved(con, base: str, img, queries, repeat: int) -> tuple[dict, dict]:
    """Each query on ``img``, interleaved, ``repeat`` rounds: (best seconds, heatmap) per query."""
    best, maps = {}, {}
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            r = con.execute(f"{base} {q}", img=img)
            best[q] = min(best.get(q, np.inf), time.perf_counter() - t0)
            maps[q] = r.heatmap
    return best, maps


def header(opts, accuracy: float, exact_plan, naive_ratio, images: str) -> None:
    """The lines above a table: the network, the grid, the images, EXACT's R and speedup."""
    print(f"\nfmnist_se (test accuracy {accuracy:.1%} on 1000 test images), patch {opts.patch}, stride "
          f"{opts.stride}, {exact_plan.n_positions} positions; {images}; {opts.threads} threads, min of "
          f"{opts.repeat}")
    print(f"EXACT: R {exact_plan.cost.r_grid:.2f}, median {np.median(naive_ratio):.2f}x over NAIVE")


def contract(con, opts, images, base: str, accuracy: float) -> int:
    """``--contract``: TUNE, then APPROX SSIM s on held-out images (see the module docstring)."""
    assert opts.tune <= opts.first, "the tuning images must not overlap the held-out ones"
    os.environ["KQL_DATA_DIR"] = tempfile.mkdtemp(prefix="kql-bench-")   # never the user's store
    load = os.getloadavg()
    t0 = time.perf_counter()
    tuned = con.execute(f"TUNE fmnist_se ON {', '.join(f't{i}' for i in range(opts.tune))} "
                        f"PATCH {opts.patch} STRIDE {opts.stride}", **{f"t{i}": images[i] for i in range(opts.tune)})
    print(tuned, file=sys.stderr)
    print(f"TUNE on {opts.tune} images: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    queries = [f"APPROX SSIM {s:g}" for s in TARGETS]
    plans = {q: con.plan(f"{base} {q}", {"img": images[opts.first]}) for q in ("EXACT",) + tuple(queries)}
    con.execute(f"{base} EXACT", img=images[0])                       # warm-up
    for q in queries:
        con.execute(f"{base} {q}", img=images[0])
    ssim = {q: [] for q in queries}
    ratio = {q: [] for q in queries}
    naive_ratio, flat, i = [], 0, opts.first
    while len(naive_ratio) < opts.images:
        img = images[i]
        best, maps = interleaved(con, base, img, ("NAIVE", "EXACT") + tuple(queries), opts.repeat)
        i += 1
        if np.ptp(maps["EXACT"]) < tune.FLAT:
            flat += 1
            continue
        naive_ratio.append(best["NAIVE"] / best["EXACT"])
        for q in queries:
            ssim[q].append(tune.heatmap_ssim(maps["EXACT"], maps[q]))
            ratio[q].append(best["EXACT"] / best[q])
        print(f"image {i - 1}: " + ", ".join(f"{q.split('APPROX ')[1]} {ssim[q][-1]:.3f}" for q in queries),
              file=sys.stderr, flush=True)
    after = os.getloadavg()
    header(opts, accuracy, plans["EXACT"], naive_ratio,
           f"TUNE on test images 0-{opts.tune - 1}; {len(naive_ratio)} held-out test images {opts.first}-{i - 1} "
           f"({flat} with a flat exact map left out); load average (1, 5, 15 min) "
           f"{', '.join(f'{v:.1f}' for v in load)} before, {', '.join(f'{v:.1f}' for v in after)} after")
    head = (f"{'query':<17} {'plan chosen':<24} {'predicted':>9} {'R':>5} {'SSIM median':>11} {'min':>6} "
            f"{'≥ s':>7} {'vs exact':>9} {'vs naive':>9}")
    print(head)
    print("-" * len(head))
    for q, target in zip(queries, TARGETS):
        s = np.array(ssim[q])
        chosen = plans[q].contract.chosen
        vs_naive = np.median(np.array(ratio[q]) * np.array(naive_ratio))
        print(f"{q:<17} {chosen.name:<24} {chosen.predicted_ssim:>9.3f} {plans[q].cost.r_grid:>5.2f} "
              f"{np.median(s):>11.3f} {s.min():>6.3f} {f'{int((s >= target).sum())}/{len(s)}':>7} "
              f"{np.median(ratio[q]):>8.2f}x {vs_naive:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
