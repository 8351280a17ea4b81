"""Adaptive drill-down (Krypton section 4.3): a coarse pass, then a fine one
where the coarse heatmap says the prediction is sensitive.

Stage one runs the query at a stride ``S1`` larger than the query's ``S2``.
Its heatmap is interpolated onto the query's grid; the fraction ``r`` of the
grid's positions with the largest estimated probability drop is then run at
the query's stride (stage two). The answer is on the query's grid: the
positions stage two ran and those stage one ran exactly (``S1`` is a multiple
of ``S2``, so the coarse grid lies on the fine one) hold computed
probabilities, the rest the interpolated stage-one estimate.

The user gives ``r`` and a target speedup ``t`` over running the whole fine
grid; Krypton eq. 47 gives the stride,
``S1 = S2 * sqrt(t / (1 - r t))``, possible only for ``t < 1 / r`` (eq. 48),
and eq. 46 the speedup of a stride, ``S1^2 / (S2^2 + r S1^2)``. Here ``S1`` is
a multiple of ``S2`` (per axis; the one whose eq. 46 speedup is closest to
the target), so that stage one's values are exact values of the query's
grid, and EXPLAIN reports the speedup of the stride actually used, from eq.
46 and from the position counts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kql.errors import PlanError
from kql.planner.plan import batch_bounds


def stage_one_stride(s2: int, fraction: float, speedup: float, ndim: int = 2) -> int:
    """``S1`` for one axis: eq. 47 gives ``S2 * f``; of the two multiples of
    ``S2`` around it, the one whose eq. 46 speedup is closer to the target
    (the smaller on a tie), at least ``S2``. On a volume (``ndim`` 3) the
    coarse grid thins out along three axes, so ``f`` is the cube root of
    ``t / (1 - r t)`` instead of the square root.

    >>> stage_one_stride(4, 0.25, 3.0)    # f = 3.46: 3 gives 2.77x, 4 gives 3.2x
    16
    >>> stage_one_stride(2, 0.1, 5.0)     # f = 3.16: 3 gives 4.74x, 4 gives 6.15x
    6
    >>> stage_one_stride(4, 0.25, 3.0, ndim=3)   # f = 2.29: 2 gives 2.67x, 3 gives 3.48x
    8
    """
    check(fraction, speedup)
    factor = (speedup / (1.0 - fraction * speedup)) ** (1.0 / ndim)
    candidates = sorted({max(1, math.floor(factor)), max(1, math.ceil(factor))})
    best = min(candidates, key=lambda m: abs(expected_speedup(m, 1, fraction, ndim) - speedup))
    return s2 * best


def expected_speedup(s1: float, s2: float, fraction: float, ndim: int = 2) -> float:
    """Krypton eq. 46: positions of a full fine pass over those of drill-down,
    ``f^n / (1 + r f^n)`` with ``f = S1 / S2`` along each of ``ndim`` axes
    (``S1^2 / (S2^2 + r S1^2)`` on an image).

    >>> round(expected_speedup(12, 4, 0.25), 2)
    2.77
    """
    f = (s1 / s2) ** ndim
    return f / (1.0 + fraction * f)


def check(fraction: float, speedup: float) -> None:
    """Reject impossible drill-down settings with a message that says why."""
    if not 0 < fraction < 1:
        raise PlanError(f"DRILLDOWN FRACTION must be between 0 and 1 (exclusive), got {fraction:g}")
    if speedup <= 1:
        raise PlanError(f"DRILLDOWN SPEEDUP must be above 1, got {speedup:g}")
    if speedup * fraction >= 1:
        raise PlanError(f"DRILLDOWN SPEEDUP {speedup:g} is impossible with FRACTION {fraction:g}: stage two "
                        f"alone runs {fraction:g} of the positions, so the speedup must stay below "
                        f"1/FRACTION = {1 / fraction:.3g} (Krypton eq. 48)")


@dataclass
class StageTwo:
    """Drill-down's stage two, decided at run time (:meth:`DrilldownPlan.stage_two`).

    Attributes:
        estimate: float32 ``(rows, cols)`` (``(nd, nh, nw)`` on a volume):
            stage one interpolated onto the query's grid (its own positions exact).
        positions: flat indices of the positions stage two runs.
        order, bounds: the batches they run in (``Plan.batches`` form).
        computed: boolean ``(rows, cols)``: positions computed by either stage.
    """
    estimate: np.ndarray
    positions: np.ndarray
    order: np.ndarray
    bounds: np.ndarray
    computed: np.ndarray


@dataclass
class DrilldownPlan:
    """The two stages of a drill-down plan.

    Attributes:
        stage_one: the optimized :class:`~kql.planner.plan.Plan` of the
            coarse pass (the query at stride ``stride_one``).
        stride_one, stride_two: ``(h, w)`` (``(d, h, w)``) strides of the two stages.
        fraction, speedup: ``r`` and the target ``t`` the user asked for.
        n_fine: positions of the query's (fine) grid.
        n_select: ``ceil(r * n_fine)``, the positions stage two covers
            (those stage one already ran are not run again).
        on_coarse: boolean ``(rows, cols)`` mask of the fine grid: the
            positions stage one runs.
    """
    stage_one: Any
    stride_one: tuple[int, int]
    stride_two: tuple[int, int]
    fraction: float
    speedup: float
    n_fine: int
    n_select: int
    on_coarse: np.ndarray


    def stage_two(self, fine, coarse: np.ndarray) -> "StageTwo":
        """What stage two of the query's plan ``fine`` runs, decided from stage
        one's probabilities ``coarse`` (flat, row-major over the coarse grid):
        the executor calls this between the stages. Stage one's values are
        interpolated onto the query's grid; the ``n_select`` positions with the largest drop,
        less those stage one ran, are batched as the fine plan batches them."""
        one = self.stage_one
        coarse = np.asarray(coarse).reshape(one.grid.shape)
        estimate = interpolate_nd(one.grid.starts, coarse, fine.grid.starts).astype(np.float32)
        # Positions of the coarse grid are on the fine grid: keep their computed
        # values exactly (interpolation at a node returns it, up to rounding).
        estimate[self.on_coarse] = coarse.ravel()
        chosen = select(estimate, self.n_select)
        todo = chosen[~self.on_coarse.ravel()[chosen]]
        if fine.incremental:
            from kql.planner.rules.mqo_batches import batches_for
            order, bounds = batches_for(fine, todo)
        else:
            order = np.sort(todo).astype(np.int64)
            bounds = batch_bounds(len(order), fine.batch_size)
        computed = self.on_coarse.ravel().copy()
        computed[todo] = True
        return StageTwo(estimate, todo, order, bounds, computed.reshape(self.on_coarse.shape))

    @property
    def n_coarse(self) -> int:
        return self.stage_one.n_positions

    @property
    def expected_speedup(self) -> float:
        """Eq. 46 with the rounded stride (geometric mean over the axes)."""
        n = len(self.stride_one)
        each = [expected_speedup(a, b, self.fraction, n) for a, b in zip(self.stride_one, self.stride_two)]
        return math.prod(each) ** (1.0 / n)

    @property
    def max_positions(self) -> int:
        """Most positions the two stages run together."""
        return self.n_coarse + self.n_select

    @property
    def position_speedup(self) -> float:
        """Fine-grid positions over the most positions drill-down runs."""
        return self.n_fine / self.max_positions


def plan_drilldown(bound, fine, optimize, **kwargs):
    """Attach a :class:`DrilldownPlan` to the optimized fine plan ``fine``.

    ``bound`` is the plan as the binder made it (before any rule), from which
    stage one is optimized with the coarse stride; ``optimize`` is
    :func:`kql.planner.optimizer.optimize`.
    """
    dd = fine.query.drilldown
    check(dd.fraction, dd.speedup)
    s2 = fine.stride
    s1 = tuple(stage_one_stride(s, dd.fraction, dd.speedup, len(s2)) for s in s2)
    coarse = bound.copy()
    coarse.query = dataclasses.replace(fine.query, stride=s1, drilldown=None, into=None)
    stage_one = optimize(coarse, **kwargs)
    on_coarse = np.ones(fine.grid.shape, bool)
    for a, (f, c) in enumerate(zip(fine.grid.starts, stage_one.grid.starts)):
        on_coarse &= np.isin(f, c).reshape([-1 if b == a else 1 for b in range(len(s2))])
    n_fine = fine.n_positions
    n_select = min(n_fine, int(math.ceil(dd.fraction * n_fine)))
    plan = DrilldownPlan(stage_one, s1, s2, dd.fraction, dd.speedup, n_fine, n_select, on_coarse)
    fine.drilldown = plan
    if s1 == s2:
        fine.warnings.append(f"DRILLDOWN SPEEDUP {dd.speedup:g} with FRACTION {dd.fraction:g} gives a stage-one "
                             f"stride equal to the query's: stage one covers the whole grid")

    fine.record("drilldown", f"stage one at stride {'x'.join(map(str, s1))} (eq. 47 for r = {dd.fraction:g}, "
                             f"t = {dd.speedup:g}, to a multiple of the stride): "
                             f"{stage_one.n_positions} positions, then ≤{n_select} of {n_fine} at "
                             f"stride {'x'.join(map(str, s2))}; expected speedup {plan.expected_speedup:.2f}x")
    return fine


def interpolate(ys1: np.ndarray, xs1: np.ndarray, coarse: np.ndarray,
                ys2: np.ndarray, xs2: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a heatmap on grid ``(ys1, xs1)`` onto grid
    ``(ys2, xs2)`` (patch coordinates; the grids' last steps may be short,
    so the interpolation is on coordinates, not indices). Exact at the
    coarse grid's own positions.

    >>> interpolate(np.array([0, 4]), np.array([0]), np.array([[0.], [1.]]),
    ...             np.array([0, 1, 2, 4]), np.array([0])).ravel().tolist()
    [0.0, 0.25, 0.5, 1.0]
    """
    return interpolate_nd((ys1, xs1), coarse, (ys2, xs2))


def interpolate_nd(grid1, coarse: np.ndarray, grid2) -> np.ndarray:
    """:func:`interpolate` on any number of axes (``(zs, ys, xs)`` grids on a
    volume): linear along each axis in turn (bilinear, trilinear), on
    coordinates; exact at the coarse grid's own positions.

    >>> interpolate_nd((np.array([0, 2]),) * 3, np.arange(8.0).reshape(2, 2, 2),
    ...                (np.array([1]),) * 3).ravel().tolist()
    [3.5]
    """
    out = np.asarray(coarse, dtype=np.float64)
    for axis, (a1, a2) in enumerate(zip(grid1, grid2)):
        out = np.apply_along_axis(lambda v: np.interp(a2, a1, v), axis, out)
    return out


def select(estimate: np.ndarray, n_select: int) -> np.ndarray:
    """Flat indices of the ``n_select`` positions with the lowest estimated
    probability (the largest drop), ties in row-major order."""
    return np.argsort(estimate.ravel(), kind="stable")[:n_select]


def replay(exact: np.ndarray, ratio: tuple[int, ...], fraction: float) -> np.ndarray:
    """The heatmap drill-down returns when every value it computes is the
    exact one (``exact``, the full heatmap): stage one on every ``ratio``-th
    position along each axis (row and column; on a volume's ``(nd, nh, nw)``
    grid depth too; the last ones included, as the grid aligns them), stage
    two on the ``ceil(fraction * n)`` positions with the lowest estimate.
    ``TUNE``'s calibration predicts drill-down's SSIM with it.

    >>> e = np.arange(25.0).reshape(5, 5)
    >>> bool(np.allclose(replay(e, (2, 2), 0.2), e))   # linear: interpolation is exact
    True
    >>> v = np.arange(125.0).reshape(5, 5, 5)
    >>> bool(np.allclose(replay(v, (2, 2, 2), 0.2), v))
    True
    """
    shape = exact.shape
    axes = [np.unique(np.append(np.arange(0, n, r), n - 1)) for n, r in zip(shape, ratio)]
    coarse = np.ix_(*axes)
    out = interpolate_nd(axes, exact[coarse], [np.arange(n) for n in shape])
    out[coarse] = exact[coarse]
    chosen = select(out, min(exact.size, int(math.ceil(fraction * exact.size))))
    flat = out.reshape(-1)
    flat[chosen] = exact.reshape(-1)[chosen]
    return out
