"""Theoretical speedup R of incremental over naive occlusion, per model and patch size.

For each torchvision classification model (and efficientnet_lite0) this traces
the graph once per input size (no inference beyond shape propagation; torchvision
models are built with ``weights=None``) and evaluates the cost model of
``kql.planner.cost.theoretical_speedup`` for square patches of 4, 8, 16, 32 and
64 pixels:

- ``r_grid``: over the whole grid of positions at the given stride, exact
  changed regions per position (border positions are cheaper);
- ``r_uniform``: the same grid, every position paying the largest changed
  region of each layer (one patch size per layer, Krypton's batched executor);
- ``r_center``: one patch in the centre of the image (Krypton's Fig. 5).

The grid is laid out as queries lay it out (``kql.planner.geometry.grid``: the
last row and column are aligned to the image edge).

Usage::

    .venv/bin/python scripts/plot_speedup.py [--stride 4] [--out docs/img]

Writes ``speedup.csv`` and ``speedup.png`` into ``--out``. A model that cannot be
built or traced is skipped with the reason printed.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

MODELS = [
    "alexnet", "vgg16", "squeezenet1_0", "resnet18", "resnet50", "googlenet", "inception_v3",
    "densenet121", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
    "efficientnet_lite0", "regnet_y_400mf", "convnext_tiny",
]
PATCHES = (4, 8, 16, 32, 64)


def speedups(name: str, stride: int):
    """Rows (model, input, patch, stride, positions, gflops, r_grid, r_uniform, r_center)."""
    from kql import sources
    from kql.planner.cost import theoretical_speedup
    from kql.planner.geometry import grid
    from kql.planner.graph import trace

    spec = sources.load_model(name)
    h, w = spec.input_size
    graph = trace(spec.module, (spec.channels, h, w))
    rows = []
    for p in PATCHES:
        ys, xs = grid((h, w), (p, p), stride)
        rep = theoretical_speedup(graph, ys, xs, (p, p))
        center = theoretical_speedup(graph, [(h - p) // 2], [(w - p) // 2], (p, p))
        rows.append(dict(model=name, input=f"{h}x{w}", patch=p, stride=stride, positions=ys.size,
                         gflops=round(graph.total_flops / 1e9, 3), r_grid=round(rep.r_grid, 3),
                         r_uniform=round(rep.r_uniform, 3), r_center=round(center.r_grid, 3)))
    return rows


def plot(rows, path: str, stride: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colors = matplotlib.colormaps["tab10"].colors
    for ax, key, title in ((axes[0], "r_grid", f"whole grid, stride {stride}: exact regions per position"),
                           (axes[1], "r_uniform", f"whole grid, stride {stride}: one patch size per layer")):
        for i, m in enumerate(models):
            mr = [r for r in rows if r["model"] == m]
            ax.plot([r["patch"] for r in mr], [r[key] for r in mr], marker="o", ms=3.5,
                    color=colors[i % len(colors)], label=m, linestyle="-" if i < len(colors) else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(PATCHES, [str(p) for p in PATCHES])
        ax.set_xlabel("patch size (pixels, square)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("theoretical speedup R (FLOPs naive / incremental)")
    ticks = [1, 1.5, 2, 3, 4, 6, 8, 12, 16]
    axes[0].set_yticks(ticks, [f"{t:g}" for t in ticks])
    axes[0].set_ylim(0.9, 16)
    axes[1].legend(fontsize=8, loc="upper right", ncol=1, bbox_to_anchor=(1.38, 1.0))
    fig.suptitle("KQL: theoretical speedup of incremental over naive occlusion (planner/cost.py)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img"))
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        try:
            got = speedups(name, args.stride)
        except Exception as e:  # a model we cannot trace is reported, not fatal
            print(f"skip {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            continue
        rows += got
        print(f"{name:20s} " + "  ".join(f"p{r['patch']}: {r['r_grid']:.2f}/{r['r_uniform']:.2f}/"
                                         f"{r['r_center']:.2f}" for r in got)
              + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if not rows:
        print("no model could be traced", file=sys.stderr)
        return 1
    csv_path = os.path.join(args.out, "speedup.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(args.out, "speedup.png")
    plot(rows, png_path, args.stride)
    print(f"wrote {os.path.normpath(csv_path)} and {os.path.normpath(png_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
