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
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import kql
from kql import datasets, tune, zoo

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
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    net = zoo.trained_fmnist_net(Path(tempfile.gettempdir()) / "kql-zoo", architecture="se")
    accuracy = zoo.evaluate_fmnist(net, count=1000)
    con = kql.connect(progress="off")
    con.register_model("fmnist_se", net, **zoo.FMNIST_SPEC)
    images, _ = datasets.load_fashion_mnist("test")
    base = f"SELECT HEATMAP FROM img USING fmnist_se PATCH {opts.patch} STRIDE {opts.stride}"
    plans = {q: con.plan(f"{base} {q}", {"img": images[0]}) for q in ("EXACT",) + QUERIES}
    con.execute(f"{base} EXACT", img=images[0])                       # warm-up
    ssim = {q: [] for q in QUERIES}
    ratio = {q: [] for q in QUERIES}
    naive_ratio, flat = [], 0
    for i in range(opts.first, opts.first + opts.images):
        img = images[i]
        best = {}
        maps = {}
        for _ in range(opts.repeat):
            for q in ("NAIVE", "EXACT") + QUERIES:
                t0 = time.perf_counter()
                r = con.execute(f"{base} {q}", img=img)
                best[q] = min(best.get(q, np.inf), time.perf_counter() - t0)
                maps[q] = r.heatmap
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
    n = len(naive_ratio)
    print(f"\nfmnist_se (test accuracy {accuracy:.1%} on 1000 test images), patch {opts.patch}, "
          f"stride {opts.stride}, {plans['EXACT'].n_positions} positions; {n} held-out test images from "
          f"{opts.first} ({flat} with a flat exact map left out); {opts.threads} threads, min of {opts.repeat}")
    print(f"EXACT: R {plans['EXACT'].cost.r_grid:.2f}, median {np.median(naive_ratio):.2f}x over NAIVE")
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


if __name__ == "__main__":
    sys.exit(main())
