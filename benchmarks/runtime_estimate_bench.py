"""Runtime estimates against measured times (planner/runtime.py, measured by executor/profile.py).

For every workload (model, mode, region) it calibrates in a fresh cache
directory (unless ``--cache`` is given), prints EXPLAIN's estimate and how long
calibrating took, then runs ``EXPLAIN ANALYZE`` ``--repeat`` times and prints
the estimate against each actual time (reference inference + occlusion, what
the estimate covers) and the error of each run; with ``--recalibrate`` every
run gets a fresh calibration right before it. Usage:

    .venv/bin/python benchmarks/runtime_estimate_bench.py
    .venv/bin/python benchmarks/runtime_estimate_bench.py --models resnet18 --repeat 1
    .venv/bin/python benchmarks/runtime_estimate_bench.py --modes "NAIVE,EXACT,APPROX TAU 0.5"
    .venv/bin/python benchmarks/runtime_estimate_bench.py --recalibrate   # fresh calibration before each run

The default workloads are those of benchmarks/occlusion_bench.py (vgg16,
resnet18, inception_v3 with random weights, patch 16, stride 4) on bands of
rows sized to keep each run to seconds on a quiet 2-core CPU, one exact
workload including the image's top border, one the whole image (border batches have
smaller regions and other layer states), plus the ``make demo`` query of
efficientnet_lite0 (patch 16, stride 8, whole image).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch

import kql
from kql.executor import timing_cache
from kql.planner.plan import format_seconds

# (model, patch, stride, region or None for the whole image, modes it runs in)
WORKLOADS = [
    ("vgg16", 16, 4, (0, 88, 224, 104), ("NAIVE",)),
    ("vgg16", 16, 4, (0, 88, 224, 132), ("EXACT",)),
    ("vgg16", 16, 4, (0, 0, 224, 44), ("EXACT",)),
    ("resnet18", 16, 4, (0, 88, 224, 132), ("NAIVE",)),
    ("resnet18", 16, 4, None, ("EXACT",)),
    ("inception_v3", 16, 4, (0, 116, 299, 136), ("NAIVE",)),
    ("inception_v3", 16, 4, (0, 116, 299, 144), ("EXACT",)),
    ("efficientnet_lite0", 16, 8, None, ("NAIVE", "EXACT")),
]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated subset of the workloads' models")
    ap.add_argument("--modes", default=None,
                    help="comma-separated mode clauses to run every workload in (default: each "
                         "workload's own, NAIVE or EXACT), e.g. 'EXACT,APPROX TAU 0.5'")
    ap.add_argument("--repeat", type=int, default=2, help="EXPLAIN ANALYZE runs per workload (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads (default 2)")
    ap.add_argument("--cache", default=None,
                    help="calibration cache directory (default: a fresh temporary one, so calibrating is timed)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate afresh right before every run (on a machine whose load drifts, this "
                         "compares the model with the run rather than two moments of the load)")
    ap.add_argument("--region", default=None,
                    help="x0,y0,x1,y1: run every workload on this region instead of its own")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    opts = ap.parse_args(argv)

    torch.set_num_threads(opts.threads)
    import numba
    numba.set_num_threads(min(opts.threads, numba.config.NUMBA_NUM_THREADS))
    cache = opts.cache or tempfile.mkdtemp(prefix="kql-runtime-")
    os.environ["KQL_CACHE_DIR"] = cache
    models = set(opts.models.split(",")) if opts.models else None
    log(f"runtime estimates vs actual: {opts.repeat} run(s) each, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load {', '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"cache {cache}")
    con = kql.connect(progress="off")
    rows = []
    for model, patch, stride, region, modes in WORKLOADS:
        if models and model not in models:
            continue
        for mode in (opts.modes.split(",") if opts.modes else modes):
            if opts.region:
                region = tuple(int(v) for v in opts.region.split(","))
            where = f" REGION {region}" if region else ""
            query = f"SELECT HEATMAP FROM coffee USING {model} PATCH {patch} STRIDE {stride}{where} {mode.strip()}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                log(f"\n{query}")
                estimates, actual, calib = [], [], []
                for rep in range(opts.repeat):
                    if rep == 0 or opts.recalibrate:
                        if opts.recalibrate:
                            os.environ["KQL_CACHE_DIR"] = tempfile.mkdtemp(prefix="kql-runtime-")
                            timing_cache._MEMO.clear()
                        t0 = time.perf_counter()
                        e = con.explain(query)
                        est = e.plan.runtime.get()
                        log(f"  {est.line()}  [EXPLAIN took {format_seconds(time.perf_counter() - t0)}]")
                        calib.append((est.calibration.source, est.calibration.seconds))
                    r = con.explain(query, analyze=True).result
                    estimates.append(est.seconds)
                    actual.append(r.timings["reference"] + r.timings["occlusion"])
                    log(f"  estimated {format_seconds(estimates[-1])}, actual {format_seconds(actual[-1])} "
                        f"({(estimates[-1] - actual[-1]) / actual[-1]:+.0%}), load "
                        f"{os.getloadavg()[0]:.1f}")
            errors = [(e_ - a_) / a_ for e_, a_ in zip(estimates, actual)]
            rows.append({"model": model, "mode": mode.strip(), "patch": patch, "stride": stride,
                         "region": region or "whole image", "positions": e.plan.n_positions,
                         "batches": est.batches, "calibration": calib, "estimate_s": estimates,
                         "parts_s": est.parts, "actual_s": actual, "errors": errors})
    log("\n| model | mode | region | positions | batches | calibration s | estimate s | actual s | error |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cal = ", ".join(f"{sec:.1f}" if src == "measured" else src for src, sec in r["calibration"])
        log(f"| {r['model']} | {r['mode']} | {r['region']} | {r['positions']} | {r['batches']} | {cal} | "
            f"{', '.join(f'{v:.2f}' for v in r['estimate_s'])} | {', '.join(f'{v:.2f}' for v in r['actual_s'])} | "
            f"{', '.join(f'{v:+.0%}' for v in r['errors'])} |")
    errors = [abs(v) for r in rows for v in r["errors"]]
    inside = sum(v <= 0.30 for v in errors)
    log(f"\n{inside} of {len(errors)} runs within ±30 %; largest |error| {max(errors, default=0.0):.0%}; load at "
        f"the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump({"rows": rows, "threads": opts.threads, "torch": torch.__version__}, f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
