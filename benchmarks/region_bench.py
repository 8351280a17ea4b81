"""A small REGION (the web page's crop): fixed costs against the positions (run by hand).

Times each query on the same image and region, interleaved in rounds in one
process after a warm-up, and prints the best time of each with its speedup
over NAIVE, plus what the executor reports as the reference inference (for
incremental plans also the materialization of the views: one forward pass per
query) and the occlusion stage.

    .venv/bin/python benchmarks/region_bench.py
    .venv/bin/python benchmarks/region_bench.py --model vgg16 --region 88,88,136,136 --rounds 2
    .venv/bin/python benchmarks/region_bench.py --unshared   # also each plan with a forward pass per runner

``--unshared`` adds, interleaved, every incremental query as it ran before
one forward pass served the reference and every runner
(``executor.incremental.shared_forward`` replaced by a no-op): the reference
inference, then one materialization per runner.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch

import kql

QUERIES = ("NAIVE BATCH 8", "EXACT", "APPROX TAU 0.3", "APPROX TAU 0.3 DRILLDOWN", "APPROX TAU 0.2 DRILLDOWN")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--image", default="coffee")
    ap.add_argument("--region", default="88,88,136,136", help="x0,y0,x1,y1 (default: a 48x48 crop)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unshared", action="store_true",
                    help="also time the incremental queries with a forward pass per runner")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    con = kql.connect(progress="off")
    region = ", ".join(opts.region.split(","))
    base = f"SELECT HEATMAP FROM {opts.image} USING {opts.model} PATCH {opts.patch} STRIDE {opts.stride} " \
           f"REGION ({region})"
    from kql.executor import incremental
    shared = incremental.shared_forward
    runs = [(q, False) for q in QUERIES] + [(q, True) for q in QUERIES[1:] if opts.unshared]
    for q in QUERIES:  # warm-up: trace, plan, runtime calibration
        con.execute(f"{base} {q}")
    best: dict[str, tuple[float, dict, int]] = {}
    for _ in range(opts.rounds):
        for q, unshared in runs:
            incremental.shared_forward = (lambda runners: contextlib.nullcontext()) if unshared else shared
            try:
                t = time.perf_counter()
                r = con.execute(f"{base} {q}")
                took = time.perf_counter() - t
            finally:
                incremental.shared_forward = shared
            name = q + (" (a forward pass per runner)" if unshared else "")
            if name not in best or took < best[name][0]:
                best[name] = (took, dict(r.timings), int(r.heatmap.size))
    naive = best[QUERIES[0]][0]
    print(f"{base}; {opts.rounds} interleaved rounds, best of each; torch threads {opts.threads}")
    print("| method | positions | seconds | vs naive | reference (s) | occlusion (s) |")
    print("|---|---|---|---|---|---|")
    for q, (took, timings, n) in best.items():
        print(f"| {q} | {n} | {took:.2f} | {naive / took:.1f}x | {timings.get('reference', 0):.2f} "
              f"| {timings.get('occlusion', 0):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
