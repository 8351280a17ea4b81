"""Quality and speed of APPROX SSIM on really trained networks (run by hand; prints a table).

For each model and s = 0.8, 0.9, 0.95 (and s with DRILLDOWN for the targets
``--drilldown`` names): the plan ``APPROX SSIM s`` chose (``planner.candidates``:
exact, τ, drill-down or adaptive refinement); on held-out images (never used to
tune), the SSIM of each approximate heatmap against the exact one
(``kql.tune.heatmap_ssim``), the share reaching s, refinement's run-time
estimate and share of positions computed; and the time of NAIVE, EXACT and each
APPROX run, side by side in one process on the same images (speedups compare
total times).

- ``efficientnet_lite0`` (ImageNet weights, 224x224): the built-in calibration
  (scripts/calibrate_efficientnet.py tuned it on nine scikit-image sample
  photos); held out (``--photos unseen``, the default): photos from other
  packages, scikit-learn's two sample photos and matplotlib's Grace Hopper,
  whole and cropped to other sizes and aspect ratios, colour and grey
  (:func:`unseen_photos`; needs ``pip install '.[bench]'``), or
  (``--photos samples``) other scikit-image photos. NAIVE runs on the first
  ``--naive-images`` of them only (it is the slow one).
- ``fmnist``: kql.zoo's CNN trained on Fashion-MNIST, tuned here (in a
  temporary store) on test images 0..``--fmnist-tune``-1, held out: the
  ``--fmnist-held-out`` test images from index 1000.

    .venv/bin/python benchmarks/approx_quality.py                    # both models
    .venv/bin/python benchmarks/approx_quality.py --models fmnist --json out/approx.json
    .venv/bin/python benchmarks/approx_quality.py --figure docs/img/approx_heatmaps.png
    # the figures in docs/performance.md (issue 10): lite0 patch 16 stride 4, 8 unseen photos
    .venv/bin/python benchmarks/approx_quality.py --models efficientnet_lite0 --patch 16 --stride 4 \
        --lite0-held-out 8 --naive-images 1 --repeat 1
    .venv/bin/python benchmarks/approx_quality.py --models fmnist --fmnist-stride 1 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TARGETS = (0.8, 0.9, 0.95)

#: efficientnet_lite0's held-out photos, in the order --lite0-held-out takes them: the colour
#: photos first, then grayscale ones with an object in them (not the textures: brick, grass...).
HELD_OUT = ("motorcycle", "retina", "hubble_deep_field", "immunohistochemistry", "clock", "moon",
            "page", "text", "cell", "microaneurysms")


def run(con, query: str, **bindings):
    t0 = time.perf_counter()
    r = con.execute(query, **bindings)
    return r, time.perf_counter() - t0


def measure(con, model: str, images: dict, patch: int, stride: int, naive_names, repeat: int,
            drilldown=()) -> dict:
    """Exact, approximate (per target, and with ``DRILLDOWN`` for the targets
    in ``drilldown``) and naive runs of every held-out image.

    Per image the runs are interleaved (exact, each approximate query, naive)
    ``repeat`` times and each one's minimum time is kept, so warm-up and load
    drift hit all alike. Recorded per query: the plan ``APPROX SSIM`` chose
    (``planner.candidates``), the SSIM reached, the run-time estimate of
    refinement, the share of positions computed."""
    from kql import tune
    base = f"SELECT HEATMAP FROM img USING {model} PATCH {patch} STRIDE {stride}"
    keys = [(t, "") for t in TARGETS] + [(t, " DRILLDOWN") for t in drilldown]
    out = {"images": list(images), "exact_s": {}, "naive_s": {}, "targets": {}, "heatmaps": {}, "flat": []}
    for k in keys:
        out["targets"][k] = {"plan": {}, "ssim": {}, "time_s": {}, "estimated": {}, "share": {}}
    for name, img in images.items():
        exact, t_exact = run(con, f"{base} EXACT", img=img)
        out["heatmaps"][name] = {"exact": exact}
        if np.ptp(exact.heatmap) < tune.FLAT:      # SSIM undefined: no structure to keep
            out["flat"].append(name)
            print(f"  {name}: exact {t_exact:.1f} s, flat heatmap (left out)", flush=True)
            continue
        queries = {"exact": f"{base} EXACT"}
        for t, v in keys:
            queries[(t, v)] = f"{base} LABEL {exact.label} APPROX SSIM {t}{v}"
        if name in naive_names:
            queries["naive"] = f"{base} NAIVE"
        best = {"exact": t_exact}
        results = {"exact": exact}
        for i in range(repeat):
            for key, q in queries.items():
                if i == 0 and key == "exact":
                    continue
                r, dt = run(con, q, img=img)
                results.setdefault(key, r)
                best[key] = min(best.get(key, float("inf")), dt)
        out["exact_s"][name] = best["exact"]
        if "naive" in best:
            out["naive_s"][name] = best["naive"]
        for k in keys:
            r, rec = results[k], out["targets"][k]
            chosen = next((c.name for c in r.plan.candidates or () if c.chosen), r.mode)
            rec["plan"][name] = chosen
            rec["ssim"][name] = tune.heatmap_ssim(exact.heatmap, r.heatmap)
            rec["time_s"][name] = best[k]
            rec["estimated"][name] = r.estimated_ssim
            rec["share"][name] = 1.0 if r.computed is None else float(r.computed.mean())
            out["heatmaps"][name][k] = r
        print(f"  {name}: {exact.label_name}, p {exact.p_original:.3f}, heatmap span {np.ptp(exact.heatmap):.3f}, "
              f"exact {best['exact']:.1f} s" + (f", naive {best['naive']:.1f} s" if "naive" in best else "") +
              "".join(f"\n    SSIM {t:g}{v}: {out['targets'][(t, v)]['plan'][name]}, "
                      f"{best[(t, v)]:.1f} s ({best['exact'] / best[(t, v)]:.2f}x), SSIM "
                      f"{out['targets'][(t, v)]['ssim'][name]:.3f}"
                      + (f" (estimated {results[(t, v)].estimated_ssim:.3f}, "
                         f"{100 * out['targets'][(t, v)]['share'][name]:.0f} % computed)"
                         if results[(t, v)].estimated_ssim is not None else "")
                      for t, v in keys), flush=True)
    return out


def rows(model: str, m: dict) -> list[list[str]]:
    """Table rows per target. Speedups are the median over images of the per-image
    ratio of times, so one run slowed by a busy neighbour does not move them."""
    from collections import Counter
    table = []
    for (t, v), rec in m["targets"].items():
        s = np.array(list(rec["ssim"].values()))
        names = list(rec["time_s"])
        vs_exact = np.median([m["exact_s"][n] / rec["time_s"][n] for n in names])
        with_naive = [n for n in names if n in m["naive_s"]]
        vs_naive = (f"{np.median([m['naive_s'][n] / rec['time_s'][n] for n in with_naive]):.2f}x"
                    if with_naive else "-")
        plans = ", ".join(f"{p} ×{k}" for p, k in Counter(rec["plan"].values()).most_common())
        share = np.median(list(rec["share"].values()))
        table.append([model, f"{t:g}{v}", plans, str(len(s)), f"{np.median(s):.3f}", f"{s.min():.3f}",
                      f"{100 * np.mean(s >= t):.0f} %", f"{100 * share:.0f} %", vs_naive, f"{vs_exact:.2f}x"])
    return table


def unseen_photos() -> dict:
    """efficientnet_lite0's evaluation photos: from other packages than the
    scikit-image samples that tuned it (scikit-learn's two sample photos,
    matplotlib's Grace Hopper), whole and cropped to other sizes and aspect
    ratios, colour and grey."""
    import matplotlib
    from skimage import color, io
    from sklearn.datasets import load_sample_images
    china, flower = [np.asarray(i, np.float32) / 255 for i in load_sample_images().images]
    hopper = io.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    hopper = hopper.astype(np.float32) / 255

    def grey(a):
        return np.repeat(color.rgb2gray(a)[..., None], 3, 2).astype(np.float32)
    return {"china": china, "flower": flower, "grace_hopper": hopper,
            "china_temple_tall": china[0:427, 60:330], "flower_grey": grey(flower),
            "grace_face_grey": grey(hopper[60:360, 150:420]), "china_wide_grey": grey(china[150:427, :]),
            "flower_centre": flower[100:380, 200:520]}


def lite0(args, con) -> dict:
    from calibrate_efficientnet import TUNING
    from kql import sources
    if args.photos == "unseen":
        images = dict(list(unseen_photos().items())[args.lite0_from: args.lite0_from + args.lite0_held_out])
    else:
        held = [n for n in HELD_OUT if n in sources.SAMPLE_IMAGES and n not in TUNING][: args.lite0_held_out]
        images = {n: sources.load_sample(n) for n in held}
    names = list(images)
    print(f"efficientnet_lite0: patch {args.patch}, stride {args.stride}, held out: {', '.join(names)}",
          flush=True)
    return measure(con, "efficientnet_lite0", images, args.patch, args.stride, names[: args.naive_images],
                   args.repeat, drilldown=[float(t) for t in args.drilldown.split(",")] if args.drilldown else ())


def fmnist(args, con) -> dict:
    from kql import zoo
    from kql.datasets import load_fashion_mnist
    net = zoo.trained_fmnist_net(Path(tempfile.gettempdir()) / "kql-zoo")
    con.register_model("fmnist", net, **zoo.FMNIST_SPEC)
    test = load_fashion_mnist("test")[0]
    tuning = {f"t{i}": test[i] for i in range(args.fmnist_tune)}
    t0 = time.perf_counter()
    table = con.execute(f"TUNE fmnist ON {', '.join(tuning)} PATCH {args.fmnist_patch} "
                        f"STRIDE {args.fmnist_stride}", **tuning)
    print(table)
    print(f"(TUNE: {time.perf_counter() - t0:.0f} s)", flush=True)
    held = {f"test[{i}]": test[i] for i in range(1000, 1000 + args.fmnist_held_out)}
    print(f"fmnist: patch {args.fmnist_patch}, stride {args.fmnist_stride}, {len(held)} held-out images",
          flush=True)
    return measure(con, "fmnist", held, args.fmnist_patch, args.fmnist_stride, list(held), args.repeat)


def figure(m: dict, path: str, names) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("photo", None), ("exact", "exact")] + [(f"APPROX SSIM {t:g}", (t, "")) for t in (0.9, 0.8)]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(3 * len(cols), 3 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        maps = m["heatmaps"][name]
        exact = maps["exact"]
        lo, hi = float(exact.heatmap.min()), float(exact.heatmap.max())
        for j, (title, key) in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if key is None:
                ax.imshow(exact.image)
                ax.set_title(f"{name}: {exact.label_name}", fontsize=9)
                continue
            r = maps[key]
            ax.imshow(r.heatmap, cmap="inferno", vmin=lo, vmax=hi)
            if key == "exact":
                ax.set_title(f"exact, {m['exact_s'][name]:.1f} s", fontsize=9)
            else:
                rec = m["targets"][key]
                ax.set_title(f"{title}: {rec['plan'][name]}, {rec['time_s'][name]:.1f} s\n"
                             f"SSIM {rec['ssim'][name]:.3f}", fontsize=9)
    fig.suptitle("efficientnet_lite0 occlusion heatmaps (probability of the predicted class), "
                 "held-out photos", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,fmnist")
    ap.add_argument("--patch", type=int, default=16, help="efficientnet_lite0 patch (default 16)")
    ap.add_argument("--stride", type=int, default=16, help="efficientnet_lite0 stride (default 16)")
    ap.add_argument("--lite0-held-out", type=int, default=10, help="held-out photos (default 10)")
    ap.add_argument("--naive-images", type=int, default=3, help="photos NAIVE runs on (default 3)")
    ap.add_argument("--lite0-from", type=int, default=0,
                    help="skip this many unseen photos (to split a run over two processes)")
    ap.add_argument("--photos", choices=("unseen", "samples"), default="unseen",
                    help="lite0's evaluation photos: other packages' photos (default) or held-out skimage samples")
    ap.add_argument("--drilldown", default="0.9", help="targets also run with DRILLDOWN (default 0.9; '' for none)")
    ap.add_argument("--fmnist-patch", type=int, default=4)
    ap.add_argument("--fmnist-stride", type=int, default=2)
    ap.add_argument("--fmnist-tune", type=int, default=12, help="tuning images (default 12)")
    ap.add_argument("--fmnist-held-out", type=int, default=50, help="held-out images (default 50)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per method and image; the minimum counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", default=None, help="write the lite0 exact-vs-approx picture here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    os.environ["KQL_DATA_DIR"] = tempfile.mkdtemp(prefix="kql-bench-")   # never the user's store
    import kql
    con = kql.connect(progress="off")
    results, table = {}, []
    for model in args.models.split(","):
        m = {"efficientnet_lite0": lite0, "fmnist": fmnist}[model](args, con)
        results[model] = m
        table += rows(model, m)
        if model == "efficientnet_lite0" and args.figure:
            figure(m, args.figure, [n for n in m["images"] if n not in m["flat"]][:3])
    head = ["model", "SSIM target", "plan chosen (images)", "held-out", "median SSIM", "min SSIM",
            "≥ target", "computed", "vs naive", "vs exact"]
    for model, m in results.items():
        if m["flat"]:
            print(f"{model}: {len(m['flat'])} held-out image(s) with a flat exact heatmap left out: "
                  f"{', '.join(m['flat'])}")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in table:
        print("| " + " | ".join(r) + " |")
    if args.json:
        slim = {k: {kk: ({f"{t:g}{d}": r for (t, d), r in vv.items()} if kk == "targets" else vv)
                    for kk, vv in v.items() if kk != "heatmaps"} for k, v in results.items()}
        Path(args.json).write_text(json.dumps(slim, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
