"""Runtime estimates: the seconds a plan will take on this machine.

FLOPs do not tell time: on the same CPU a 3x3 conv with 512 channels runs at
several times the FLOP rate of a depthwise conv or of a conv on a 2x2 patch,
and an incremental layer also pays a kernel call, a gather and Python dispatch
whatever its size. So the model is **per layer**, calibrated on this machine
by timing the plan's own layers, as the executors run them:

- exact (incremental) plans: a few batches of the plan itself run through the
  real :class:`~kql.executor.incremental.IncrementalRunner`, with every layer
  call timed. Each (layer, state) gets a line ``seconds = a + c · pixels``
  (state: ``patch`` with its gather kernel, or ``full``; pixels: positions x
  the output rectangle, ``b·h·w``), fitted to a large and a small batch, so
  ``a`` is the per-call cost (dispatch, kernel launch) and ``c`` the cost of a
  pixel of that layer at that size. What the batch loop costs outside the
  layers (indexing, softmax, unchanged layers) is fitted the same way per batch.
  The estimate then walks the plan's batches (``plan.order``, ``plan.bounds``,
  ``plan.regions``, ``plan.full_layers``), predicts each layer's state and
  rectangle as the executor will (largest region of the batch, full past the
  cutoff or once a region covers the map) and sums the lines. Approximate plans,
  whose regions are smaller, are covered by the same sum.
- naive plans: one batch is the whole model on ``b`` occluded copies, and
  nearly every batch has the plan's size: a batch of that size is timed
  (twice, the faster kept) and scaled per position.

Plus the unoccluded reference inference and, for exact plans, materializing the
views, each timed once. The estimate is of execution (reference + occlusion),
which EXPLAIN ANALYZE compares it with; binding, planning and saving are not in it.

Calibrating takes a few batches (seconds on a quiet CPU) and is cached on disk,
one JSON file per (model, layers, input size, device, threads, batch size
bucket, mode family, torch version, CPU) under ``$KQL_CACHE_DIR`` (default
``$XDG_CACHE_HOME/kql`` or ``~/.cache/kql``), written atomically; a file that
does not parse or does not match is ignored and rebuilt. A plan that needs a
(layer, state) the cached file lacks (another patch size moved the cutoff, or
another gather kernel) is calibrated again on its own batches and the file is
extended. Nothing is measured until EXPLAIN asks: ``SELECT`` never calibrates.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from kql import files
from kql.planner.ir import Kind
from kql.planner.plan import format_seconds

#: Bump when the file layout or what is measured changes: older files are ignored.
CACHE_VERSION = 2
CACHE_ENV = "KQL_CACHE_DIR"


# ----------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where calibrations live: ``$KQL_CACHE_DIR``, else ``$XDG_CACHE_HOME/kql``,
    else ``~/.cache/kql``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kql"


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "runtime" / f"{key['model']}-{key['family']}-{digest}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one,
    never half of one (:func:`kql.files.write_atomic`), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """Measured costs of one model on this machine (seconds).

    Attributes:
        key: what it is valid for (model, layers, device, threads, batch bucket ...).
        layers: layer name -> state (``full``, ``patch``, ``patch:<gather kernel>``)
            -> ``[a, c]``: seconds per call and per output pixel (positions x h x w).
        batch: ``[a, c]`` of the batch loop outside the layers (exact), or of
            a whole batch (naive), per batch and per position.
        reference: one unoccluded inference.
        materialize: exact plans: running the unoccluded image with the views kept.
        created: when it was measured (Unix time).
        seconds: how long measuring took.
        source: ``measured`` (now), ``cache`` (read from disk) or ``fixed`` (given, e.g. tests).
    """
    key: dict
    layers: dict = field(default_factory=dict)
    batch: tuple = (0.0, 0.0)
    reference: float = 0.0
    materialize: float = 0.0
    created: float = 0.0
    seconds: float = 0.0
    source: str = "measured"

    def to_json(self) -> str:
        return json.dumps({"version": CACHE_VERSION, "key": self.key, "layers": self.layers,
                           "batch": list(self.batch), "reference": self.reference,
                           "materialize": self.materialize, "created": self.created,
                           "seconds": self.seconds}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, key: dict) -> Optional["Calibration"]:
        """The calibration in ``text`` if it is well formed and for ``key``, else None."""
        try:
            d = json.loads(text)
            if d.get("version") != CACHE_VERSION or d.get("key") != key:
                return None
            layers = {str(n): {str(s): [float(v[0]), float(v[1])] for s, v in states.items()}
                      for n, states in d["layers"].items()}
            a, c = (float(v) for v in d["batch"])
            return cls(key, layers, (a, c), float(d["reference"]), float(d["materialize"]),
                       float(d["created"]), float(d["seconds"]), "cache")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None

    @classmethod
    def fixed(cls, plan, per_call: float = 1e-4, per_pixel: float = 1e-8, per_batch: float = 1e-3,
              per_position: float = 1e-3, reference: float = 0.01, threads: int = 1) -> "Calibration":
        """A deterministic calibration with the same line for every layer and
        state (for tests and snapshots: no measuring)."""
        key = dict(calibration_key(plan), threads=threads)
        line = [per_call, per_pixel]
        layers = {l.name: {"full": line, "patch": line, **{f"patch:{b}": line for b in ("torch", "numba", "cuda")}}
                  for l in plan.graph.layers()}
        return cls(key, layers, (per_batch, per_position), reference, reference, 0.0, 0.0, "fixed")


def machine() -> dict:
    """The facts a calibration depends on besides the model."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def calibration_key(plan) -> dict:
    """What a calibration of this plan is valid for."""
    shape = [(l.name, l.op, str(l.kind), l.in_shapes, l.out_shape, l.kernel, l.stride, l.groups)
             for l in plan.graph.layers()]
    layers = hashlib.sha256(repr(shape).encode()).hexdigest()[:16]
    family = "naive" if plan.mode == "naive" else "incremental"
    bucket = 1 << max(0, int(plan.batch_size) - 1).bit_length()  # next power of two
    name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(plan.spec.name))
    from kql.executor.allocator import enabled_for
    return {"model": name, "layers": layers, "input": list(plan.input.shape), "device": plan.device,
            "family": family, "batch_bucket": bucket,
            "allocator": "reuse" if enabled_for(plan) else "system", **machine()}


_MEMO: dict = {}  # cache file -> Calibration, so repeated EXPLAINs read the disk once


def calibration_for(plan) -> Calibration:
    """The plan's calibration: from memory, from the cache, or measured now.

    A cached calibration that lacks a (layer, state) this plan needs is
    extended by calibrating on this plan's batches."""
    key = calibration_key(plan)
    path = _cache_path(key)
    cal = _load(path, key)
    changed = cal is None
    if cal is None:
        cal = calibrate(plan)
    for _ in range(2):  # states the timed batches did not show: time a batch that has them
        need = _missing(plan, cal) if plan.mode != "naive" else set()
        if not need:
            break
        cal = _merge(cal, calibrate(plan, need=need))
        changed = True
    if plan.mode != "naive" and _missing(plan, cal):
        _borrow(plan, cal)  # e.g. a point op the executor runs in full: its other line
        changed = True
    if changed:
        _store(path, cal)
    _MEMO[str(path)] = replace(cal, source="cache")  # later EXPLAINs: no measuring
    return cal


def _load(path: Path, key: dict) -> Optional[Calibration]:
    cal = _MEMO.get(str(path))
    if cal is None:
        try:
            cal = Calibration.from_json(path.read_text(encoding="utf-8"), key)
        except (OSError, UnicodeDecodeError):
            cal = None
    return cal


def is_calibrated(plan) -> bool:
    """Whether the plan's estimate can be made without running the model:
    its calibration (and for DRILLDOWN its stage one's) is in memory or in
    the cache with every (layer, state) the plan needs. The web UI asks
    before an EXPLAIN that may not run a model while a job holds the engine."""
    plans = [plan] + ([plan.drilldown.stage_one] if getattr(plan, "drilldown", None) is not None else [])
    for p in plans:
        key = calibration_key(p)
        cal = _load(_cache_path(key), key)
        if cal is None or (p.mode != "naive" and _missing(p, cal)):
            return False
    return True


def _store(path: Path, cal: Calibration) -> None:
    try:
        write_atomic(path, cal.to_json())
    except OSError:
        pass  # a read-only cache costs a calibration per session, not the query


def _borrow(plan, cal: Calibration) -> None:
    """Give each (layer, state) still missing the layer's other line, so a
    state calibration cannot produce is not calibrated again and again."""
    for name, state in _missing(plan, cal):
        fits = cal.layers.setdefault(name, {})
        fits[state] = list(fits.get("patch") or next(iter(fits.values()), [0.0, 0.0]))


def _merge(old: Calibration, new: Calibration) -> Calibration:
    layers = {name: dict(states) for name, states in old.layers.items()}
    for name, states in new.layers.items():
        layers.setdefault(name, {}).update(states)
    new.layers = layers
    if old.source == "measured":  # both measured now: EXPLAIN reports the whole time
        new.seconds += old.seconds
    # Load on the machine only ever slows a measurement down: keep the faster.
    new.reference, new.materialize = min(new.reference, old.reference), min(new.materialize, old.materialize)
    new.batch = old.batch
    return new


def calibrate(plan, need=None) -> Calibration:
    """Measure the plan's costs on this machine (see the module docstring).
    ``need``: for exact plans, the (layer, state) pairs to cover; the batch
    timed is one that has the most of them."""
    import torch

    from kql.executor.allocator import enabled_for, reuse_freed_memory
    start = time.perf_counter()
    model = plan.spec.module.to(plan.device).eval()
    # measured as queries run: with the allocator setting they run with
    with torch.inference_mode(), reuse_freed_memory(enabled_for(plan)):
        if plan.mode == "naive":
            cal = _calibrate_naive(plan, model)
        else:
            cal = _calibrate_incremental(plan, model, need)
        x = plan.input.to(plan.device)[None]
        cal.reference = _best(lambda: model(x), plan.device, 2)
    cal.created = time.time()
    cal.seconds = time.perf_counter() - start
    return cal


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _best(fn, device, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _fit(points: list[tuple[float, float]]) -> list[float]:
    """``[a, c]`` with ``seconds ≈ a + c·units`` through (units, seconds) points
    (least squares, both non-negative); one size only: all of it per unit."""
    u = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    if len(set(u.tolist())) < 2:
        return [0.0, float(t.mean() / max(u.mean(), 1.0))]
    c, a = np.polyfit(u, t, 1)
    if c < 0:  # a larger call read faster: noise; the fastest reading is the per-call cost
        return [float(t.min()), 0.0]
    if a < 0:
        return [0.0, float((t * u).sum() / (u * u).sum())]
    return [float(a), float(c)]


#: Naive calibration: at most this many timed batches, and no more than 3 once
#: they took NAIVE_BUDGET seconds (VGG16's batch of 8 takes ~1.3 s here).
NAIVE_READINGS = 6
NAIVE_BUDGET = 4.0


def _calibrate_naive(plan, model) -> Calibration:
    from kql.executor.common import occlude, probabilities
    ys, xs = plan.positions()
    x = plan.input.to(plan.device)
    big = max(1, min(plan.batch_size, len(ys)))
    small = max(1, big // 4)

    def run(b):
        probabilities(model(occlude(x, plan.fill, ys[:b], xs[:b], plan.patch)))

    run(small)  # warm-up: first-call costs
    # Nearly every batch of a naive plan has the plan's size, so time that size
    # and scale per position (an intercept fitted from two noisy batch sizes
    # was the larger error on a busy machine). The first few batches of a size
    # run slower (efficientnet_lite0: 142, 94, 118, 108, 124 ms, then ~100):
    # time up to NAIVE_READINGS, drop the first, keep the median.
    readings, spent = [], 0.0
    while len(readings) < NAIVE_READINGS and (len(readings) < 3 or spent < NAIVE_BUDGET):
        readings.append(_best(lambda: run(big), plan.device, 1))
        spent += readings[-1]
    points = [(big, float(np.median(readings[1:])))]
    return Calibration(calibration_key(plan), {}, tuple(_fit(points)))


def _calibrate_incremental(plan, model, need) -> Calibration:
    from kql.planner.rules.incremental import batch_bounds

    TimingRunner = timing_runner()
    order = plan.order if plan.order is not None else np.arange(plan.n_positions)
    bounds = batch_bounds(len(order), plan.bounds if plan.bounds is not None else plan.batch_size)
    pairs = [{(n, s) for n, s, _ in runs} for runs in _predict(plan, order, bounds)]
    # The batches to time: greedily, the one with the most (layer, state)
    # pairs still to cover (ties: the largest batch, then the first), so the
    # states of border batches are measured too; at most three.
    pending = set(need) if need else set().union(*pairs)
    chosen = []
    while (pending or not chosen) and len(chosen) < 3:
        i = max(range(len(pairs)), key=lambda j: (len(pending & pairs[j]), bounds[j + 1] - bounds[j], -j))
        if chosen and not pending & pairs[i]:
            break
        chosen.append(i)
        pending -= pairs[i]
    label = plan.label if plan.label is not None else 0

    t0 = time.perf_counter()
    runner = TimingRunner(plan, model, plan.regions, frozenset(plan.full_layers or ()), plan.gather_backend)
    _sync(plan.device)
    materialize = time.perf_counter() - t0
    samples: dict = {}
    loops = []
    for k, i in enumerate(chosen):
        idx = order[bounds[i]:bounds[i + 1]]
        sub = idx[:max(1, len(idx) // 4)]
        if k == 0:
            runner.run(sub, label)  # warm-up: Numba kernels loaded, first-call costs paid
        # The first batch three times, the others twice, keeping each layer's
        # median call. A run pays for the slow calls too: on this 2-core
        # machine the same call of efficientnet_lite0 read 3 ms or 9 ms, and
        # the fastest reading made its estimate 20-35 % low (the median: 13-15 %).
        for positions in ([idx, sub] if len(sub) < len(idx) else [idx]) * (3 if k == 0 else 2):
            runner.record = []
            total = _best(lambda: runner.run(positions, label), plan.device, 1)
            for name, state, units, seconds in runner.record:
                key = (name, state, units)
                samples.setdefault(key, []).append(seconds)
            loops.append((len(positions), total - sum(r[3] for r in runner.record)))
    by_state: dict = {}
    for (name, state, units), readings in samples.items():
        seconds = float(np.median(readings))
        by_state.setdefault((name, state), []).append((units, seconds))
    layers: dict = {}
    for (name, state), points in by_state.items():
        layers.setdefault(name, {})[state] = _fit(points)
    best_loop: dict = {}
    for b, seconds in loops:
        best_loop[b] = min(best_loop.get(b, math.inf), max(seconds, 0.0))
    return Calibration(calibration_key(plan), layers, tuple(_fit(list(best_loop.items()))),
                       materialize=materialize)


_TIMING_RUNNER = None


def timing_runner():
    """The executor's :class:`IncrementalRunner` with every layer call timed:
    while ``runner.record`` is a list, each call appends ``(layer, state,
    units, seconds)`` (state and units as :func:`_predict` names them)."""
    global _TIMING_RUNNER
    if _TIMING_RUNNER is None:
        from kql.executor.incremental import IncrementalRunner

        class TimingRunner(IncrementalRunner):
            record = None

            def _step(self, layer, node, state, idx, B):
                if self.record is None:
                    return super()._step(layer, node, state, idx, B)
                _sync(self.device)
                t0 = time.perf_counter()
                out = super()._step(layer, node, state, idx, B)
                _sync(self.device)
                if out is not None:
                    self.record.append((layer.name, _state_name(self.plan, layer, out), _units(layer, out.values),
                                        time.perf_counter() - t0))
                return out
        _TIMING_RUNNER = TimingRunner
    return _TIMING_RUNNER


def _units(layer, values) -> int:
    """Positions x output pixels of a layer's result (positions for non-maps), in
    the layer's layout (``Layer.out_axes``: channels-last maps too)."""
    shape = tuple(values.shape)
    if not layer.spatial or len(shape) != len(layer.out_shape) + 1:
        return int(shape[0])
    return int(shape[0] * math.prod(shape[a + 1] for a in layer.out_axes))


def _state_name(plan, layer, out) -> str:
    from kql.executor.incremental import Full
    if isinstance(out, Full):
        return "full"
    if layer.kind == Kind.LOCAL:
        return "patch:" + plan.layer_backends.get(layer.name, plan.gather_backend)
    return "patch"


# ----------------------------------------------------------------------------- estimate
def _predict(plan, order, bounds) -> list[list[tuple[str, str, int]]]:
    """Per batch, the (layer, state, units) the incremental executor will run,
    following its rules (``IncrementalRunner._step``): a layer is unchanged when
    all its inputs are, full when it is global, past the cutoff, reads a full
    input or its batch's largest region covers the map, else a patch of the
    batch's largest region."""
    layers = [l for l in plan.graph.layers() if l.kind not in (Kind.INPUT, Kind.OUTPUT)]
    starts, sizes = bounds[:-1], np.diff(bounds)
    hmax, wmax = {}, {}
    for l in layers:
        r = plan.regions.get(l.name) if plan.regions is not None else None
        if r is not None and l.spatial:
            hmax[l.name] = np.maximum.reduceat(r.h[order], starts)
            wmax[l.name] = np.maximum.reduceat(r.w[order], starts)
    full_layers = plan.full_layers or frozenset()
    out = []
    for i, b in enumerate(sizes.tolist()):
        state = {plan.graph.input: "patch"}
        runs = []
        for l in layers:
            ins = [state.get(name) for name in l.inputs]
            if all(s is None for s in ins):
                state[l.name] = None
                continue
            full = (l.kind == Kind.GLOBAL or l.name in full_layers or "full" in ins
                    or l.name not in hmax)
            if not full:
                h, w = int(hmax[l.name][i]), int(wmax[l.name][i])
                full = (h, w) == l.out_hw and l.kind != Kind.POINT
            if full:
                state[l.name] = "full"
                units = b * (l.out_hw[0] * l.out_hw[1] if l.spatial else 1)
                runs.append((l.name, "full", units))
            else:
                state[l.name] = "patch"
                name = ("patch:" + plan.layer_backends.get(l.name, plan.gather_backend)
                        if l.kind == Kind.LOCAL else "patch")
                runs.append((l.name, name, b * h * w))
        out.append(runs)
    return out


def _missing(plan, cal: Calibration) -> set:
    order = plan.order if plan.order is not None else np.arange(plan.n_positions)
    from kql.planner.rules.incremental import batch_bounds
    bounds = batch_bounds(len(order), plan.bounds if plan.bounds is not None else plan.batch_size)
    need = {(n, s) for runs in _predict(plan, order, bounds) for n, s, _ in runs}
    return {(n, s) for n, s in need if s not in cal.layers.get(n, {})}


@dataclass
class Estimate:
    """Estimated seconds of a plan's execution and where they come from."""
    seconds: float
    parts: dict                 # reference, views, batches -> seconds
    batches: int
    calibration: Calibration

    def line(self) -> str:
        """EXPLAIN's line."""
        cal = self.calibration
        where = f"{cal.key.get('device', 'cpu')}, {cal.key.get('threads', '?')} thread" \
                f"{'s' * (cal.key.get('threads') != 1)}"
        if cal.source == "measured":
            how = f"calibrated now in {format_seconds(cal.seconds)}, cached"
        elif cal.source == "cache":
            how = "calibration cached " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cal.created))
        else:
            how = f"{cal.source} calibration"
        parts = [f"reference {format_seconds(self.parts['reference'])}"]
        if "views" in self.parts:
            parts.append(f"views {format_seconds(self.parts['views'])}")
        parts.append(f"{self.batches} batch{'es' * (self.batches != 1)} {format_seconds(self.parts['batches'])}")
        return (f"estimated time: {format_seconds(self.seconds)} on this machine ({where}; {how}): "
                + " + ".join(parts))


def estimate(plan, cal: Calibration) -> Estimate:
    """Sum the calibrated costs over the plan's batches (see the module docstring).

    A DRILLDOWN plan costs its stage one in full, plus the fraction of its
    own grid stage two runs: which positions stage two takes is known only
    after stage one, so its batches are the whole grid's scaled by
    ``n_select / n_fine`` (the selected positions are the sensitive ones,
    usually away from the borders, so this leans low), plus its own views.
    """
    dd = getattr(plan, "drilldown", None)
    if dd is not None:
        one = estimate(dd.stage_one, calibration_for(dd.stage_one))
        two = _estimate_grid(plan, cal)
        share = dd.n_select / max(dd.n_fine, 1)
        parts = {"reference": cal.reference, "views": one.parts.get("views", 0.0) + two.parts.get("views", 0.0),
                 "batches": one.parts["batches"] + share * two.parts["batches"]}
        batches = one.batches + int(round(share * two.batches))
        return Estimate(sum(parts.values()), parts, batches, cal)
    return _estimate_grid(plan, cal)


def _estimate_grid(plan, cal: Calibration) -> Estimate:
    """The estimate over every position of the plan's grid."""
    from kql.planner.rules.incremental import batch_bounds
    a, c = cal.batch
    if plan.mode == "naive":
        sizes = np.diff(batch_bounds(plan.n_positions, plan.batch_size))
        batches = float(len(sizes) * a + c * sizes.sum())
        parts = {"reference": cal.reference, "batches": batches}
        return Estimate(cal.reference + batches, parts, len(sizes), cal)
    order = plan.order if plan.order is not None else np.arange(plan.n_positions)
    bounds = batch_bounds(len(order), plan.bounds if plan.bounds is not None else plan.batch_size)
    sizes = np.diff(bounds)
    total = float(len(sizes) * a + c * sizes.sum())
    for runs in _predict(plan, order, bounds):
        for name, state, units in runs:
            fits = cal.layers.get(name, {})
            # A state never seen in calibration (it is calibrated when it is
            # missing, so this is rare): the layer's other line, else nothing.
            la, lc = fits.get(state) or fits.get("patch") or next(iter(fits.values()), (0.0, 0.0))
            total += la + lc * units
    parts = {"reference": cal.reference, "views": cal.materialize, "batches": total}
    return Estimate(cal.reference + cal.materialize + total, parts, len(sizes), cal)


class RuntimeEstimate:
    """A plan's runtime estimate, computed on first use (``get``): planning a
    SELECT never calibrates, EXPLAIN does (once per model; then from the cache)."""

    def __init__(self, plan):
        self.plan = plan
        self._result = None

    def get(self) -> Estimate:
        """The estimate; raises whatever calibrating raised."""
        if self._result is None:
            self._result = estimate(self.plan, calibration_for(self.plan))
        return self._result

    def line(self) -> str:
        """EXPLAIN's line; an estimate that failed says why instead of failing EXPLAIN."""
        try:
            return self.get().line()
        except Exception as e:  # a model that cannot run a calibration batch
            first = (str(e).strip().splitlines() or [""])[0]
            return f"estimated time: unavailable (calibration failed: {type(e).__name__}: {first})"

    def compare_line(self, timings: dict) -> Optional[str]:
        """EXPLAIN ANALYZE's line: estimate vs the measured reference + occlusion."""
        if "occlusion" not in timings:
            return None
        try:
            est = self.get().seconds
        except Exception:
            return None
        actual = timings.get("reference", 0.0) + timings["occlusion"]
        diff = (est - actual) / actual * 100 if actual > 0 else 0.0
        sign = "+" if diff >= 0 else "−"
        return (f"estimated {format_seconds(est)}, actual {format_seconds(actual)} "
                f"({sign}{abs(diff):.0f} %; reference inference + occlusion)")


def runtime_lines(plan, timings: Optional[dict] = None) -> list[str]:
    """EXPLAIN's estimate line and, with EXPLAIN ANALYZE's ``timings``, the
    comparison with what was measured (none for a plan without an estimate)."""
    runtime = getattr(plan, "runtime", None)
    if runtime is None:
        return []
    if runtime.plan is not plan:  # the plan was copied after the rule ran: estimate this one
        runtime = plan.runtime = RuntimeEstimate(plan)
    lines = [runtime.line()]
    compare = runtime.compare_line(timings) if timings else None
    return lines + ([compare] if compare else [])
