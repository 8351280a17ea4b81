"""Runtime estimates: the seconds a plan will take on this machine.

This module is the model of seconds (the planner's); measuring is the
executor's (``kql.executor.profile``: timing the plan's layers; and
``kql.executor.timing_cache``: the cache on disk), handed in as
``timings_for``.

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

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from kql.errors import first_line
from kql.planner.ir import Kind
from kql.planner.plan import batch_bounds, format_seconds


@dataclass
class LayerTimings:
    """Measured costs of one model on this machine (seconds): what the
    executor's profiler (``kql.executor.profile``) hands the estimate.

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

    def to_json(self, version: int) -> str:
        return json.dumps({"version": version, "key": self.key, "layers": self.layers,
                           "batch": list(self.batch), "reference": self.reference,
                           "materialize": self.materialize, "created": self.created,
                           "seconds": self.seconds}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, key: dict, version: int) -> Optional["LayerTimings"]:
        """The timings in ``text`` if they are well formed, of this format
        ``version`` and for ``key``, else None."""
        try:
            d = json.loads(text)
            if d.get("version") != version or d.get("key") != key:
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
              per_position: float = 1e-3, reference: float = 0.01, threads: int = 1) -> "LayerTimings":
        """A deterministic calibration with the same line for every layer and
        state (for tests and snapshots: no measuring)."""
        key = {"model": str(plan.spec.name), "device": plan.device, "threads": threads}
        line = [per_call, per_pixel]
        layers = {l.name: {"full": line, "patch": line, **{f"patch:{b}": line for b in ("torch", "numba", "cuda")}}
                  for l in plan.graph.layers()}
        return cls(key, layers, (per_batch, per_position), reference, reference, 0.0, 0.0, "fixed")


# ----------------------------------------------------------------------------- estimate
def predict_runs(plan, order, bounds) -> list[list[tuple[str, str, int]]]:
    """Per batch, the (layer, state, units) the incremental executor will run,
    following its rules (``IncrementalRunner._step``): a layer is unchanged when
    all its inputs are, full when it is global, past the cutoff, reads a full
    input or its batch's largest region covers the map, else a patch of the
    batch's largest region."""
    layers = [l for l in plan.graph.layers() if l.kind not in (Kind.INPUT, Kind.OUTPUT)]
    starts, sizes = bounds[:-1], np.diff(bounds)
    largest = {}   # per layer: the batches' largest extent along each axis
    for l in layers:
        r = plan.regions.get(l.name) if plan.regions is not None else None
        if r is not None and l.spatial:
            largest[l.name] = [np.maximum.reduceat(n[order], starts) for n in r.sizes]
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
                    or l.name not in largest)
            if not full:
                box = tuple(int(n[i]) for n in largest[l.name])
                full = box == tuple(l.out_hw) and l.kind != Kind.POINT
            if full:
                state[l.name] = "full"
                units = b * (math.prod(l.out_hw) if l.spatial else 1)
                runs.append((l.name, "full", units))
            else:
                state[l.name] = "patch"
                name = ("patch:" + plan.layer_backends.get(l.name, plan.gather_backend)
                        if l.kind == Kind.LOCAL else "patch")
                runs.append((l.name, name, b * math.prod(box)))
        out.append(runs)
    return out


def missing_states(plan, cal: "LayerTimings") -> set:
    """The (layer, state) pairs the plan runs that ``cal`` has no line for."""
    order, bounds = plan.batches()
    need = {(n, s) for runs in predict_runs(plan, order, bounds) for n, s, _ in runs}
    return {(n, s) for n, s in need if s not in cal.layers.get(n, {})}


@dataclass
class Estimate:
    """Estimated seconds of a plan's execution and where they come from."""
    seconds: float
    parts: dict                 # reference, views, batches -> seconds
    batches: int
    calibration: LayerTimings

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


def estimate(plan, cal: LayerTimings, timings_for: Optional[Callable] = None) -> Estimate:
    """Sum the calibrated costs over the plan's batches (see the module docstring).

    A DRILLDOWN plan costs its stage one in full, plus the fraction of its
    own grid stage two runs: which positions stage two takes is known only
    after stage one (``timings_for(stage_one)`` gives its timings), so its
    batches are the whole grid's scaled by
    ``n_select / n_fine`` (the selected positions are the sensitive ones,
    usually away from the borders, so this leans low), plus its own views.
    """
    dd = plan.drilldown
    if dd is not None:
        one = estimate(dd.stage_one, timings_for(dd.stage_one), timings_for)
        two = _estimate_grid(plan, cal)
        share = dd.n_select / max(dd.n_fine, 1)
        parts = {"reference": cal.reference, "views": one.parts.get("views", 0.0) + two.parts.get("views", 0.0),
                 "batches": one.parts["batches"] + share * two.parts["batches"]}
        batches = one.batches + int(round(share * two.batches))
        return Estimate(sum(parts.values()), parts, batches, cal)
    policy = plan.refine
    if policy is not None and policy.expected_share is not None:
        # adaptive refinement: the share of the grid it computed on the tuning images
        grid = _estimate_grid(plan, cal)
        parts = dict(grid.parts, batches=policy.expected_share * grid.parts["batches"])
        return Estimate(sum(parts.values()), parts, int(round(policy.expected_share * grid.batches)), cal)
    return _estimate_grid(plan, cal)


def _estimate_grid(plan, cal: LayerTimings) -> Estimate:
    """The estimate over every position of the plan's grid."""
    a, c = cal.batch
    if plan.mode == "naive":
        sizes = np.diff(batch_bounds(plan.n_positions, plan.batch_size))
        batches = float(len(sizes) * a + c * sizes.sum())
        parts = {"reference": cal.reference, "batches": batches}
        return Estimate(cal.reference + batches, parts, len(sizes), cal)
    order, bounds = plan.batches()
    sizes = np.diff(bounds)
    total = float(len(sizes) * a + c * sizes.sum())
    for runs in predict_runs(plan, order, bounds):
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
    SELECT never calibrates, EXPLAIN does (once per model; then from the cache).

    ``timings_for(plan) -> LayerTimings`` is what measures: the front end hands
    the executor's profiler (``kql.executor.timing_cache.layer_timings``) to the
    optimizer, so the planner itself never runs a model."""

    def __init__(self, plan, timings_for: Callable):
        self.plan = plan
        self.timings_for = timings_for
        self._result = None

    def get(self) -> Estimate:
        """The estimate; raises whatever calibrating raised."""
        if self._result is None:
            self._result = estimate(self.plan, self.timings_for(self.plan), self.timings_for)
        return self._result

    def line(self) -> str:
        """EXPLAIN's line; an estimate that failed says why instead of failing EXPLAIN."""
        try:
            return self.get().line()
        except Exception as e:  # a model that cannot run a calibration batch
            return f"estimated time: unavailable (calibration failed: {type(e).__name__}: {first_line(e)})"

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
    runtime = plan.runtime
    if runtime is None:
        return []
    if runtime.plan is not plan:  # the plan was copied after the rule ran: estimate this one
        runtime = plan.runtime = RuntimeEstimate(plan, runtime.timings_for)
    lines = [runtime.line()]
    compare = runtime.compare_line(timings) if timings else None
    return lines + ([compare] if compare else [])
