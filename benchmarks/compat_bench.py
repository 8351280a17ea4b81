"""The drop-ins against the libraries they replace, and several labels against one.

One process, one model and one input at a time; every variant computes the
same window positions (patch 16, stride 8 on a 224x224 input: 27x27 = 729)
and the variants run interleaved, ``--repeat`` rounds after one warm-up
round, so machine load hits them alike. Per model:

  captum        ``captum.attr.Occlusion``, window (3, 16, 16), strides (3, 8, 8),
                ``perturbations_per_eval`` ``--ppe`` (16: its fastest setting
                here), target = the predicted class, raw logits;
  kql-captum    ``kql.compat.captum.Occlusion``, the same call;
  monai         ``monai.visualize.OcclusionSensitivity``, mask 16, overlap
                1 - 8/16 = 0.5 (step 8), ``n_batch`` ``--n-batch`` (16),
                ``mode='gaussian'``, softmax: every class;
  kql-monai     ``kql.compat.monai.OcclusionSensitivity``, the same call;
  naive / exact ``kql.occlusion`` in NAIVE and EXACT mode, one label (what the
                drop-ins should at least match: exact over naive);
  top5          ``kql.occlusion(..., top=5)`` in EXACT mode: five maps from one run.

It prints the median wall and CPU seconds (this process, all its threads: less
sensitive to other processes on a shared machine) of each variant and the
ratios, and checks that
the drop-ins' outputs equal the libraries': max |difference| over the
reference map's range, and over the output scale as the parity tests
(tests/test_compat.py) measure it. Random weights (no downloads); the speed
does not depend on them, but they move the logits little, so Captum's
attributions span ~1 % of the logits' range and float32 rounding shows on the
first measure (at 224x224 Captum's own float32 result is as far from a float64
run as KQL's: 3.3e-5 and 4.0e-5 of the map's range, 3e-7 and 3.6e-7 of the
logits'; ``--float64``). Usage:

    .venv/bin/python benchmarks/compat_bench.py
    .venv/bin/python benchmarks/compat_bench.py --models resnet18 --repeat 2
    .venv/bin/python benchmarks/compat_bench.py --variants exact,top5 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torchvision.models as tvm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ppe", type=int, default=16)
    ap.add_argument("--n-batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variants", default="captum,kql-captum,monai,kql-monai,naive,exact,top5",
                    help="which variants to run (the ratios of those present are printed)")
    ap.add_argument("--float64", action="store_true",
                    help="also run Captum in float64 and print how far Captum's and KQL's float32 maps are "
                         "from it (what rounding alone explains)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import kql
    from captum.attr import Occlusion as CaptumOcclusion
    from monai.visualize import OcclusionSensitivity as MonaiOS

    from kql.compat.captum import Occlusion
    from kql.compat.monai import OcclusionSensitivity

    report = {"torch_threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(tvm, name)(num_classes=1000).eval()
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x)
            target = int(logits.argmax())
        win, step = (3, 16, 16), (3, 8, 8)
        out = {}

        variants = {
            "captum": lambda: CaptumOcclusion(model).attribute(x, win, strides=step, target=target,
                                                               perturbations_per_eval=args.ppe),
            "kql-captum": lambda: Occlusion(model).attribute(x, win, strides=step, target=target),
            "monai": lambda: MonaiOS(model, mask_size=16, n_batch=args.n_batch, verbose=False,
                                     overlap=0.5)(x)[0],
            "kql-monai": lambda: OcclusionSensitivity(model, mask_size=16, n_batch=args.n_batch,
                                                      verbose=False, overlap=0.5)(x)[0],
            "naive": lambda: kql.occlusion(model, x, 16, 8, target=target, mode="naive")[0],
            "exact": lambda: kql.occlusion(model, x, 16, 8, target=target)[0],
            "top5": lambda: kql.occlusion(model, x, 16, 8, top=5)[0],
        }
        wanted = args.variants.split(",")
        variants = {k: v for k, v in variants.items() if k in wanted}
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        for round_ in range(args.repeat + 1):          # round 0 warms up
            for key, fn in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                out[key] = fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if round_:
                    times[key].append(dt)
                    cpu[key].append(dc)
                print(f"{name} round {round_} {key}: {dt:.2f} s wall, {dc:.2f} s CPU", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

        def rel(a, b, output=None):
            """max |a - b| over the reference map's range, or (``output``
            given) over the output scale as the parity tests define it: the
            larger of the map's and of the scores the map is made of."""
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            scale = float(b.abs().max())
            if output is not None:
                scale = max(scale, float(output.abs().max()))
            return float((a - b).abs().max()) / scale

        row = {"seconds": med, "cpu_seconds": med_cpu, "rounds": args.repeat,
               "positions": ((args.size - 16) // 8 + 1) ** 2}
        for a, b in (("captum", "kql-captum"), ("monai", "kql-monai"), ("naive", "exact"), ("top5", "exact")):
            if a in med and b in med:
                row[f"{a} / {b}"] = med[a] / med[b]
                row[f"{a} / {b} (CPU time)"] = med_cpu[a] / med_cpu[b]
        if "captum" in out and "kql-captum" in out:
            row["captum parity (max |d| / max |ref|)"] = rel(out["kql-captum"], out["captum"])
            row["captum parity (max |d| / output scale)"] = rel(out["kql-captum"], out["captum"], logits)
        if "monai" in out and "kql-monai" in out:
            row["monai parity (max |d| / max |ref|)"] = rel(out["kql-monai"], out["monai"].as_tensor())
            row["monai parity (max |d| / output scale)"] = rel(out["kql-monai"], out["monai"].as_tensor(),
                                                               logits.softmax(1))
        if args.float64 and "captum" in out and "kql-captum" in out:
            import copy
            ref64 = CaptumOcclusion(copy.deepcopy(model).double()).attribute(
                x.double(), win, strides=step, target=target, perturbations_per_eval=args.ppe)
            for key in ("captum", "kql-captum"):
                row[f"{key} vs float64 (max |d| / max |ref|)"] = rel(out[key].double(), ref64)
                row[f"{key} vs float64 (max |d| / output scale)"] = rel(out[key].double(), ref64, logits)
        report["models"][name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
