"""Approximate inference speed: naive vs exact vs APPROX TAU vs DRILLDOWN, side by side.

One process, one image; for each model it runs over the whole image's grid

  exact             SELECT ... EXACT
  approx            SELECT ... APPROX TAU <tau>
  exact+drilldown   SELECT ... EXACT DRILLDOWN
  approx+drilldown  SELECT ... APPROX TAU <tau> DRILLDOWN      (the issue's target: >= 40x over naive)

and naive re-inference (``NAIVE BATCH 8``, the CPU's best naive batch) on a
band of positions across the middle of the image. Naive costs the same full
inference at every position, so its time per position times the grid's
positions is the whole grid's naive time; running all 2809 VGG16 positions
naive would take six minutes per repeat and tell nothing more. Every time is
the best of ``--repeat`` runs, and every speedup is a ratio of times measured
in this process, one after the other.

Speed does not depend on the weights, so torchvision's random weights are fine
(``--image`` only changes which positions drill-down selects).

    .venv/bin/python benchmarks/approx_speed_bench.py
    .venv/bin/python benchmarks/approx_speed_bench.py --models vgg16 --tau 0.5 --repeat 2
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

import kql

CLOCK = time.perf_counter


def best(fn, repeat: int):
    out, times = None, []
    for _ in range(repeat):
        t0 = CLOCK()
        out = fn()
        times.append(CLOCK() - t0)
    return out, min(times)


def bench(con, model: str, opts) -> dict:
    q = f"SELECT HEATMAP FROM {opts.image} USING {model} PATCH {opts.patch} STRIDE {opts.stride}"
    plan = con.plan(f"{q} EXACT")
    H, W = plan.input_hw
    n = plan.n_positions
    # naive on a band of rows across the middle, a whole number of strides high
    rows = max(1, opts.band_rows)
    y0 = (H - opts.patch) // 2 // opts.stride * opts.stride
    band = f"REGION (0, {y0}, {W}, {y0 + opts.patch + (rows - 1) * opts.stride})"
    naive_q = f"{q} {band} NAIVE BATCH 8"
    naive, t_band = best(lambda: con.execute(naive_q), opts.repeat)
    per_naive = t_band / naive.heatmap.size
    t_naive = per_naive * n
    runs = {}
    for name, clause in [("exact", "EXACT"), ("approx", f"APPROX TAU {opts.tau}"),
                         ("exact+drilldown", "EXACT DRILLDOWN"),
                         ("approx+drilldown", f"APPROX TAU {opts.tau} DRILLDOWN")]:
        p = con.plan(f"{q} {clause}")
        r, t = best(lambda: con.execute(f"{q} {clause}"), opts.repeat)
        dd = p.drilldown
        runs[name] = {"seconds": t, "result": r, "r_theory": p.cost.r_grid,
                      "dd_expected": dd.expected_speedup if dd else None,
                      "positions": sum(r.stage_positions) if r.stage_positions else r.heatmap.size}
        print(f"  {model:<14} {name:<17} {t:8.2f} s  {t_naive / t:6.2f}x naive  "
              f"{runs['exact']['seconds'] / t:5.2f}x exact", file=sys.stderr, flush=True)
    exact = runs["exact"]["result"].heatmap
    for name, run in runs.items():
        run["max_abs_diff_vs_exact"] = float(np.abs(run["result"].heatmap - exact).max())
    return {"model": model, "positions": n, "naive_per_position": per_naive, "naive_band": naive.heatmap.size,
            "naive_seconds": t_naive, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet18,inception_v3")
    ap.add_argument("--image", default="coffee")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--band-rows", type=int, default=2, help="grid rows naive runs (default 2)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    con = kql.connect(progress="off")
    results = [bench(con, m, opts) for m in opts.models.split(",")]
    print(f"\npatch {opts.patch}, stride {opts.stride}, τ = {opts.tau}, default drill-down "
          f"(FRACTION 0.25, SPEEDUP 3); {opts.threads} threads; best of {opts.repeat}")
    head = (f"{'model':<14} {'method':<17} {'positions':>9} {'seconds':>8} {'vs naive':>9} {'vs exact':>9} "
            f"{'R (FLOPs)':>9} {'drill eq.46':>11} {'max|Δp| vs exact':>16}")
    print(head)
    print("-" * len(head))
    for res in results:
        print(f"{res['model']:<14} {'naive':<17} {res['positions']:>9} {res['naive_seconds']:>8.2f} "
              f"{1.0:>8.2f}x {'':>9} {1.0:>9.2f} {'':>11} {'':>16}   "
              f"({res['naive_per_position'] * 1e3:.1f} ms/position over {res['naive_band']} positions)")
        ex = res["runs"]["exact"]["seconds"]
        for name, run in res["runs"].items():
            dd = "" if run["dd_expected"] is None else f"{run['dd_expected']:.2f}x"
            print(f"{res['model']:<14} {name:<17} {run['positions']:>9} {run['seconds']:>8.2f} "
                  f"{res['naive_seconds'] / run['seconds']:>8.2f}x {ex / run['seconds']:>8.2f}x "
                  f"{run['r_theory']:>9.2f} {dd:>11} {run['max_abs_diff_vs_exact']:>16.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
