"""Rule: resolve the projective-field threshold τ of an approximate plan.

``APPROX TAU t`` gives τ itself. ``APPROX SSIM s`` gives a quality target:
τ is the smallest threshold whose fitted SSIM reaches ``s`` in the
calibration ``TUNE`` stored for this model, weights, input size and patch
(``kql.calibration``; Krypton section 4.4). Without a calibration the query
runs exact and says how to make one: a guessed τ could miss the target
silently.
"""
from __future__ import annotations

from kql.errors import KqlError, PlanError


def approximate(plan):
    """Set ``plan.tau``, ``plan.tau_source`` and ``plan.predicted_ssim``
    (changes the plan in place; a no-op unless the query says APPROX)."""
    gates = plan.query.gates
    if plan.mode != "approx":
        if gates not in (None, "exact"):
            raise PlanError(f"GATES {gates.upper()} approximates: write it with APPROX TAU t "
                            f"(APPROX TAU 1 GATES {gates.upper()} keeps every other region exact)")
        return plan
    approx = plan.query.approx
    keyword = f"APPROX {approx.kind.upper()}"
    if gates is not None and approx.kind != "tau":
        raise PlanError(f"GATES {gates.upper()} goes with APPROX TAU; with APPROX {approx.kind.upper()} "
                        f"the optimizer chooses how gates are treated")
    plan.gates = gates or "exact"
    if not 0 < approx.value <= 1:
        raise PlanError(f"{keyword} must be in (0, 1], got {approx.value:g}")
    if approx.kind == "tau":
        plan.tau, plan.tau_source = approx.value, keyword
        try:  # only for the SSIM it predicts: an unreadable store does not stop the query
            calibration = _calibration(plan)
        except KqlError as e:
            calibration = None
            plan.warnings.append(f"no SSIM prediction: {str(e).splitlines()[0]}")
    elif (calibration := _calibration(plan)) is None:
        ph, pw = plan.patch
        plan.mode = "exact"
        plan.warnings.append(
            f"no SSIM calibration for {plan.spec.name} ({plan.spec.weights}) at input "
            f"{plan.input_hw[0]}x{plan.input_hw[1]} with patch {ph}x{pw}: ran EXACT. Calibrate with "
            f"TUNE {plan.spec.name} ON <sample images> PATCH {ph if ph == pw else f'{ph}x{pw}'}")
        plan.record("approximate", f"{keyword} {approx.value:g}: no calibration, running exact")
        plan.root.find("Infer").detail("mode", plan.mode)
        return plan
    else:
        plan.tau = calibration.tau_for(approx.value)
        plan.tau_source = f"{keyword} {approx.value:g} via {calibration.describe()}"
    if calibration is not None:
        plan.predicted_ssim = calibration.predict(plan.tau)
    if plan.tau >= 1 and plan.gates != "exact":
        plan.tau = None
        plan.predicted_ssim = None  # the τ calibration does not know the gates
        plan.record("approximate", f"{plan.tau_source}: exact regions, gates {plan.gates}")
        return plan
    if plan.tau >= 1:
        plan.mode, plan.tau = "exact", None
        plan.record("approximate", f"{plan.tau_source}: τ = 1 is exact inference")
        plan.root.find("Infer").detail("mode", plan.mode)
        return plan
    if plan.gates != "exact":
        plan.predicted_ssim = None
        plan.record("approximate", f"τ = {plan.tau:.3g} from {plan.tau_source}, gates {plan.gates}")
        return plan
    predicted = "" if plan.predicted_ssim is None else f", predicted SSIM {plan.predicted_ssim:.3f}"
    plan.record("approximate", f"τ = {plan.tau:.3g} from {plan.tau_source}{predicted}")
    return plan


def _calibration(plan):
    """The stored calibration for this plan's model, weights, input size and
    patch, or None."""
    from kql import calibration
    return calibration.lookup(plan.spec, plan.input_hw, plan.patch)
