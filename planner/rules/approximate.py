"""Rule: choose the approximate plan.

``APPROX TAU t`` gives τ itself. ``APPROX SSIM s`` gives a quality target,
a contract over the whole plan: the candidates of ``planner.candidates``
(exact, τ from the calibration, the user's DRILLDOWN, adaptive refinement)
are predicted from the calibration ``TUNE`` stored for this model, weights,
input size and patch, which ``calibrations(spec, input_hw, patch)`` looks up
(the front end hands ``kql.calibration.lookup``, the store being its own),
and the cheapest one predicted to meet ``s`` runs; none: exact, with a
warning that says why. Without a calibration the query runs exact and says
how to make one: a guessed plan could miss the target silently.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from kql.errors import KqlError, PlanError, first_line
from kql.planner.gates import gate_sources
from kql.planner.plan import Approximation, SsimContract


def approximate(plan, calibrations=None):
    """Set ``plan.approximation`` (τ, where it came from, the predicted SSIM)
    and, for ``APPROX SSIM`` with a calibration, ``plan.contract`` (the plans
    considered, the refinement policy if it runs) (changes the plan in place;
    a no-op unless the query says APPROX).
    ``calibrations``: the lookup of stored SSIM calibrations (None: there are none)."""
    gates = plan.query.gates
    if plan.mode != "approx":
        if gates not in (None, "exact"):
            raise PlanError(f"GATES {gates.upper()} approximates: write it with APPROX TAU t "
                            f"(APPROX TAU 1 GATES {gates.upper()} keeps every other region exact)")
        return plan
    approx = plan.query.approx
    keyword = f"APPROX {approx.kind.upper()}"
    if not 0 < approx.value <= 1:
        raise PlanError(f"{keyword} must be in (0, 1], got {approx.value:g}")
    if approx.kind == "tau":
        tau, source = approx.value, keyword
        try:  # only for the SSIM it predicts: an unreadable store does not stop the query
            calibration = _calibration(plan, calibrations)
        except KqlError as e:
            calibration = None
            plan.warnings.append(f"no SSIM prediction: {first_line(e)}")
    elif (calibration := _calibration(plan, calibrations)) is None:
        patch = plan.patch
        plan.mode = "exact"
        plan.warnings.append(
            f"no SSIM calibration for {plan.spec.name} ({plan.spec.weights}) at input "
            f"{'x'.join(map(str, plan.input_hw))} with patch {'x'.join(map(str, patch))}: ran EXACT. "
            f"Calibrate with TUNE {plan.spec.name} ON <sample {'volumes' if plan.ndim == 3 else 'images'}> PATCH "
            f"{patch[0] if len(set(patch)) == 1 else 'x'.join(map(str, patch))}")
        plan.record("approximate", f"{keyword} {approx.value:g}: no calibration, running exact")
        if plan.query.drilldown is not None:   # its SSIM cannot be predicted either
            plan.warnings.append("DRILLDOWN with APPROX SSIM needs the calibration too: ran every position")
            plan.query = dataclasses.replace(plan.query, drilldown=None)
        return plan
    else:
        return _contract(plan, approx.value, calibration)
    if tau >= 1 and gates in (None, "exact"):
        plan.mode = "exact"
        plan.record("approximate", f"{source}: τ = 1 is exact inference")
        return plan
    gates = gates or "exact"
    if gates != "exact":  # predicted when TUNE measured these gates at this τ: the tuning images' mean
        predicted = None if calibration is None else calibration.gate_reached(gates, tau, quantile=None)
        plan.approximation = Approximation(None if tau >= 1 else tau, source, predicted, gates)
        shown = "" if predicted is None else f", predicted SSIM {predicted:.3f}"
        plan.record("approximate", (f"τ = {tau:.3g}" if tau < 1 else "exact regions")
                    + f" from {source}, gates {gates}{shown}")
        return plan
    predicted = None if calibration is None else calibration.predict(tau)
    plan.approximation = Approximation(tau, source, predicted)
    shown = "" if predicted is None else f", predicted SSIM {predicted:.3f}"
    plan.record("approximate", f"τ = {tau:.3g} from {source}{shown}")
    return plan


def _calibration(plan, calibrations):
    """The stored calibration for this plan's model, weights, input size and
    patch, or None."""
    return None if calibrations is None else calibrations(plan.spec, plan.input_hw, plan.patch)


def _contract(plan, target: float, calibration):
    """``APPROX SSIM target`` with a calibration: list the candidates, run the
    cheapest predicted to meet the target (``planner.candidates``)."""
    from kql.planner import refine
    from kql.planner.candidates import enumerate_plans
    from kql.planner.refine import RefinePolicy
    keyword = f"APPROX SSIM {target:g}"
    measured = calibration.refine_margin(target)
    params = calibration.refine or {}
    margin, share = measured if measured is not None else (refine.DEFAULT_MARGIN, None)
    policy = RefinePolicy(target, margin=margin, step=int(params.get("step", refine.DEFAULT_STEP)),
                          batch=float(params.get("batch", refine.DEFAULT_BATCH)),
                          audit=float(params.get("audit", refine.DEFAULT_AUDIT)),
                          history=int(params.get("history", refine.DEFAULT_HISTORY)), expected_share=share)
    gated = bool(gate_sources(plan.graph))
    asked = plan.query.gates
    modes = () if not gated else ("local", "frozen") if asked is None else tuple(m for m in (asked,) if m != "exact")
    cost = work_shares(plan.graph, plan.grid.starts, plan.patch)    # exact's FLOPs once for every candidate
    cands = tuple(enumerate_plans(plan, target, calibration, policy, share, cost,
                                  refine_measured=bool(calibration.refine), gate_modes=modes, gate_cost=cost))
    contract = SsimContract(target, cands)
    chosen = contract.chosen
    if asked is not None and not gated:
        plan.record("approximate", f"GATES {asked.upper()}: {plan.spec.name} has no global gates")
    elif asked in ("local", "frozen") and chosen.gates != asked:
        best = max((c for c in cands if c.gates == asked), key=lambda c: c.meets)
        why = (f"is predicted to reach SSIM {best.predicted_ssim:.3f} < {target:g}"
               if best.predicted_ssim is not None and not best.meets else
               "is slower than the plan chosen" if best.meets else f"has no SSIM prediction ({best.note})")
        plan.warnings.append(f"GATES {asked.upper()} {why}: ran {chosen.name} instead (GATES permits "
                             f"approximating the gates, it does not lower the SSIM target)")
    dd = plan.query.drilldown
    if dd is not None and not chosen.name.startswith("drill-down"):
        rejected = next(c for c in cands if c.name.startswith("drill-down"))
        why = (f"is predicted to reach SSIM {rejected.predicted_ssim:.3f} < {target:g}"
               if rejected.predicted_ssim is not None else "has no SSIM prediction")
        plan.warnings.append(f"DRILLDOWN FRACTION {dd.fraction:g} SPEEDUP {dd.speedup:g} {why}: ran "
                             f"{chosen.name} instead (DRILLDOWN permits skipping positions, it does not "
                             f"lower the SSIM target)")
        plan.query = dataclasses.replace(plan.query, drilldown=None)
    if chosen.name == "exact":
        plan.mode = "exact"
        plan.contract = contract
        reasons = "; ".join(f"{c.name}: {c.note}" for c in cands if c is not chosen and not c.meets)
        faster = [c for c in cands if c.meets and c is not chosen]
        why = (f"no approximate plan is predicted to meet SSIM {target:g}"
               if not faster else f"no approximate plan that meets SSIM {target:g} is predicted to be "
                                  f"faster than exact")
        plan.warnings.append(f"{keyword}: {why}: ran EXACT" + (f" ({reasons})" if reasons else ""))
        plan.record("approximate", f"{keyword}: {why}; running exact")
        return plan
    if chosen.tau is not None or chosen.gates != "exact":
        source = f"{keyword} via {calibration.describe()}"
        plan.approximation = Approximation(chosen.tau, source, chosen.predicted_ssim, chosen.gates)
        plan.contract = contract
        what = (f"τ = {chosen.tau:.3g}" if chosen.tau is not None else "exact regions") + \
            ("" if chosen.gates == "exact" else f", gates {chosen.gates}")
        plan.record("approximate", f"{what} from {source}, predicted SSIM "
                                   f"{chosen.predicted_ssim:.3f} ({chosen.note}), "
                                   f"{100 * chosen.cost:.0f} % of exact's work")
        if plan.label_choice.several is not None:
            plan.warnings.append(f"{keyword}: the calibration predicts the SSIM of the map of the class the "
                                 f"model predicts; other classes' maps at {what} have no "
                                 f"SSIM prediction")
    elif chosen.name == "refine":
        plan.contract = dataclasses.replace(contract, refine=policy)
        plan.record("approximate", f"{keyword}: adaptive refinement, {policy.describe()}; computed a "
                                   f"median {100 * chosen.cost:.0f} % of the positions on the tuning images")
    else:   # the user's drill-down, predicted to meet the target
        # its prediction replays exact values: both stages run exact (stage one is
        # planned from this query, planner.drilldown)
        plan.contract = contract
        plan.query = dataclasses.replace(plan.query, mode="exact")
        plan.record("approximate", f"{keyword}: {chosen.name}, predicted SSIM {chosen.predicted_ssim:.3f} "
                                   f"({chosen.note}); both stages compute exact values")
    return plan


def work_shares(graph, grid_starts, patch):
    """``share(tau, gates)``: the incremental FLOPs of a plan at threshold
    ``tau`` (None or 1: exact regions) with global gates ``gates``, as a share
    of the exact plan's, for a graph and a grid (``Grid.starts``), over every
    third position along each axis (a sample is enough to compare). The exact
    plan's FLOPs are computed once for every plan compared (APPROX SSIM's
    candidates; TUNE records each gate plan's share with it)."""
    from kql.planner.cost import theoretical_speedup
    starts = tuple(a.ravel() for a in np.meshgrid(*(s[::3] for s in grid_starts), indexing="ij"))
    exact = []

    def share(tau: Optional[float], gates: str = "exact") -> float:
        if not exact:
            exact.append(float(np.mean(theoretical_speedup(graph, *starts, patch).inc_flops)))
        tau = None if tau is None or tau >= 1 else tau
        approx = theoretical_speedup(graph, *starts, patch, tau=tau, gates=gates)
        return float(np.mean(approx.inc_flops)) / exact[0]
    return share
