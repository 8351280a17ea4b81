"""Rule: resolve the projective-field threshold τ of an approximate plan.

``APPROX TAU t`` gives τ itself. ``APPROX SSIM s`` gives a quality target:
τ is the smallest threshold whose fitted SSIM reaches ``s`` in the
calibration ``TUNE`` stored for this model, weights, input size and patch
(Krypton section 4.4), which ``calibrations(spec, input_hw, patch)`` looks up:
the front end hands ``kql.calibration.lookup``, the store being its own. Without a calibration the query
runs exact and says how to make one: a guessed τ could miss the target
silently.
"""
from __future__ import annotations

from kql.errors import KqlError, PlanError, first_line
from kql.planner.plan import Approximation


def approximate(plan, calibrations=None):
    """Set ``plan.approximation`` (τ, where it came from, the predicted SSIM)
    (changes the plan in place; a no-op unless the query says APPROX).
    ``calibrations``: the lookup of stored SSIM calibrations (None: there are none)."""
    if plan.mode != "approx":
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
        ph, pw = plan.patch
        plan.mode = "exact"
        plan.warnings.append(
            f"no SSIM calibration for {plan.spec.name} ({plan.spec.weights}) at input "
            f"{plan.input_hw[0]}x{plan.input_hw[1]} with patch {ph}x{pw}: ran EXACT. Calibrate with "
            f"TUNE {plan.spec.name} ON <sample images> PATCH {ph if ph == pw else f'{ph}x{pw}'}")
        plan.record("approximate", f"{keyword} {approx.value:g}: no calibration, running exact")
        return plan
    else:
        tau = calibration.tau_for(approx.value)
        source = f"{keyword} {approx.value:g} via {calibration.describe()}"
    if tau >= 1:
        plan.mode = "exact"
        plan.record("approximate", f"{source}: τ = 1 is exact inference")
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
