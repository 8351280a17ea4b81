"""Occlusion benchmark: naive re-inference vs Captum vs KQL exact, side by side.

One process, one image, one model, one patch/stride/region at a time; for each
model it runs

  naive   KQL's NAIVE mode: batched full re-inference of every occluded image
          (``SELECT ... NAIVE BATCH n``), the baseline every speedup is over;
  captum  ``captum.attr.Occlusion`` with its fastest ``perturbations_per_eval``
          (swept on a small sub-region first), scoring softmax probabilities of
          the same label, on the same preprocessed input tensor, with the same
          window, stride and fill colour;
  exact   KQL's default mode: exact incremental inference (Krypton's IVM with
          MQO batching), at the planner's batch size and, when that differs,
          also at the naive batch size (for the memory comparison).

and prints positions, total and per-position time, speedups, the cost model's
theoretical speedup R, achieved/theoretical, peak memory and the agreement of
the heatmaps. Usage (``make bench`` runs it with the defaults):

    .venv/bin/python benchmarks/occlusion_bench.py
    .venv/bin/python benchmarks/occlusion_bench.py --models resnet18 --region 0,0,224,24 --repeat 1
    .venv/bin/python benchmarks/occlusion_bench.py --models vgg16 --batch 16 --json out/bench.json

Captum is restricted to the query's region by handing it only the region's
pixels and a forward function that pastes them back into the full input tensor
before calling the model: it then evaluates exactly the positions of the KQL
grid (when the region's size is a whole number of strides plus the patch,
which ``--region auto`` ensures), each with a full-image inference, and its
attribution map can be checked against the naive heatmap.

Peak memory is measured apart from the timing, once per method, each in a
fresh child process (``--memory-child``): the RSS peak (``/proc/self/statm``
sampled every 2 ms by ``kql.executor.memory.PeakMemory``) above the RSS right
before the run, after a warm-up on a few positions. The child runs with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor-sized block is
mapped on allocation and unmapped on free and RSS follows the live tensors.
Measured in the timing process instead, glibc's adaptive threshold keeps freed
blocks of earlier runs resident and the figure depends on what ran before (we
saw exact resnet18 at 651 MiB in-process and 113 MiB isolated); the fixed
threshold costs page faults, which is why timing does not run under it. The
in-process RSS peaks are kept in the JSON (``peak_rss_bytes_in_process``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

import kql
import kql.parser
from kql.executor.common import probabilities, reference
from kql.planner.cost import theoretical_speedup
from kql.executor.memory import PeakMemory
from kql.planner.geometry import grid_positions

CLOCK = time.perf_counter
DEFAULT_MODELS = "vgg16,resnet18,inception_v3"
KRYPTON_CPU = {"vgg16": 5.4, "resnet18": 2.1, "inception_v3": 1.5}  # exact, patch 16 stride 4


# ----------------------------------------------------------------------------- memory
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


def settle() -> None:
    """Give freed memory back to the OS between methods: Python garbage, then
    glibc's free lists (torch's CPU allocator is plain malloc, no cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    time.sleep(0.05)


def measure(fn: Callable[[], Any]) -> tuple[Any, float, Optional[int], float]:
    """Run ``fn`` once: (its result, wall seconds, peak RSS above baseline in
    bytes, CPU seconds of the whole process). CPU / wall below the thread
    count means the threads waited (other processes on the cores, or serial
    Python); the wall time is what is reported."""
    settle()
    with PeakMemory("cpu") as mem:
        c0 = time.process_time()
        t0 = CLOCK()
        out = fn()
        seconds = CLOCK() - t0
        cpu = time.process_time() - c0
    return out, seconds, mem.peak, cpu


MMAP_THRESHOLD = 65536


def isolated_peak(job: dict, opts) -> Optional[int]:
    """Peak memory of one method in a fresh child process (see the module
    docstring); None if the child fails (its error is printed)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(opts.threads),
           "--memory-child", json.dumps(job)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(line.split()[1])
    log(f"  memory child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}")
    return None


def memory_child(job: dict) -> int:
    """Child side of :func:`isolated_peak`: warm up, run once, print the peak."""
    warnings.simplefilter("ignore")
    con = kql.connect(progress="off", **({"memory_limit": job["memory_limit"]} if job.get("memory_limit") else {}))
    if job["kind"] == "kql":
        con.execute(job["warmup"])
        settle()
        with PeakMemory("cpu") as mem:
            con.execute(job["query"])
    else:
        plan = con.plan(kql.parser.parse(job["base"]), {})
        model = plan.spec.module.eval()
        region, patch, stride = tuple(job["region"]), tuple(job["patch"]), tuple(job["stride"])
        run_captum(model, plan.input, plan.fill, tuple(job["warm"]), patch, stride, job["label"], 3)
        settle()
        with PeakMemory("cpu") as mem:
            run_captum(model, plan.input, plan.fill, region, patch, stride, job["label"], job["ppe"])
    print(f"PEAK {mem.peak}", flush=True)
    return 0


# ----------------------------------------------------------------------------- helpers
@dataclass
class Method:
    """One row of the results: a method at one batch size, over all repeats."""
    key: str
    label: str
    batch: Optional[int]
    positions: int
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peaks: list[Optional[int]] = field(default_factory=list)  # in the timing process
    isolated_peak: Optional[int] = None  # in a fresh child process (reported)
    r_grid: Optional[float] = None
    r_uniform: Optional[float] = None
    r_batched: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def cores(self) -> float:
        """CPU seconds / wall seconds of the fastest run."""
        i = int(np.argmin(self.times))
        return self.cpu[i] / self.times[i] if self.times[i] > 0 else float("nan")

    @property
    def per_position(self) -> float:
        return self.best / self.positions

    @property
    def peak(self) -> Optional[int]:
        """The reported peak: isolated if measured, else the in-process one."""
        if self.isolated_peak is not None:
            return self.isolated_peak
        known = [p for p in self.peaks if p is not None]
        return max(known) if known else None


def mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def fmt(x: Optional[float], spec: str = ".2f", missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def parse_region(text: str):
    if text == "auto":
        return None
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--region takes 'auto' or x0,y0,x1,y1 (pixels of the model input), got {text!r}")
    return x0, y0, x1, y1


def region_sql(r) -> str:
    return f" REGION ({r[0]}, {r[1]}, {r[2]}, {r[3]})"


def captum_grid(rh: int, rw: int, ph: int, pw: int, sy: int, sx: int) -> tuple[int, int]:
    """Windows Captum's Occlusion slides over an rh x rw input: ceil((n - k)/s) + 1 per axis."""
    return (math.ceil((rh - ph) / sy) + 1, math.ceil((rw - pw) / sx) + 1)


def aligned(r, patch, stride) -> bool:
    """Whether the KQL grid over the region ends exactly at its edges (then Captum's
    windows are the same positions; otherwise its last row/column is cut off)."""
    (ph, pw), (sy, sx) = patch, stride
    return (r[3] - r[1] - ph) % sy == 0 and (r[2] - r[0] - pw) % sx == 0


# ----------------------------------------------------------------------------- captum
class BandForward(torch.nn.Module):
    """Captum's forward function: paste the (occluded) region back into the full
    input tensor, run the model, return class probabilities."""

    def __init__(self, model: torch.nn.Module, x_full: torch.Tensor, region):
        super().__init__()
        self.model = model
        self.x_full = x_full
        self.x0, self.y0, self.x1, self.y1 = region
        H, W = x_full.shape[-2:]
        self.whole = region == (0, 0, W, H)

    def forward(self, band: torch.Tensor) -> torch.Tensor:
        if self.whole:
            full = band
        else:
            full = self.x_full.expand(band.shape[0], -1, -1, -1).clone()
            full[:, :, self.y0:self.y1, self.x0:self.x1] = band
        return probabilities(self.model(full))


def run_captum(model, x_full, fill, region, patch, stride, label, ppe):
    from captum.attr import Occlusion
    (ph, pw), (sy, sx) = patch, stride
    x0, y0, x1, y1 = region
    C = x_full.shape[0]
    band = x_full[:, y0:y1, x0:x1].unsqueeze(0).contiguous()
    occ = Occlusion(BandForward(model, x_full, region))
    return occ.attribute(band, sliding_window_shapes=(C, ph, pw), strides=(C, sy, sx),
                         baselines=fill.view(1, C, 1, 1).to(band.dtype), target=int(label),
                         perturbations_per_eval=int(ppe))


def attribution_from_heatmap(heat: np.ndarray, p0: float, ys, xs, region, patch) -> np.ndarray:
    """What Captum's Occlusion returns for these per-position probabilities: at
    each pixel the mean, over the windows covering it, of ``p0 - p(position)``."""
    x0, y0, x1, y1 = region
    (ph, pw) = patch
    total = np.zeros((y1 - y0, x1 - x0))
    count = np.zeros_like(total)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            total[y - y0:y - y0 + ph, x - x0:x - x0 + pw] += p0 - float(heat[i, j])
            count[y - y0:y - y0 + ph, x - x0:x - x0 + pw] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def _batch_sizes(plan) -> list[int]:
    """Positions per batch of a plan: exact plans batch by patch size (``plan.bounds``,
    at most ``plan.batch_size`` each), naive ones uniformly."""
    bounds = getattr(plan, "bounds", None)
    if bounds is None:
        n, b = plan.n_positions, plan.batch_size
        return [min(b, n - s) for s in range(0, n, b)]
    return np.diff(np.asarray(bounds)).astype(int).tolist()


# ----------------------------------------------------------------------------- one model
def log(msg: str = "") -> None:
    print(msg, flush=True)


def bench_model(name: str, opts) -> dict:
    (ph, pw) = (opts.patch, opts.patch)
    (sy, sx) = (opts.stride, opts.stride)
    con = kql.connect(progress="off", **({"memory_limit": opts.memory_limit} if opts.memory_limit else {}))

    # The model: its own input size unless --size says otherwise.
    spec = con.catalog.model(name)
    using = name
    if opts.size and spec.input_size is not None and tuple(spec.input_size) != (opts.size, opts.size):
        using = f"{name}_{opts.size}"
        con.register_model(using, spec.module, input_size=(opts.size, opts.size), mean=spec.mean,
                           std=spec.std, labels=spec.class_names, channels=spec.channels)
    base = f"SELECT HEATMAP FROM {opts.image} USING {using} PATCH {opts.patch} STRIDE {opts.stride}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan0 = con.plan(kql.parser.parse(base), {})
    model = plan0.spec.module.eval()
    x_full, fill = plan0.input, plan0.fill
    C, H, W = x_full.shape
    label, p0, _ = reference(plan0, model)
    base += f" LABEL {label}"
    log(f"\n=== {name}: input {C}x{H}x{W}, {plan0.graph.total_flops / 1e9:.2f} GFLOPs (multiply-adds) "
        f"per image, weights: {plan0.spec.weights}; label {label} (top class of the unoccluded image, "
        f"p = {p0:.4f})")

    # Whole-image theoretical speedup, for comparison with Krypton's published figures.
    gy, gx = grid_positions(0, H, ph, sy), grid_positions(0, W, pw, sx)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    whole = theoretical_speedup(plan0.graph, yy.ravel(), xx.ravel(), (ph, pw))
    # Krypton's figures are for the model's own input size, patch 16, stride 4.
    krypton = KRYPTON_CPU.get(name) if (using == name and (ph, sy) == (16, 4)) else None
    log(f"whole image ({len(gy)}x{len(gx)} = {yy.size} positions): R = {whole.r_grid:.2f} over the grid, "
        f"{whole.r_uniform:.2f} with one patch size per layer"
        + (f"; Krypton's published CPU speedup {krypton}x" if krypton else ""))

    def plan_of(query):
        return con.plan(kql.parser.parse(query), {})

    def execute(query):
        return con.execute(query)

    # Batch sizes: --batch for every KQL run, else each mode's planner choice.
    def naive_batch(region_clause):
        return opts.batch or plan_of(base + region_clause + " NAIVE").batch_size

    # Warm-up: every method once on a couple of positions (Numba compile/cache load,
    # torch's first-call costs, Captum imports).
    warm = (0, 0, min(W, pw + 2 * sx), ph)
    t_warm = {}
    for key, q in (("naive", base + region_sql(warm) + " NAIVE BATCH 3"),
                   ("exact", base + region_sql(warm) + " BATCH 3")):
        t0 = CLOCK()
        execute(q)
        t_warm[key] = CLOCK() - t0
    if not opts.no_captum:
        t0 = CLOCK()
        run_captum(model, x_full, fill, warm, (ph, pw), (sy, sx), label, 3)
        t_warm["captum"] = CLOCK() - t0
    log("warm-up (3 positions): " + ", ".join(f"{k} {v:.2f} s" for k, v in t_warm.items()))

    # The region.
    ncols = len(grid_positions(0, W, pw, sx))
    if opts.region is None:
        k = min(ncols, 16)
        calib = (0, 0, pw + (k - 1) * sx, ph)
        b = min(naive_batch(region_sql(calib)), k)
        t0 = CLOCK()
        execute(base + region_sql(calib) + f" NAIVE BATCH {b}")
        per = (CLOCK() - t0) / k
        rows = len(grid_positions(0, H, ph, sy))
        want = max(1, min(rows, round(opts.target / (per * ncols))))
        band_h = ph + (want - 1) * sy
        y0 = ((H - band_h) // 2) // sy * sy
        x1 = pw + ((W - pw) // sx) * sx  # whole strides: Captum's windows = KQL's positions
        region = (0, y0, x1, y0 + band_h)
        log(f"region auto: {region} = {want} row(s) x {ncols if x1 == W else len(grid_positions(0, x1, pw, sx))} "
            f"positions, centred; naive measured at {per * 1e3:.0f} ms/position on {k} positions, "
            f"so naive ≈ {per * want * ncols:.0f} s (target {opts.target:.0f} s)")
    else:
        region = opts.region
        log(f"region: {region}")
    rq = region_sql(region)

    # Plans of the timed queries (grid, batch, R) and the rows of the table.
    B_naive = naive_batch(rq)
    q_naive = base + rq + f" NAIVE BATCH {B_naive}"
    q_exact = base + rq + (f" BATCH {opts.batch}" if opts.batch else "")
    p_naive, p_exact = plan_of(q_naive), plan_of(q_exact)
    n = p_naive.n_positions
    methods: dict[str, Method] = {}
    methods["naive"] = Method("naive", "KQL naive", p_naive.batch_size, n)
    exacts = [("exact", q_exact, p_exact)]
    if p_exact.batch_size != B_naive:
        q_same = base + rq + f" BATCH {B_naive}"
        exacts.append(("exact_same", q_same, plan_of(q_same)))
    for key, q, p in exacts:
        methods[key] = Method(key, "KQL exact" + (f" @naive B" if key == "exact_same" else ""),
                              p.batch_size, p.n_positions, r_grid=p.cost.r_grid, r_uniform=p.cost.r_uniform,
                              r_batched=p.r_batched,
                              extra={"cutoff": p.cutoff, "batch_sizes": _batch_sizes(p),
                                     "est_bytes": int(p.view_bytes + p.batch_size * p.per_position_bytes)})
    methods["naive"].extra["est_bytes"] = int(p_naive.batch_size * p_naive.per_position_bytes)
    sizes = _batch_sizes(p_exact)
    log(f"grid {len(p_naive.ys)}x{len(p_naive.xs)} = {n} positions; naive batch {B_naive}, exact batch "
        f"≤{p_exact.batch_size} ({len(sizes)} batches of {min(sizes)}..{max(sizes)}); R over the region {p_exact.cost.r_grid:.2f} (grid), "
        f"{p_exact.cost.r_uniform:.2f} (one patch size per layer), {p_exact.r_batched:.2f} (chosen batches "
        f"and cutoff {p_exact.cutoff or 'none'})")

    # Captum: the fastest perturbations_per_eval on a one-row sub-region
    # (candidates interleaved over --sweep-repeat passes, min per candidate).
    sweep = {}
    if not opts.no_captum:
        cands = sorted({int(v) for v in opts.captum_ppe.split(",")})
        rw = region[2] - region[0]
        kmax = min(opts.sweep_positions, math.ceil((rw - pw) / sx) + 1)
        sub = (region[0], region[1], min(region[2], region[0] + pw + (kmax - 1) * sx), region[1] + ph)
        nsub = int(np.prod(captum_grid(sub[3] - sub[1], sub[2] - sub[0], ph, pw, sy, sx)))
        if len(cands) > 1:
            for _ in range(opts.sweep_repeat):
                for ppe in cands:
                    _, t, _, _ = measure(lambda: run_captum(model, x_full, fill, sub, (ph, pw), (sy, sx),
                                                            label, ppe))
                    sweep[ppe] = min(sweep.get(ppe, math.inf), t / nsub)
            best_ppe = min(sweep, key=sweep.get)
            log(f"captum perturbations_per_eval sweep on {sub} ({nsub} positions, min of "
                f"{opts.sweep_repeat}): " + ", ".join(f"{k}: {v * 1e3:.0f} ms/pos" for k, v in sweep.items())
                + f" -> {best_ppe}")
        else:
            best_ppe = cands[0]
        gh, gw = captum_grid(region[3] - region[1], region[2] - region[0], ph, pw, sy, sx)
        methods["captum"] = Method("captum", "Captum Occlusion", best_ppe, gh * gw,
                                   extra={"ppe_sweep_ms_per_position": {str(k): v * 1e3 for k, v in sweep.items()},
                                          "grid": [gh, gw]})

    # Timed runs, interleaved so drift on a shared machine hits every method alike.
    order = ["naive"] + (["captum"] if "captum" in methods else []) + [k for k, _, _ in exacts]
    queries = {"naive": q_naive, **{k: q for k, q, _ in exacts}}
    results: dict[str, Any] = {}
    for rep in range(opts.repeat):
        for key in order:
            m = methods[key]
            if key == "captum":
                fn = lambda: run_captum(model, x_full, fill, region, (ph, pw), (sy, sx), label, m.batch)  # noqa: E731
            else:
                fn = (lambda q: lambda: execute(q))(queries[key])
            out, t, peak, cpu = measure(fn)
            m.times.append(t)
            m.cpu.append(cpu)
            m.peaks.append(peak)
            results[key] = out
            if key != "captum":
                m.extra["timings"] = {k: round(v, 4) for k, v in out.timings.items()}
                # the engine's own RSS peak of the occlusion stage alone (no reference inference)
                m.extra.setdefault("engine_peak_bytes", []).append(getattr(out, "peak_memory", None))
            log(f"  run {rep + 1}/{opts.repeat} {m.label:<20s} {t:8.2f} s  {t / m.positions * 1e3:8.1f} ms/pos  "
                f"peak +{mib(peak)} MiB  (cpu {cpu / t:.1f} cores)")
            del out
        settle()

    # Peak memory of each method alone, in a fresh process each (not timed).
    if opts.isolated_memory and using == name:
        warm_q = base + region_sql(warm)
        for key in order:
            m = methods[key]
            if key == "captum":
                job = {"kind": "captum", "base": base, "region": list(region), "warm": list(warm),
                       "patch": [ph, pw], "stride": [sy, sx], "label": label, "ppe": m.batch}
            else:
                mode = " NAIVE" if key == "naive" else ""
                job = {"kind": "kql", "query": queries[key], "warmup": warm_q + mode + " BATCH 3",
                       "memory_limit": opts.memory_limit}
            m.isolated_peak = isolated_peak(job, opts)
            log(f"  isolated peak memory {m.label:<20s} +{mib(m.isolated_peak)} MiB")
        # naive at exact's batch too (memory only), so both batch sizes compare like with like
        if p_exact.batch_size != B_naive:
            job = {"kind": "kql", "query": base + rq + f" NAIVE BATCH {p_exact.batch_size}",
                   "warmup": warm_q + " NAIVE BATCH 3", "memory_limit": opts.memory_limit}
            methods["naive"].extra["isolated_peak_at_exact_batch"] = (p_exact.batch_size, isolated_peak(job, opts))
            log(f"  isolated peak memory {'KQL naive @exact B':<20s} "
                f"+{mib(methods['naive'].extra['isolated_peak_at_exact_batch'][1])} MiB")

    # Agreement: exact vs naive heatmaps; Captum's attribution vs the one the naive heatmap implies.
    naive_res = results["naive"]
    checks = {}
    for key, _, _ in exacts:
        checks[f"{key}_vs_naive_max_abs"] = float(np.max(np.abs(results[key].heatmap - naive_res.heatmap)))
    if "captum" in results:
        attr = results["captum"].detach()[0].numpy()
        if aligned(region, (ph, pw), (sy, sx)):
            want = attribution_from_heatmap(naive_res.heatmap, naive_res.p_original, naive_res.ys,
                                            naive_res.xs, region, (ph, pw))
            checks["captum_vs_naive_max_abs"] = float(np.max(np.abs(attr - want[None])))
        else:
            checks["captum_vs_naive_max_abs"] = None
    results.clear()
    return {"model": name, "using": using, "input": [C, H, W], "gflops": plan0.graph.total_flops / 1e9,
            "weights": plan0.spec.weights, "label": label, "p_original": p0, "region": list(region),
            "grid": [len(p_naive.ys), len(p_naive.xs)], "positions": n,
            "r_whole_image": {"r_grid": whole.r_grid, "r_uniform": whole.r_uniform},
            "krypton_cpu_speedup": krypton, "warmup_s": t_warm,
            "methods": methods, "checks": checks}


# ----------------------------------------------------------------------------- report
COLS = ("method", "batch", "positions", "total s", "ms/pos", "cores", "x naive", "x captum",
        "R grid", "R unif", "R batch", "ach/Rg", "ach/Rb", "peak MiB")


def table_rows(res: dict) -> list[tuple]:
    ms = res["methods"]
    naive = ms["naive"]
    captum = ms.get("captum")
    rows = []
    for key in ("naive", "captum", "exact", "exact_same"):
        m = ms.get(key)
        if m is None:
            continue
        x_naive = naive.per_position / m.per_position
        x_captum = captum.per_position / m.per_position if captum else None
        batch = f"ppe {m.batch}" if key == "captum" else (f"≤{m.batch}" if key.startswith("exact")
                                                          else str(m.batch))
        ach_g = x_naive / m.r_grid if m.r_grid else None
        ach_b = x_naive / m.r_batched if m.r_batched else None
        rows.append((m.label, batch, str(m.positions), f"{m.best:.2f}", f"{m.per_position * 1e3:.1f}",
                     f"{m.cores:.1f}", f"{x_naive:.2f}", fmt(x_captum), fmt(m.r_grid), fmt(m.r_uniform), fmt(m.r_batched),
                     fmt(ach_g), fmt(ach_b), mib(m.peak)))
    return rows


def print_table(all_results: list[dict]) -> None:
    body = []
    for res in all_results:
        body.append((f"[{res['model']}  {'x'.join(map(str, res['input'][1:]))}  region "
                     f"{tuple(res['region'])}]",) + ("",) * (len(COLS) - 1))
        body += table_rows(res)
    widths = [max(len(COLS[i]), *(len(r[i]) for r in body if not r[0].startswith("["))) for i in range(len(COLS))]

    def line(r):
        if r[0].startswith("["):
            return r[0]
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    log(line(COLS))
    log("  ".join("-" * w for w in widths))
    for r in body:
        log(line(r))


def print_notes(all_results: list[dict]) -> None:
    for res in all_results:
        ms, ck = res["methods"], res["checks"]
        name = res["model"]
        parts = [f"{k.replace('_max_abs', '')} max|Δp| = {fmt(v, '.2e', 'n/a (region not a whole number of strides)')}"
                 for k, v in ck.items()]
        log(f"{name}: agreement: " + "; ".join(parts))
        same = ms.get("exact_same") or (ms["exact"] if ms["exact"].batch == ms["naive"].batch else None)
        pairs = []
        if same is not None:
            pairs.append((same.batch, same.peak, ms["naive"].peak))
        b, naive_peak = ms["naive"].extra.get("isolated_peak_at_exact_batch", (None, None))
        if b is not None:
            pairs.append((b, ms["exact"].peak, naive_peak))
        for batch, ex_peak, nv_peak in pairs:
            if ex_peak and nv_peak:
                log(f"{name}: memory at the same batch {batch}: exact {mib(ex_peak)} MiB / naive "
                    f"{mib(nv_peak)} MiB = {ex_peak / nv_peak:.0%} (goal <= 50%)")
        log(f"{name}: planner's memory estimate: naive {mib(ms['naive'].extra.get('est_bytes'))} MiB, "
            + ", ".join(f"{m.label} {mib(m.extra.get('est_bytes'))} MiB" for k, m in ms.items()
                        if k.startswith("exact")))
        ex = ms["exact"]
        kr = res["krypton_cpu_speedup"]
        rw = res["r_whole_image"]
        log(f"{name}: exact cutoff {ex.extra.get('cutoff') or 'none'}; whole-image R {rw['r_grid']:.2f}"
            + (f"; Krypton CPU speedup {kr}x (whole image)" if kr else ""))


def machine_info(opts) -> dict:
    import numba
    info = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import captum
        info["captum"] = captum.__version__
    except ImportError:
        info["captum"] = None
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def to_json(all_results: list[dict], info: dict, opts) -> dict:
    out = []
    for res in all_results:
        r = dict(res)
        r["methods"] = {}
        for k, m in res["methods"].items():
            naive, captum = res["methods"]["naive"], res["methods"].get("captum")
            x_naive = naive.per_position / m.per_position
            r["methods"][k] = {
                "label": m.label, "batch": m.batch, "positions": m.positions, "times_s": m.times,
                "cpu_s": m.cpu,
                "best_s": m.best, "per_position_ms": m.per_position * 1e3, "cores_best": m.cores, "speedup_vs_naive": x_naive,
                "speedup_vs_captum": captum.per_position / m.per_position if captum else None,
                "r_grid": m.r_grid, "r_uniform": m.r_uniform, "r_batched": m.r_batched,
                "achieved_over_r_grid": x_naive / m.r_grid if m.r_grid else None,
                "achieved_over_r_batched": x_naive / m.r_batched if m.r_batched else None,
                "peak_rss_bytes": m.peak, "peak_rss_bytes_isolated": m.isolated_peak,
                "peak_rss_bytes_in_process": m.peaks, **m.extra}
        out.append(r)
    return {"machine": info, "args": {k: v for k, v in vars(opts).items()}, "results": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--image", default="coffee", help="sample image name or quoted path (default coffee)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--size", type=int, default=None,
                    help="model input size (default: the model's own, 224; 299 for inception_v3)")
    ap.add_argument("--region", default="auto", type=str,
                    help="'auto' (a centred band of rows sized so naive takes about --target seconds) "
                         "or x0,y0,x1,y1 in model-input pixels")
    ap.add_argument("--target", type=float, default=60.0, help="seconds of naive work --region auto aims at")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of every KQL run (default: the planner's, per mode)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per method, interleaved; the minimum time is reported (default 3)")
    ap.add_argument("--no-captum", action="store_true", help="skip Captum")
    ap.add_argument("--memory-limit", default=None,
                    help="KQL's memory_limit, which sizes the planner's batches (default KQL's, 2GB)")
    ap.add_argument("--captum-ppe", default="8,16,32",
                    help="Captum perturbations_per_eval values to sweep (default 8,16,32; one value: "
                         "no sweep, use it)")
    ap.add_argument("--sweep-positions", type=int, default=32,
                    help="positions of the sweep's sub-region: the first row of the region, up to "
                         "this many (default 32)")
    ap.add_argument("--sweep-repeat", type=int, default=2,
                    help="interleaved passes over the candidates; min per candidate (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads (default 2)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--no-isolated-memory", dest="isolated_memory", action="store_false",
                    help="report the in-process RSS peaks instead of measuring each method in a child")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.memory_child:
        torch.set_num_threads(opts.threads)
        return memory_child(json.loads(opts.memory_child))
    opts.region = parse_region(opts.region)
    if min(opts.repeat, opts.sweep_repeat, opts.sweep_positions) < 1 or (opts.batch is not None and opts.batch < 1):
        ap.error("--repeat, --sweep-repeat, --sweep-positions and --batch must be at least 1")
    if not opts.no_captum:
        try:
            import captum.attr  # noqa: F401
        except ImportError:
            ap.error("captum is not installed (pip install captum, or pass --no-captum)")

    torch.set_num_threads(opts.threads)
    import numba
    numba.set_num_threads(min(opts.threads, numba.config.NUMBA_NUM_THREADS))
    info = machine_info(opts)
    log(f"occlusion benchmark: patch {opts.patch} stride {opts.stride}, image {opts.image}, "
        f"repeat {opts.repeat} (min reported), time.perf_counter wall time")
    log(f"machine: {info['cpu']}, {info['cpu_count']} CPUs ({info['affinity']} usable), "
        f"load {', '.join(f'{v:.2f}' for v in info.get('loadavg', ()))}; torch {info['torch']} "
        f"({info['torch_threads']} threads), numba {info['numba_threads']} threads, captum {info['captum']}")
    log("note: torchvision models are built with RANDOM weights (no weights offline); the heatmaps are "
        "meaningless but the work, and so the timing, does not depend on the weight values")

    all_results = []
    for name in [m.strip() for m in opts.models.split(",") if m.strip()]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*random weights.*")
            all_results.append(bench_model(name, opts))
        settle()

    log("\nResults (min of {} run(s); x naive / x captum compare time per position; R from the cost model: "
        "grid = exact regions, unif = one patch size per layer, batch = the chosen batches and cutoff; "
        "ach/R = x naive / R; cores = CPU time / wall time of that run; peak = RSS above the baseline, "
        "each method alone in a fresh process)".format(opts.repeat))
    print_table(all_results)
    log()
    print_notes(all_results)
    log(f"\nmachine: {info['cpu']} · {info['cpu_count']} CPUs · torch {info['torch']} · "
        f"{info['torch_threads']} torch threads · {info['platform']}")
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(to_json(all_results, info, opts), f, indent=1, default=_jsonable)
        log(f"figures written to {opts.json}")
    return 0


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
