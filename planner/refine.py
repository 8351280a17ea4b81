"""Adaptive refinement: the run-time quality check of ``APPROX SSIM s``.

A calibration (``TUNE``) can only predict the SSIM of a plan on the images it
was made on; on an unseen image the engine has to *check*. The refinement
plan is an anytime, coarse-to-fine computation of the heatmap:

1. compute a coarse lattice of positions (every ``step``-th position along
   each axis of the query's grid -- rows and columns of an image, depth,
   rows and columns of a volume -- the last one included) exactly, by IVM;
2. estimate every other position by interpolating the computed ones
   (multilinear in the finest lattice-aligned cell whose corners are all
   computed: bilinear on an image, trilinear on a volume);
3. predict the error of each estimated position from its neighbourhood:
   ``sigma_i = k * range_i``, where ``range_i`` is the spread (max - min) of
   the corners of its cell, plus the largest error found near it by
   earlier batches (:func:`interpolate`, :meth:`RefinePolicy.update`).
   The scale ``k`` is fitted *per run*: every batch computes positions whose
   value was estimated a moment before, so each batch is ground truth for the
   previous estimate (their RMS error over their RMS range);
4. estimate the SSIM of the current map against the exact one as the mean
   SSIM between the map and the map plus Gaussian noise of the predicted
   scale (a few Monte Carlo draws, the heatmap SSIM of ``kql.tune``);
5. stop when that estimate reaches ``s + margin``; otherwise compute the
   ``batch`` positions with the largest predicted error (one MQO batch: one
   IVM call per layer) and go to 2. When every position is computed the map
   is exact.

The executor (``executor/refine.py``) runs positions; every decision -- what
to compute first, what next, when to stop -- is this module's
:class:`RefinePolicy`, which the plan carries.

The ``margin`` is what ``TUNE`` calibrates for refinement: on the tuning
images, the smallest margin at which the stopped maps reach ``s`` on the
share :data:`kql.calibration.COVERAGE` asks (``kql.calibration``). Without a
calibration the :data:`DEFAULT_MARGIN` applies.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from kql.errors import PlanError

#: Safety margin added to the target before refinement may stop, when no
#: calibration gives one.
DEFAULT_MARGIN = 0.03

#: Lattice step of the first pass (grid units) and the share of the grid
#: each later batch computes.
DEFAULT_STEP = 4
DEFAULT_BATCH = 0.04
DEFAULT_AUDIT = 0.35
DEFAULT_HISTORY = 6

#: Fewest positions of a batch drawn at random (the error scale's sample).
MIN_AUDIT = 8

#: Monte Carlo draws of the SSIM estimate.
DRAWS = 4

#: An exact heatmap whose probability spans less than this is flat.
FLAT = 1e-4

#: Consecutive stages whose SSIM estimate must reach the goal before refinement stops.
CONFIRM = 2

#: A margin is kept when every tuning image reached the target plus this
#: cushion: a handful of tuning images is a small sample of the photos a
#: query will see.
CUSHION = 0.01

#: The safety margins TUNE tries, smallest first.
MARGINS = tuple(round(0.005 * i, 3) for i in range(0, 21))


@dataclass
class RefineState:
    """What refinement has done so far (the executor holds it, the policy
    updates it)."""
    values: np.ndarray                    # the grid's shape (rows, cols or nd, nh, nw), NaN where not computed
    computed: np.ndarray                  # the grid's shape, bool
    estimate: Optional[np.ndarray] = None  # the current map (computed values + interpolation)
    scale: Optional[np.ndarray] = None     # error feature per position (0 where computed)
    k: Optional[float] = None              # fitted error scale: |error| ≈ k * scale
    audited: list = field(default_factory=list)   # (errors, scales) of the audit samples
    estimated_ssim: float = 0.0
    stages: list = field(default_factory=list)   # per stage: dict(stage, positions, computed, estimated_ssim)
    _audit: Optional[np.ndarray] = None    # flat indices of the last batch's audit sample
    residual: Optional[np.ndarray] = None  # |value - estimate before it was computed|, 0 elsewhere
    unit: int = 1                          # batches are a multiple of this many positions

    @property
    def sigma(self) -> np.ndarray:
        return (self.k or 0.0) * self.scale


@dataclass(frozen=True)
class RefinePolicy:
    """The decisions of an adaptive refinement plan.

    Attributes:
        target: the SSIM ``s`` the query asks for.
        margin: added to ``target`` before stopping (calibrated by TUNE).
        step: lattice step of the first pass, in grid positions (a power of 2).
        batch: positions per refinement batch, as a share of the grid.
        audit: share of each batch drawn at random among the positions not
            computed yet (the rest: the cells with the largest predicted
            error). The random part is an unbiased sample of the error of
            the positions left, which the error scale is fitted on.
        history: the error scale is fitted on the audit samples of this many
            last batches.
        seed: seed of the audit draws and of the Monte Carlo SSIM estimate
            (a run is reproducible).
        expected_share: the median share of the grid it computed on the
            tuning images (None: not calibrated); the runtime estimate reads it.

    Immutable, like the plan's other records: the state of a run is a
    :class:`RefineState`.
    """
    target: float
    margin: float = DEFAULT_MARGIN
    step: int = DEFAULT_STEP
    batch: float = DEFAULT_BATCH
    audit: float = DEFAULT_AUDIT
    seed: int = 0
    history: int = DEFAULT_HISTORY
    expected_share: Optional[float] = None   # share of the grid it computed on the tuning images

    @property
    def goal(self) -> float:
        return min(1.0, self.target + self.margin)

    def describe(self) -> str:
        return (f"lattice every {self.step} positions, then batches of {100 * self.batch:g} % of the grid "
                f"({100 * self.audit:.0f} % of each at random to fit the error model) until the estimated "
                f"SSIM ≥ {self.goal:.3f} (target {self.target:g} + margin {self.margin:.3f})")

    # -- what to compute ---------------------------------------------------------
    def initial(self, shape: tuple[int, ...]) -> np.ndarray:
        """Flat indices of the first pass: the lattice of every ``step``-th
        position along each axis (rows and columns; on a volume's
        ``(nd, nh, nw)`` grid depth too), the last one of each axis included."""
        axes = np.meshgrid(*(_lattice(n, self.step) for n in shape), indexing="ij")
        return np.ravel_multi_index(axes, shape).ravel()

    def too_small(self, shape: tuple[int, ...]) -> Optional[str]:
        """Why a grid of this shape is too small to refine (None: it is not).
        Two levels below the lattice are needed along each axis of an image
        for the first estimate to skip anything worth it and for the error
        scale to be fitted on more than a handful of positions; a volume's
        grid has a cell per lattice step along three axes, so one level
        (two lattice steps per axis: 2x2x2 cells) holds as many positions to
        estimate and to fit the error on as two do on an image."""
        need = (4 if len(shape) == 2 else 2) * self.step + 1
        if min(shape) < need:
            dims = "x".join(map(str, shape))
            return (f"the grid ({dims}) is too small to refine: it needs at least "
                    f"{'x'.join([str(need)] * len(shape))} positions (a lattice every {self.step} positions "
                    f"and room to estimate the error between them)")
        return None

    def batch_size(self, shape: tuple[int, ...]) -> int:
        return max(1, int(math.ceil(self.batch * math.prod(shape))))

    def start(self, shape: tuple[int, ...], unit: int = 1) -> RefineState:
        """The state before anything is computed. ``unit``: the plan's batch
        size; refinement batches are rounded up to a multiple of it, so no
        IVM call runs a batch half full."""
        return RefineState(values=np.full(shape, np.nan), computed=np.zeros(shape, bool), unit=max(1, int(unit)))

    def batches(self, plan, positions: np.ndarray):
        """``(order, bounds)``: ``positions`` split into the plan's MQO
        batches (one IVM call per layer each)."""
        from kql.planner.rules.mqo_batches import batches_for
        return batches_for(plan, positions)

    def update(self, state: RefineState, idx: np.ndarray, values: np.ndarray, stage: str) -> None:
        """Record computed ``values`` at flat indices ``idx``; refit the error
        scale on the audit sample among them (they were estimated before),
        re-estimate the map and its SSIM."""
        from scipy.ndimage import maximum_filter
        idx = np.asarray(idx, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if state._audit is not None and len(state._audit):
            where = {int(i): j for j, i in enumerate(idx.tolist())}
            pick = np.array([where[int(i)] for i in state._audit if int(i) in where], dtype=np.int64)
            if len(pick):
                a = idx[pick]
                state.audited.append((values[pick] - state.estimate.reshape(-1)[a],
                                      state.scale.reshape(-1)[a]))
                state.k = fit_scale(np.concatenate([e for e, _ in state.audited[-self.history:]]),
                                    np.concatenate([f for _, f in state.audited[-self.history:]]))
        if state.estimate is not None:
            state.residual.reshape(-1)[idx] = np.abs(values - state.estimate.reshape(-1)[idx])
        else:
            state.residual = np.zeros(state.values.shape)
        state.values.reshape(-1)[idx] = values
        state.computed.reshape(-1)[idx] = True
        state.estimate, state.scale = interpolate(state.values, state.computed, self.step)
        # Errors cluster: a position near one whose estimate was far off is
        # likely off too, whatever the spread of its cell's corners says.
        near = maximum_filter(state.residual, size=2 * self.step + 1)
        state.scale = np.where(state.computed, 0.0, state.scale + near)
        state.estimated_ssim = self.estimated_ssim(state)
        state.stages.append({"stage": stage, "positions": int(len(idx)),
                             "computed": int(state.computed.sum()),
                             "estimated_ssim": state.estimated_ssim})

    def next(self, state: RefineState) -> np.ndarray:
        """Flat indices to compute next; empty when refinement stops (the
        estimated SSIM reached ``target + margin``, or everything is computed)."""
        todo = ~state.computed.reshape(-1)
        if not todo.any():
            return np.zeros(0, np.int64)
        if self.reached(state.stages):
            return np.zeros(0, np.int64)
        left = int(todo.sum())
        n = self.batch_size(state.computed.shape)
        n = min(-(-n // state.unit) * state.unit, left)
        rng = np.random.default_rng(self.seed + int(state.computed.sum()))
        n_audit = min(left, n, max(MIN_AUDIT, int(round(self.audit * n))))
        audit = rng.choice(np.flatnonzero(todo), size=n_audit, replace=False)
        chosen = set(audit.tolist())
        for i in cells_by_error(state, self.step):
            if len(chosen) >= n:
                break
            chosen.update(i.tolist())
        state._audit = audit
        return np.array(sorted(chosen), dtype=np.int64)

    def reached(self, stages) -> bool:
        """Whether refinement stops after these stages: the SSIM estimate
        (made once the error scale is fitted, from the second stage on) was
        at least ``target + margin`` after each of the last :data:`CONFIRM`
        stages (one estimate from a noisy audit sample is not enough)."""
        fitted = [st["estimated_ssim"] for st in stages[1:]]
        return len(fitted) >= CONFIRM and all(e >= self.goal for e in fitted[-CONFIRM:])

    # -- the check ---------------------------------------------------------------
    def estimated_ssim(self, state: RefineState) -> float:
        """Expected SSIM of the current map against the exact one under the
        fitted error model (1.0 when everything is computed; 0.0 before the
        error scale has been fitted)."""
        if state.computed.all():
            return 1.0
        if state.k is None:
            return 0.0
        return expected_ssim(state.estimate, state.sigma, self.seed)


def heatmap_ssim(exact: np.ndarray, approx: np.ndarray) -> float:
    """SSIM of an approximate heatmap against the exact one (how and why:
    :mod:`kql.tune`): ``data_range`` the exact heatmap's peak-to-peak, a uniform
    window of 7, or the largest odd size that fits.

    Raises:
        PlanError: the heatmaps differ in shape, are smaller than 3x3, or the
            exact one is flat (peak-to-peak below :data:`FLAT`).

    >>> e = np.outer(np.arange(9.0), np.ones(9)) / 8
    >>> heatmap_ssim(e, e), round(heatmap_ssim(e, e * 0.5 + 0.25), 3)
    (1.0, 0.798)
    """
    from skimage.metrics import structural_similarity
    exact = np.asarray(exact, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    if exact.shape != approx.shape:
        raise PlanError(f"cannot compare heatmaps of shapes {exact.shape} and {approx.shape}")
    if min(exact.shape) < 3:   # an image's (rows, cols) or a volume's (nd, nh, nw)
        raise PlanError(f"a {'x'.join(map(str, exact.shape))} heatmap is too small for SSIM (at least "
                        f"{'x'.join('3' * exact.ndim)} positions): use a smaller STRIDE")
    span = float(np.ptp(exact))
    if span < FLAT:
        raise PlanError(f"the exact heatmap is flat (its probability spans {span:.2g} < {FLAT:g}): "
                        f"SSIM is undefined")
    win = min(7, *exact.shape)
    win -= 1 - win % 2
    return float(structural_similarity(exact, approx, data_range=span, win_size=win))


def _lattice(n: int, step: int) -> np.ndarray:
    out = np.arange(0, n, step)
    return out if out[-1] == n - 1 else np.append(out, n - 1)


def fit_scale(err: np.ndarray, scale: np.ndarray) -> float:
    """``k`` with ``|err| ≈ k * scale`` in the RMS sense (0 when nothing moved)."""
    den = float(np.sqrt(np.mean(np.square(scale))))
    num = float(np.sqrt(np.mean(np.square(err))))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return num / den


def _levels(step: int) -> list[int]:
    """Cell sizes from the finest (2) to the lattice's step: 2, 4, ..., step."""
    out, s = [], 2
    while s < step:
        out.append(s)
        s *= 2
    return out + [max(step, 1)]


def _cells(shape, s):
    """Per axis, the first and last coordinate ``(lo, hi)`` of each
    position's cell at size ``s`` (arrays broadcasting to ``shape``; the
    last cell of an axis may be shorter)."""
    out = []
    for axis, n in enumerate(shape):
        at = np.arange(n).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        lo = np.minimum((at // s) * s, n - 1)
        out.append((lo, np.minimum(lo + s, n - 1)))
    return out


def _corners(bounds):
    """The index tuples of a cell's ``2^N`` corners (the first axis slowest)."""
    return [tuple(b[bit] for b, bit in zip(bounds, bits))
            for bits in itertools.product((0, 1), repeat=len(bounds))]


def _all_computed(computed, corners) -> np.ndarray:
    return np.logical_and.reduce([computed[c] for c in corners])


def interpolate(values: np.ndarray, computed: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The map and each position's error feature (0 at computed positions).

    Each position not computed is interpolated multilinearly (bilinearly on
    an image's grid, trilinearly on a volume's) in the finest cell (of size
    2, 4, ..., ``step``, aligned to the lattice) whose corners are all
    computed; its error feature is the spread (max - min) of those corners.
    The lattice holds every cell of size ``step``, so every position has one.
    """
    shape = values.shape
    est = np.where(computed, values, np.nan)
    feat = np.zeros(shape)
    for s in _levels(step):
        bounds = _cells(shape, s)
        corners = _corners(bounds)
        fill = np.isnan(est) & _all_computed(computed, corners)
        if not fill.any():
            continue
        weights = []
        for axis, (lo, hi) in enumerate(bounds):
            at = np.arange(shape[axis]).reshape(lo.shape)
            weights.append(np.where(hi > lo, (at - lo) / np.maximum(hi - lo, 1), 0.0))
        c = [np.where(computed[i], values[i], 0.0) for i in corners]
        inter = 0.0
        for bits, ci in zip(itertools.product((0, 1), repeat=len(shape)), c):
            w = 1.0
            for bit, wa in zip(bits, weights):
                w = w * (wa if bit else 1 - wa)
            inter = inter + w * ci
        spread = np.maximum.reduce(c) - np.minimum.reduce(c)
        est[fill] = np.broadcast_to(inter, shape)[fill]
        feat[fill] = spread[fill]
    bad = np.isnan(est)
    if bad.any():   # cannot happen with the lattice computed; keep the map finite anyway
        est[bad] = np.nanmean(values)
        feat[bad] = np.nanmax(values) - np.nanmin(values)
    return est, feat


def cells_by_error(state: RefineState, step: int):
    """Groups of positions to compute, largest predicted error first: for
    each cell in which positions are interpolated, the corners of its
    half-size cells (computing them refines the cell one level), or, for a
    cell of size 2, all its positions."""
    shape = state.computed.shape
    todo = ~state.computed
    # the interpolation level of each position: the finest cell with computed corners
    level = np.zeros(shape, int)
    for s in reversed(_levels(step)):
        level[_all_computed(state.computed, _corners(_cells(shape, s))) & todo] = s
    level[~todo] = 0
    sizes = np.unique(level[todo])
    scores, cells = [], []
    for s in sizes.tolist():
        sel = todo & (level == s)
        cid = np.ravel_multi_index([np.broadcast_to(lo, shape)[sel] for lo, _ in _cells(shape, s)], shape)
        uniq, inv = np.unique(cid, return_inverse=True)
        score = np.bincount(inv, weights=state.scale[sel])
        cells += [(s, u) for u in uniq.tolist()]
        scores += score.tolist()
    for j in np.argsort(-np.asarray(scores), kind="stable"):
        s, u = cells[j]
        h = s // 2
        axes = []
        for c, n in zip(np.unravel_index(u, shape), shape):
            at = np.arange(c, min(c + s, n - 1) + 1, max(h, 1))
            axes.append(np.unique(np.append(at, min(c + s, n - 1))) if s > 2 else at)
        idx = np.ravel_multi_index(np.meshgrid(*axes, indexing="ij"), shape).ravel()
        idx = idx[todo.reshape(-1)[idx]]
        if len(idx):
            yield idx


def expected_ssim(estimate: np.ndarray, sigma: np.ndarray, seed: int = 0, draws: int = DRAWS) -> float:
    """Mean heatmap SSIM of ``estimate`` against ``estimate + noise`` with
    independent Gaussian noise of scale ``sigma`` per position."""
    if not np.any(sigma > 0):
        return 1.0
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        exact = estimate + rng.standard_normal(estimate.shape) * sigma
        # a map that barely moves: SSIM is undefined, and nothing is left to get wrong
        out.append(1.0 if np.ptp(exact) < FLAT else heatmap_ssim(exact, estimate))
    return float(np.mean(out))


def trajectory(policy: RefinePolicy, exact: np.ndarray) -> list[tuple[float, float, float]]:
    """Refinement replayed on a known exact heatmap until every position is
    computed: per stage ``(share of positions computed, estimated SSIM, SSIM
    against exact)``. Computed values are exact values, so this is what a run
    gives (up to float rounding) and costs no inference: TUNE calibrates the
    margin with it. The policy's target does not matter (it never stops)."""
    exact = np.asarray(exact, dtype=np.float64)
    never = RefinePolicy(target=1.0, margin=1.0, step=policy.step, batch=policy.batch, audit=policy.audit,
                         seed=policy.seed, history=policy.history)
    state = never.start(exact.shape)
    todo = never.initial(exact.shape)
    out = []
    stage = "lattice"
    while len(todo):
        never.update(state, todo, exact.reshape(-1)[todo], stage)
        stage = "refine"
        out.append((float(state.computed.mean()), state.estimated_ssim, heatmap_ssim(exact, state.estimate)))
        todo = never.next(state)
    return out


def stop_point(traj, goal: float) -> tuple[float, float]:
    """``(share, SSIM)`` where a run stopping at estimated SSIM ≥ ``goal``
    (:meth:`RefinePolicy.reached`) stops on this trajectory."""
    for i in range(len(traj)):
        fitted = [est for _, est, _ in traj[1:i + 1]]
        if len(fitted) >= CONFIRM and all(e >= goal for e in fitted[-CONFIRM:]):
            return traj[i][0], traj[i][2]
    return traj[-1][0], traj[-1][2]
