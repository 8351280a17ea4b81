"""Profiling: timing a plan's own layers on this machine, as the executors run
them, for the planner's model of seconds (``planner/runtime.py``, whose
docstring says what is measured and how it is used).

- :func:`measure`: exact (incremental) plans run a few of their batches
  through the real :class:`~kql.executor.incremental.IncrementalRunner` with
  every layer call timed, and each (layer, state) gets a line
  ``seconds = a + c * pixels`` (:func:`fit_line`); naive plans time a batch
  of the plan's size. Plus the reference inference and, for exact plans,
  materializing the views.
- :func:`forward_seconds`: one unoccluded inference, the unit of a
  multi-image job's estimate when no runtime estimate is available.

The cache of what was measured is ``kql.executor.timing_cache``.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import time

import numpy as np

from kql.planner.graph import Kind
from kql.planner.runtime import LayerTimings, predict_runs


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


def timings_key(plan) -> dict:
    """What timings measured on this plan are valid for."""
    shape = [(l.name, l.op, str(l.kind), l.in_shapes, l.out_shape, l.kernel, l.stride, l.groups)
             for l in plan.graph.layers()]
    layers = hashlib.sha256(repr(shape).encode()).hexdigest()[:16]
    family = "naive" if plan.mode == "naive" else "incremental"
    bucket = 1 << max(0, int(plan.batch_size) - 1).bit_length()  # next power of two
    name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(plan.spec.name))
    return {"model": name, "layers": layers, "input": list(plan.input.shape), "device": plan.device,
            "family": family, "batch_bucket": bucket,
            "allocator": plan.allocator, **machine()}


def measure(plan, need=None) -> LayerTimings:
    """Measure the plan's costs on this machine (see ``planner/runtime.py``).
    ``need``: for exact plans, the (layer, state) pairs to cover; the batch
    timed is one that has the most of them."""
    import torch

    from kql.executor.allocator import reuse_freed_memory
    start = time.perf_counter()
    model = plan.spec.module.to(plan.device).eval()
    # measured as queries run: with the allocator setting they run with
    with torch.inference_mode(), reuse_freed_memory(plan.allocator == "reuse"):
        if plan.mode == "naive":
            cal = _measure_naive(plan, model)
        else:
            cal = _measure_incremental(plan, model, need)
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


def fit_line(points: list[tuple[float, float]]) -> list[float]:
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


def _measure_naive(plan, model) -> LayerTimings:
    from kql.executor.common import occlude, probabilities
    starts = plan.positions()
    ys = starts[0]
    x = plan.input.to(plan.device)
    big = max(1, min(plan.batch_size, len(ys)))
    small = max(1, big // 4)

    def run(b):
        probabilities(model(occlude(x, plan.fill, *(a[:b] for a in starts), plan.patch)))

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
    return LayerTimings(timings_key(plan), {}, tuple(fit_line(points)))


def _measure_incremental(plan, model, need) -> LayerTimings:
    TimingRunner = timing_runner()
    order, bounds = plan.batches()
    pairs = [{(n, s) for n, s, _ in runs} for runs in predict_runs(plan, order, bounds)]
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
        layers.setdefault(name, {})[state] = fit_line(points)
    best_loop: dict = {}
    for b, seconds in loops:
        best_loop[b] = min(best_loop.get(b, math.inf), max(seconds, 0.0))
    return LayerTimings(timings_key(plan), layers, tuple(fit_line(list(best_loop.items()))),
                       materialize=materialize)


_TIMING_RUNNER = None


def timing_runner():
    """The executor's :class:`IncrementalRunner` with every layer call timed:
    while ``runner.record`` is a list, each call appends ``(layer, state,
    units, seconds)`` (state and units as ``planner.runtime.predict_runs`` names them)."""
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


def forward_seconds(plan, threads: int) -> float:
    """Seconds one unoccluded inference of the plan's model takes here (the
    second of two runs, with the job's thread count): the unit of a
    multi-image job's time estimate when the plan's runtime estimate fails."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = plan.spec.module.to(plan.device).eval()
        x = plan.input.to(plan.device)[None]
        with torch.inference_mode():
            model(x)
            return _best(lambda: model(x), plan.device, 1)
    finally:
        torch.set_num_threads(previous)
