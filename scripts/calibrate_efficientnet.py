"""Make the SSIM calibration KQL ships for efficientnet_lite0 (kql/calibrations/efficientnet_lite0.json).

It runs ``TUNE efficientnet_lite0 ON <tuning photos> PATCH <p> STRIDE <s> TAUS (...)``
(:data:`TAUS`) through the public API, in a temporary
user store, and writes what TUNE stored to the package's built-in file, one
calibration per patch size. The photos are scikit-image's bundled samples (no
download); the others are held out for benchmarks/approx_quality.py.

    .venv/bin/python scripts/calibrate_efficientnet.py                # patch 16, stride 16
    .venv/bin/python scripts/calibrate_efficientnet.py --patches 8,16,32
    # what ships: τ curves at stride = patch, refinement at stride = patch / 4
    .venv/bin/python scripts/calibrate_efficientnet.py --patches 16 --refine-only --refine-stride 4
    .venv/bin/python scripts/calibrate_efficientnet.py --patches 32 --refine-stride 8
    .venv/bin/python scripts/calibrate_efficientnet.py --patches 8 --refine-stride 4 --taus 1,0.95,0.9,0.8,0.7
    .venv/bin/python scripts/calibrate_efficientnet.py --replay     # refinement policy changed

Adaptive refinement (``APPROX SSIM``'s run-time check, ``planner.refine``) is
calibrated on fine grids, where it is used: ``--refine-stride`` runs the exact
heatmaps of the tuning photos at that stride and replays refinement on them
(``kql.tune.measure_refinement``); ``--refine-only`` keeps the τ curves
already in ``--out`` and adds refinement to them. Calibrations for other
patch sizes already in ``--out`` are kept.

The stride defaults to the patch (non-overlapping patches): TUNE runs seven
heatmaps per photo, and at stride 16 one takes tens of seconds on two CPU
cores; the held-out check in benchmarks/approx_quality.py shows how the
thresholds it picks carry over to other photos.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Photos TUNE uses (4 colour, 2 grayscale, 3 textures); every other sample photo is held out.
TUNING = ("coffee", "chelsea", "astronaut", "rocket", "camera", "coins", "brick", "grass", "gravel")

#: Thresholds measured. Denser near 1 than TUNE's default: SSIM falls steeply there on
#: efficientnet_lite0 (its 7x7 stages are first capped below τ = 0.93), and the τ an SSIM
#: target gets is one of these.
TAUS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", default="16", help="comma-separated square patch sizes (default 16)")
    ap.add_argument("--stride", type=int, default=None, help="stride (default: the patch size)")
    ap.add_argument("--images", default=",".join(TUNING), help="comma-separated sample photo names")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default=str(ROOT / "kql" / "calibrations" / "efficientnet_lite0.json"))
    ap.add_argument("--refine-stride", default=None,
                    help="comma-separated strides (one per patch) at which to calibrate adaptive refinement")
    ap.add_argument("--taus", default=None, help="comma-separated thresholds (default: TAUS)")
    ap.add_argument("--replay", action="store_true",
                    help="recompute refinement from the exact heatmaps already in --out (no inference), "
                         "after a change to the refinement policy")
    ap.add_argument("--refine-only", action="store_true",
                    help="keep the τ curves already in --out, add refinement only")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    os.environ["KQL_DATA_DIR"] = tempfile.mkdtemp(prefix="kql-calibrate-")   # never the user's store
    import kql
    from kql import ast, calibration, tune

    con = kql.connect(progress="auto")
    images = tuple(s.strip() for s in args.images.split(",") if s.strip())
    out = Path(args.out)
    patches = [int(p) for p in args.patches.split(",")]
    refine_strides = [int(s) for s in args.refine_stride.split(",")] if args.refine_stride else [None] * len(patches)
    if len(refine_strides) != len(patches):
        ap.error("--refine-stride needs one stride per patch")
    kept = {c.patch: c for c in calibration._read(out, "built-in")} if out.exists() else {}
    if args.replay:
        import numpy as np
        from kql.planner import refine
        for cal in kept.values():
            if cal.refine and cal.exact_maps:
                policy = refine.RefinePolicy(1.0)
                cal.refine = tune.refine_record(policy, cal.refine["stride"], {
                    k: refine.trajectory(policy, np.asarray(m)) for k, m in cal.exact_maps.items()})
                print(tune.summary(cal), flush=True)
        calibration.write(out, [kept[k] for k in sorted(kept)])
        print(f"replayed refinement in {out}")
        return 0
    for patch, rstride in zip(patches, refine_strides):
        t0 = time.perf_counter()
        if args.refine_only:
            cal = kept[(patch, patch)]
        else:
            stride = args.stride or patch
            taus = tuple(float(t) for t in args.taus.split(",")) if args.taus else TAUS
            stmt = ast.Tune("efficientnet_lite0", images, patch=(patch, patch), stride=(stride, stride), taus=taus)
            print(con.execute(stmt), flush=True)
            (cal,) = [c for c in calibration.load_all() if c.source == "user" and c.patch == (patch, patch)]
        if rstride is not None:
            cal.refine, cal.exact_maps = tune.measure_refinement(con, "efficientnet_lite0", images,
                                                                 (patch, patch), (rstride, rstride))
            print(tune.summary(cal), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)\n", flush=True)
        kept[(patch, patch)] = cal
    found = [kept[k] for k in sorted(kept)]
    calibration.write(out, found)
    print(f"wrote {len(found)} calibration(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
