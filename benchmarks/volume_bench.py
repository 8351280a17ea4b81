"""Occlusion of 3-D CNNs: KQL exact vs KQL naive vs MONAI vs Captum, side by side.

One process, one single-channel volume, one model at a time. Every method
computes the same window positions -- a cube of ``--cells``^3 positions
(patch ``--patch``, stride ``--stride`` on every axis) centred in a
``--size``^3 volume -- each with a full-volume inference of the model:

  naive   ``kql.occlusion(..., mode='naive', region=box)``: batched full
          re-inference of every occluded volume;
  exact   ``kql.occlusion(..., region=box)``: exact incremental inference at
          the planner's batch size;
  monai   ``monai.visualize.OcclusionSensitivity`` (mask ``--patch``, overlap
          ``1 - stride / patch``, ``n_batch`` ``--batch``, ``mode`` the fill
          value, softmax), given the box's voxels and a forward function that
          pastes them back into the full volume (MONAI has no region of its
          own: its ``b_box`` widens the box by half a mask);
  captum  ``captum.attr.Occlusion`` (window ``(1, p, p, p)``, strides ``(1, s,
          s, s)``, ``perturbations_per_eval`` ``--batch``, baseline the fill
          value) on the softmax probability of the same class, given the box
          the same way.

The variants run interleaved, ``--repeat`` rounds after one warm-up round, so
load on a shared machine hits them alike; the table gives the median wall
time of each, the planner's theoretical speedup R (over the grid, and with the
chosen batches) and achieved / R. It then checks that the four agree: KQL exact
equals KQL naive on every position (probabilities, 1e-5), MONAI's map equals
each voxel's mean probability over the windows covering it, and Captum's
attribution each voxel's mean probability drop.

Random weights (nothing is downloaded), with batch-norm statistics calibrated on
a few phantom volumes (a forward pass in training mode, cumulative averages),
then eval: fresh MONAI networks have identity statistics, which leave deep
3-D DenseNets' activations far from normalised. Usage:

    .venv/bin/python benchmarks/volume_bench.py
    .venv/bin/python benchmarks/volume_bench.py --models resnet18 --size 48 --cells 2 --repeat 1
    .venv/bin/python benchmarks/volume_bench.py --variants naive,monai,captum --json out/vol.json
    .venv/bin/python benchmarks/volume_bench.py --approx      # APPROX SSIM 0.9 on a trained 3-D net
    .venv/bin/python benchmarks/volume_bench.py --variants naive,exact --threads 1   # CPU seconds on a busy machine

``--approx`` measures the approximate path instead, on a 3-D CNN trained on
Fashion-MNIST volumes (``kql.zoo.trained_fmnist3d_net``, cached in
``--zoo``): τ for SSIM 0.9 tuned on 6 volumes (``kql.tune.tune_tensors``), then
on 10 other volumes the SSIM reached at that τ and the time of EXACT and
APPROX (interleaved, after a warm-up), patch 4, stride 2 on 16^3 (7^3 = 343
positions).

``--language`` measures the SSIM contract through the query language on the
same trained net, patch 4, stride 1 on 16^3 (13^3 = 2197 positions, a grid
adaptive refinement can work on): ``TUNE fmnist3d ON <6 volumes saved as
.npy> PATCH 4 STRIDE 1 NORMALIZE NONE`` (in a temporary calibration store),
then on ``--held-out`` other volumes, for each target of ``--targets``, the
plan ``APPROX SSIM s`` chose, the SSIM it reached against EXACT, and the time
of APPROX, EXACT and NAIVE, all three run interleaved per volume after a
warm-up round:

    .venv/bin/python benchmarks/volume_bench.py --language
    .venv/bin/python benchmarks/volume_bench.py --language --targets 0.9 --held-out 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

MODELS = ("densenet121", "resnet18")
VARIANTS = ("naive", "exact", "monai", "captum")


def build(name: str, classes: int) -> nn.Module:
    """MONAI's 3-D network, one input channel, random weights."""
    from monai.networks import nets
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes)
    if name == "resnet18":
        return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=classes)
    raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def calibrate_bn(model: nn.Module, volumes: torch.Tensor) -> nn.Module:
    """Batch-norm running statistics of ``volumes`` (cumulative averages over
    one forward pass in training mode, one volume at a time as well as all of
    them), then eval mode. Weights are untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(volumes)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def phantom(size: int, seed: int) -> torch.Tensor:
    """``kql.datasets.phantom`` (a synthetic CT-like volume) of ``size``^3
    voxels, standardised: ``(1, size, size, size)``."""
    from kql.datasets import phantom as ct_phantom
    v = torch.from_numpy(ct_phantom((size,) * 3, seed=seed))[None]
    return (v - v.mean()) / v.std().clamp_min(1e-6)


class PasteBack(nn.Module):
    """A forward function over the box's voxels: pastes them into the full
    volume, then runs the model (how MONAI and Captum are given the box)."""

    def __init__(self, model: nn.Module, full: torch.Tensor, box: tuple, score=None):
        super().__init__()
        self.model, self.full, self.box, self.score = model, full, box, score

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        x = self.full.expand(len(crop), *self.full.shape[1:]).clone()
        (d0, d1), (h0, h1), (w0, w1) = self.box
        x[:, :, d0:d1, h0:h1, w0:w1] = crop
        out = self.model(x)
        return out if self.score is None else self.score(out)


def voxel_mean(values: np.ndarray, starts, patch, shape) -> np.ndarray:
    """Each voxel of a ``shape`` box: the mean of ``values`` (one per grid
    cell) over the windows covering it; ``starts`` per axis, relative to
    the box."""
    total = np.zeros(shape)
    count = np.zeros(shape)
    for i, a in enumerate(starts[0]):
        for j, b in enumerate(starts[1]):
            for k, c in enumerate(starts[2]):
                sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                total[sl] += values[i, j, k]
                count[sl] += 1
    return total / count


def bench_model(name: str, opts) -> dict:
    import kql
    from captum.attr import Occlusion as CaptumOcclusion
    from monai.visualize import OcclusionSensitivity as MonaiOS

    torch.manual_seed(0)
    model = build(name, opts.classes)
    calib = torch.stack([phantom(opts.size, seed) for seed in range(1, 5)])
    model = calibrate_bn(model, calib)
    S, p, s, k = opts.size, opts.patch, opts.stride, opts.cells
    x = phantom(opts.size, 0)[None]                                   # (1, 1, S, S, S)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    cls = int(probs.argmax())
    side = p + (k - 1) * s
    lo = (S - side) // 2
    box = ((lo, lo + side),) * 3
    region = box                                                      # (start, stop) per axis
    fill = float(opts.fill)
    crop = x[:, :, lo:lo + side, lo:lo + side, lo:lo + side].clone()
    softmax = lambda out: out.softmax(1)  # noqa: E731
    paste = PasteBack(model, x, box).eval()
    paste_p = PasteBack(model, x, box, softmax).eval()
    log(f"\n=== {name} (MONAI, spatial_dims=3, 1 channel, {opts.classes} classes, random weights, BN "
        f"calibrated on 4 phantoms): volume {S}^3, patch {p}^3, stride {s}^3, box {box[0]} on every axis "
        f"= {k}^3 = {k ** 3} positions, fill {fill:g}; class {cls} (p = {float(probs[cls]):.4f})")

    variants = {
        "naive": lambda: kql.occlusion(model, x, (p, p, p), (s, s, s), target=cls, baseline=fill,
                                       region=region, mode="naive")[0],
        "exact": lambda: kql.occlusion(model, x, (p, p, p), (s, s, s), target=cls, baseline=fill,
                                       region=region)[0],
        "monai": lambda: MonaiOS(paste, mask_size=p, n_batch=opts.batch, verbose=False, mode=fill,
                                 overlap=overlap(opts), activate=softmax)(crop)[0],
        "captum": lambda: CaptumOcclusion(paste_p).attribute(crop, (1, p, p, p), strides=(1, s, s, s),
                                                             baselines=fill, target=cls,
                                                             perturbations_per_eval=opts.batch),
    }
    wanted = [v for v in opts.variants.split(",") if v]
    variants = {key: fn for key, fn in variants.items() if key in wanted}
    out, times, skipped = {}, {key: [] for key in variants}, {}
    cpu = {key: [] for key in variants}
    for round_ in range(opts.repeat + 1):                            # round 0 warms up
        for key, fn in list(variants.items()):
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            try:
                out[key] = fn()
            except (ValueError, NotImplementedError) as e:              # the engine does not take volumes yet
                skipped[key] = str(e).splitlines()[0]
                log(f"{name}: {key} cannot run: {skipped[key]}")
                del variants[key], times[key], cpu[key]
                continue
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            used = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime    # user + system, every thread
            if round_:
                times[key].append(dt)
                cpu[key].append(used)
            log(f"{name} round {round_} {key}: {dt:.2f} s (CPU {used:.2f} s, system {r1.ru_stime - r0.ru_stime:.2f} s)")
    med = {key: statistics.median(v) for key, v in times.items() if v}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items() if v}

    row: dict = {"model": name, "size": S, "patch": p, "stride": s, "positions": k ** 3, "class": cls,
                 "seconds": med, "cpu seconds": med_cpu, "rounds": opts.repeat, "skipped": skipped}
    if "exact" in out:
        plan = out["exact"].plan
        row["r_grid"], row["r_batched"] = float(plan.cost.r_grid), float(plan.r_batched)
        row["batch_exact"] = int(plan.batch_size)
    if "naive" in out:
        row["batch_naive"] = int(out["naive"].plan.batch_size)
    if "naive" in med and "exact" in med:
        row["speedup"] = med["naive"] / med["exact"]
        row["achieved_over_r_batched"] = row["speedup"] / row["r_batched"]
        row["cpu speedup"] = med_cpu["naive"] / med_cpu["exact"]
    for other in ("monai", "captum"):
        if other in med and "exact" in med:
            row[f"{other} / exact"] = med[other] / med["exact"]
        if other in med and "naive" in med:
            row[f"{other} / naive"] = med[other] / med["naive"]

    # Agreement. The reference heatmap: KQL naive's, else exact's, else none.
    ref_key = "naive" if "naive" in out else "exact" if "exact" in out else None
    if ref_key is not None:
        heat = np.asarray(out[ref_key].heatmap, dtype=np.float64)
        row["heatmap range"] = [float(heat.min()), float(heat.max())]
        starts = [np.arange(k) * s] * 3
        if "exact" in out and "naive" in out:
            row["exact vs naive (max |d|)"] = float(np.abs(out["exact"].heatmap - heat).max())
        if "monai" in out:
            got = out["monai"].as_tensor()[0, cls].double().numpy()
            row["monai vs kql (max |d|)"] = float(np.abs(got - voxel_mean(heat, starts, (p,) * 3, got.shape)).max())
        if "captum" in out:
            got = out["captum"][0, 0].double().numpy()
            want = voxel_mean(float(probs[cls]) - heat, starts, (p,) * 3, got.shape)
            row["captum vs kql (max |d|)"] = float(np.abs(got - want).max())
    elif "monai" in out and "captum" in out:
        got = out["monai"].as_tensor()[0, cls].double().numpy()
        row["monai vs captum (max |d|)"] = float(np.abs(float(probs[cls]) - got
                                                        - out["captum"][0, 0].double().numpy()).max())
    log(json.dumps(row, indent=1))
    return row


def bench_approx(opts) -> dict:
    import kql
    from kql import zoo
    from kql.datasets import load_fashion_mnist
    from kql.tune import heatmap_ssim, tune_tensors
    net = zoo.trained_fmnist3d_net(opts.zoo)
    images, _ = load_fashion_mnist("test")
    t0 = time.perf_counter()
    cal = tune_tensors(net, zoo.fmnist_volumes(images[:6], seed=0), 4, 2)
    tau = cal.tau_for(0.9)
    log(f"\n=== APPROX SSIM 0.9 on fmnist3d (16^3, patch 4, stride 2): tuned on {cal.n_images} volumes in "
        f"{time.perf_counter() - t0:.0f} s: τ = {tau:g} (fit {cal.fit_text(short=True)})")
    held = zoo.fmnist_volumes(images[500:510], seed=500)
    run = {"exact": lambda v, c: kql.occlusion(net, v, 4, 2, target=c)[0],
           "approx": lambda v, c: kql.occlusion(net, v, 4, 2, target=c, mode="approx", tau=tau)[0]}
    classes = [r.label for r in kql.occlusion(net, held, 4, 2)]             # also the warm-up
    times, ssim = {k: 0.0 for k in run}, []
    for n, c in enumerate(classes):
        out = {}
        for key, fn in run.items():
            t = time.perf_counter()
            out[key] = fn(held[n:n + 1], c)
            times[key] += time.perf_counter() - t
        if np.ptp(out["exact"].heatmap) >= 1e-3:
            ssim.append(heatmap_ssim(out["exact"].heatmap, out["approx"].heatmap))
    row = {"tau": tau, "tuning ssim": cal.ssim, "held-out ssim": ssim, "seconds": times,
           "speedup": times["exact"] / times["approx"],
           "share reaching 0.9": float(np.mean(np.asarray(ssim) >= 0.9))}
    log(json.dumps(row, indent=1))
    log(f"\n| τ (SSIM 0.9) | held-out volumes | SSIM mean / min | reaching 0.9 | EXACT | APPROX | speedup |\n"
        f"|---|---|---|---|---|---|---|\n| {tau:g} | {len(ssim)} | {np.mean(ssim):.3f} / {np.min(ssim):.3f} | "
        f"{100 * row['share reaching 0.9']:.0f} % | {times['exact']:.1f} s | {times['approx']:.1f} s | "
        f"{row['speedup']:.2f}x |")
    return row


def bench_language(opts) -> dict:
    import tempfile
    import kql
    from kql import zoo
    from kql.datasets import load_fashion_mnist
    from kql.tune import heatmap_ssim
    net = zoo.trained_fmnist3d_net(opts.zoo)
    images, _ = load_fashion_mnist("test")
    folder = tempfile.mkdtemp(prefix="kql-volume-language-")
    os.environ["KQL_DATA_DIR"] = os.path.join(folder, "store")      # never the user's store
    os.makedirs(os.path.join(folder, "tune"))
    for i, v in enumerate(zoo.fmnist_volumes(images[:6], seed=0)):
        np.save(os.path.join(folder, "tune", f"v{i}.npy"), v[0].numpy())
    held = zoo.fmnist_volumes(images[500:500 + opts.held_out], seed=500)
    con = kql.connect(progress="off")
    con.register_model("fmnist3d", net)
    t0 = time.perf_counter()
    table = con.execute(f"TUNE fmnist3d ON '{folder}/tune' PATCH 4 STRIDE 1 NORMALIZE NONE")
    log(f"\n=== APPROX SSIM on fmnist3d through the language (16^3, patch 4, stride 1: 13^3 = 2197 positions)"
        f"\nTUNE on 6 volumes in {time.perf_counter() - t0:.0f} s\n{table}")
    q = "SELECT HEATMAP FROM v USING fmnist3d PATCH 4 STRIDE 1 NORMALIZE NONE"
    targets = [float(t) for t in opts.targets.split(",")]
    runs = {"exact": f"{q} EXACT", "naive": f"{q} NAIVE"}
    runs.update({f"ssim {t:g}": f"{q} APPROX SSIM {t:g}" for t in targets})
    v0 = kql.Volume(held[0, 0].numpy())
    for text in runs.values():                                       # warm-up (numba, runtime model)
        con.execute(text, v=v0)
    times = {k: [] for k in runs}
    per = {t: {"plan": [], "ssim": [], "computed": [], "estimated": []} for t in targets}
    for n in range(len(held)):
        v = kql.Volume(held[n, 0].numpy())
        out = {}
        for key, text in runs.items():
            t = time.perf_counter()
            out[key] = con.execute(text, v=v)
            times[key].append(time.perf_counter() - t)
        exact = out["exact"].heatmap
        assert np.allclose(exact, out["naive"].heatmap, atol=1e-5)
        for t in targets:
            r = out[f"ssim {t:g}"]
            chosen = r.plan.contract.chosen.name if getattr(r.plan, "contract", None) else r.mode
            per[t]["plan"].append(chosen)
            per[t]["ssim"].append(heatmap_ssim(exact, r.heatmap) if np.ptp(exact) >= 1e-4 else None)
            per[t]["computed"].append(1.0 if r.computed is None else float(r.computed.mean()))
            per[t]["estimated"].append(r.estimated_ssim)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["| target | plan chosen | SSIM per volume (vs EXACT) | reached | computed (median) | "
             "APPROX | EXACT | NAIVE | over EXACT | over NAIVE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        got = [x for x in per[t]["ssim"] if x is not None]
        plans = ", ".join(f"{p} x{per[t]['plan'].count(p)}" for p in sorted(set(per[t]["plan"])))
        a = med[f"ssim {t:g}"]
        lines.append(f"| {t:g} | {plans} | {' '.join(f'{x:.3f}' for x in got)} | "
                     f"{sum(x >= t for x in got)}/{len(got)} | {100 * statistics.median(per[t]['computed']):.0f} % | "
                     f"{1000 * a:.0f} ms | {1000 * med['exact']:.0f} ms | {1000 * med['naive']:.0f} ms | "
                     f"{med['exact'] / a:.2f}x | {med['naive'] / a:.2f}x |")
    log("\n(median wall time per volume, query total)\n" + "\n".join(lines))
    return {"targets": {str(t): per[t] for t in targets}, "seconds": times, "median": med}


def overlap(opts) -> float:
    """MONAI's overlap for a step of ``--stride`` (it steps by ``int(mask * (1 - overlap))``)."""
    return 1 - (opts.stride + 1e-6) / opts.patch


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| model | volume | patch / stride | positions | R grid | R batched | KQL naive | KQL exact | "
            "MONAI | Captum | naive / exact | achieved / R batched | MONAI / exact | Captum / exact | "
            "CPU naive / exact | CPU achieved / R |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sec = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['size']}^3 | {r['patch']}^3 / {r['stride']}^3 | {r['positions']} | "
            f"{fmt(r.get('r_grid'))} | {fmt(r.get('r_batched'))} | "
            + " | ".join(f"{fmt(sec.get(v), '.1f')} s" if v in sec else "-" for v in VARIANTS)
            + f" | {fmt(r.get('speedup'))}x | {fmt(r.get('achieved_over_r_batched'))} | "
            f"{fmt(r.get('monai / exact'))}x | {fmt(r.get('captum / exact'))}x | {fmt(r.get('cpu speedup'))}x | "
            f"{fmt(r['cpu speedup'] / r['r_batched'] if 'cpu speedup' in r else None)} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--size", type=int, default=64, help="the volume's side (voxels)")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--cells", type=int, default=3, help="positions per axis (a centred cube of them)")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--fill", type=float, default=0.0, help="what the patch holds (standardised units)")
    ap.add_argument("--batch", type=int, default=8, help="MONAI's n_batch and Captum's perturbations_per_eval")
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds after the warm-up round")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's threads (default: torch's own); with 1 on a shared machine, "
                         "read the CPU seconds (user + system), which other jobs' load hardly moves")
    ap.add_argument("--json", default=None)
    ap.add_argument("--approx", action="store_true", help="measure APPROX SSIM 0.9 on a trained 3-D net instead")
    ap.add_argument("--zoo", default="/tmp/kql-zoo", help="where the trained 3-D net is cached")
    ap.add_argument("--language", action="store_true",
                    help="measure TUNE and APPROX SSIM through the query language on the trained 3-D net")
    ap.add_argument("--targets", default="0.8,0.9,0.95", help="--language: the SSIM targets")
    ap.add_argument("--held-out", type=int, default=10, help="--language: volumes never used by TUNE")
    opts = ap.parse_args(argv)
    if opts.patch + (opts.cells - 1) * opts.stride > opts.size:
        raise SystemExit("the cube of positions does not fit the volume: lower --cells or --stride")
    if not 1 <= opts.stride <= opts.patch or int(opts.patch * (1 - overlap(opts))) != opts.stride:
        raise SystemExit("MONAI cannot step the mask by --stride: give 1 <= stride <= patch "
                         "(its step is int(patch * (1 - overlap)))")
    warnings.filterwarnings("ignore")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load average (1, 5, 15 min)": os.getloadavg(), "machine": platform.machine()}
    log(f"torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, load average "
        f"{' '.join(f'{v:.1f}' for v in info['load average (1, 5, 15 min)'])}")
    if opts.approx or opts.language:
        row = (bench_language if opts.language else bench_approx)(opts)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump({"machine": info, "approx": row}, f, indent=1)
        return 0
    rows = [bench_model(name, opts) for name in opts.models.split(",")]
    info["load average after"] = os.getloadavg()
    log("\n" + table(rows))
    log(f"load average after: {' '.join(f'{v:.1f}' for v in info['load average after'])}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"machine": info, "options": vars(opts), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
