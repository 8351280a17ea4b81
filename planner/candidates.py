"""The SSIM contract: which approximate plan ``APPROX SSIM s`` runs.

``APPROX SSIM s`` promises a heatmap whose SSIM against the exact one is at
least ``s``, as far as the engine can predict and check. The optimizer lists
the strategies it knows, predicts each one's SSIM (from the ``TUNE``
calibration) and its cost (FLOPs from the cost model, as a share of the exact
plan's; EXPLAIN turns it into seconds with the runtime model), and runs the
cheapest one that meets ``s``. None meets it, or none is cheaper than exact:
the query runs exact and says why.

The strategies:

- **exact** (SSIM 1, the fallback);
- **τ** -- projective-field thresholding at the τ the calibration picks for
  ``s`` (:meth:`kql.calibration.Calibration.tau_for`); predicted SSIM: what
  :data:`kql.calibration.COVERAGE` of the tuning images reached at that τ;
- **drill-down** (Krypton 4.3, only when the query says ``DRILLDOWN``): the
  fixed two-stage plan of its FRACTION and SPEEDUP; predicted SSIM: the same
  share of the tuning images' drill-down SSIM, replayed on the exact heatmaps
  the calibration keeps (stage one and two run exact values, so replaying on
  an exact heatmap is what running it gives);
- **refine** -- adaptive refinement (``planner.refine``), which checks its
  estimate of the SSIM at run time and stops at ``s`` plus the calibrated
  margin; predicted cost: the median share of positions it computed on the
  tuning images. ``DRILLDOWN`` written with ``APPROX SSIM`` adds the
  drill-down candidate: the user's permission to skip positions, never a
  licence to miss ``s`` (rejected, the query says so and runs the plan
  chosen instead);
- **gates** -- on a model with squeeze-and-excitation gates
  (``planner.gates``), gate freezing: ``gates local`` / ``gates frozen``
  alone (every other region exact) and ``τ t + gates <mode>`` at the τ the
  calibration's gate measurements pick for ``s`` by the τ rule
  (:meth:`kql.calibration.Calibration.gate_tau_for`); predicted SSIM: what
  :data:`kql.calibration.COVERAGE` of the tuning images reached with those
  gates and τ; cost: the cost model's FLOPs with the gates approximated (a
  frozen gate no longer spreads a patch's change over every later map). A
  calibration made before TUNE measured gates gives them rejected, with a
  note to TUNE again. A ``GATES`` clause written with ``APPROX SSIM``
  restricts the gate candidates: ``GATES LOCAL`` or ``FROZEN`` allows only
  that mode, ``GATES EXACT`` none; like ``DRILLDOWN`` it never lowers ``s``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One plan ``APPROX SSIM s`` considered.

    Attributes:
        name: ``exact``, ``τ 0.7``, ``drill-down S1 16x16 r 0.25``, ``refine``.
        predicted_ssim: the SSIM predicted against exact (None: no prediction).
        cost: FLOPs as a share of the exact plan's (1.0 for exact).
        meets: whether it is predicted to meet the target.
        note: why it was rejected, or how the prediction was made.
        chosen: the one that runs.
        tau: the threshold of a τ plan (None for ``gates <mode>`` alone).
        gates: how a gate plan treats global gates (``local``, ``frozen``;
            ``exact`` for every other plan).
    """
    name: str
    predicted_ssim: Optional[float]
    cost: float
    meets: bool
    note: str = ""
    chosen: bool = False
    tau: Optional[float] = None
    gates: str = "exact"

    def predicted_seconds(self, exact_parts: dict) -> float:
        """Seconds from the exact plan's runtime estimate (``Estimate.parts``):
        reference and views once, the batches scaled by the cost share."""
        fixed = exact_parts.get("reference", 0.0) + exact_parts.get("views", 0.0)
        return fixed + self.cost * exact_parts.get("batches", 0.0)


def enumerate_plans(plan, target: float, calibration, policy, refine_share: Optional[float],
                    tau_cost, refine_measured: bool = True, gate_modes: tuple = (),
                    gate_cost=None) -> list[Candidate]:
    """The candidates for ``APPROX SSIM target`` (see the module docstring).

    ``policy`` is the refinement policy the plan would run, ``refine_share``
    the share of positions refinement computed on the tuning images (None:
    not calibrated), ``tau_cost(tau)`` the cost share of a τ plan.
    ``gate_modes``: the gate modes to consider (empty: the model has no
    global gates, or the query says ``GATES EXACT``); ``gate_cost(tau,
    mode)`` the cost share of a gate plan (τ None: gates alone).
    """
    out = [Candidate("exact", 1.0, 1.0, True, "computes every position")]
    if calibration is None:
        out.append(Candidate("τ", None, float("nan"), False,
                             "no TUNE calibration: its SSIM cannot be predicted"))
    else:
        tau = calibration.tau_for(target)
        below = [t for t in calibration.taus if t < 1]
        if tau >= 1 and not below:
            out.append(Candidate("τ", None, 1.0, False, "the calibration tuned no τ < 1"))
        else:
            # the τ it picks, or, when none qualifies, the mildest tuned one (rejected)
            t = tau if tau < 1 else max(below)
            reached = calibration.reached(t)
            meets = tau < 1 and reached >= target
            note = f"{calibration.coverage_text()} reached {reached:.3f}"
            out.append(Candidate(f"τ {t:g}", reached, tau_cost(t), meets, note, tau=t))
    for mode in gate_modes:
        out += _gate_candidates(mode, target, calibration, gate_cost)
    dd = plan.query.drilldown
    if dd is not None:
        from kql.planner.drilldown import expected_speedup, stage_one_stride
        nd = len(plan.stride)
        s1 = tuple(stage_one_stride(s, dd.fraction, dd.speedup, nd) for s in plan.stride)
        name = f"drill-down S1 {'x'.join(map(str, s1))} r {dd.fraction:g}"
        share = 1.0 / math.prod(expected_speedup(a, b, dd.fraction, nd)
                                for a, b in zip(s1, plan.stride)) ** (1.0 / nd)
        predicted = None if calibration is None else calibration.drilldown_ssim(dd.fraction, s1, plan.stride)
        if predicted is None:
            out.append(Candidate(name, None, share, False, "its SSIM cannot be predicted (no calibration "
                                                           "holding exact heatmaps)"))
        else:
            out.append(Candidate(name, predicted, share, predicted >= target,
                                 f"replayed on {calibration.coverage_text()}"))
    small = policy.too_small(plan.grid.shape)
    if plan.label_choice.several is not None:
        # the executor computes every position of every map (refinement
        # chooses positions for one map): refinement would be exact's work
        out.append(Candidate("refine", None, 1.0, False,
                             "it refines one map; several labels compute every position of each"))
    elif small:
        out.append(Candidate("refine", None, 1.0, False, small))
    elif not refine_measured:
        out.append(Candidate("refine", None, float("nan"), False,
                             "the calibration predates adaptive refinement: TUNE again to measure it"))
    elif refine_share is None:
        out.append(Candidate("refine", None, 1.0, False,
                             f"on the tuning images no safety margin made its run-time check reach "
                             f"{target:g}"))
    else:
        how = (f"stops at estimated SSIM ≥ {policy.goal:.3f} (target + calibrated margin "
               f"{policy.margin:.3f}); computed a median {100 * refine_share:.0f} % of the positions on the "
               f"tuning images")
        out.append(Candidate("refine", target, refine_share, True, how))
    cheaper = [c for c in out if c.meets and c.cost < 1.0]
    best = min(cheaper, key=lambda c: c.cost) if cheaper else out[0]
    return [dataclasses.replace(c, chosen=True) if c is best else c for c in out]


def _gate_candidates(mode: str, target: float, calibration, gate_cost) -> list[Candidate]:
    """``gates <mode>`` alone and with the τ the calibration picks for
    ``target`` (or, when none qualifies, the mildest tuned one, rejected)."""
    alone = f"gates {mode}"
    if calibration is None:
        return [Candidate(alone, None, float("nan"), False, "no TUNE calibration: its SSIM cannot be predicted",
                          gates=mode)]
    reached = calibration.gate_reached(mode, 1.0)
    if reached is None:
        return [Candidate(alone, None, gate_cost(None, mode), False,
                          "the calibration has no gate measurements: TUNE again to measure gate freezing",
                          gates=mode)]
    where = calibration.coverage_text()
    out = [Candidate(alone, reached, gate_cost(None, mode), reached >= target, f"{where} reached {reached:.3f}",
                     gates=mode)]
    below = [float(t) for t in calibration.gates["taus"] if t < 1]
    if below:
        tau = calibration.gate_tau_for(mode, target)
        t = tau if tau is not None and tau < 1 else max(below)
        got = calibration.gate_reached(mode, t)
        meets = tau is not None and tau < 1 and got >= target
        out.append(Candidate(f"τ {t:g} + gates {mode}", got, gate_cost(t, mode), meets, f"{where} reached {got:.3f}",
                             tau=t, gates=mode))
    return out


def table_lines(candidates, target: float, exact_parts: Optional[dict]) -> list[str]:
    """EXPLAIN's lines: one per candidate, the chosen one marked."""
    lines = [f"APPROX SSIM {target:g}: plans considered (predicted SSIM vs exact, predicted time from the "
             f"runtime model, share of the exact plan's work):"]
    for c in candidates:
        ssim = "-" if c.predicted_ssim is None else (f"≥{c.predicted_ssim:.3f} (checked at run time)"
                                                    if c.name == "refine" and c.meets else
                                                    f"{c.predicted_ssim:.3f}")
        cost = "-" if not np.isfinite(c.cost) else f"{100 * c.cost:.0f} %"
        secs = ""
        if exact_parts is not None and np.isfinite(c.cost):
            from kql.planner.plan import format_seconds
            secs = f", ≈{format_seconds(c.predicted_seconds(exact_parts))}"
        mark = "→" if c.chosen else ("✓" if c.meets else "✗")
        lines.append(f"  {mark} {c.name}: SSIM {ssim}, work {cost}{secs}; {c.note}")
    return lines
