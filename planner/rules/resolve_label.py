"""Rule: resolve LABEL to a class index (PREDICTED waits for run time)."""
from __future__ import annotations

from kql.planner.plan import LabelChoice


def resolve_label(plan):
    """Set ``plan.label_choice`` from the query's LABEL clause
    (changes the plan in place). ``PREDICTED`` stays ``None``: the executor
    takes the top class of the unoccluded image.
    """
    label = plan.query.label
    plan.label_choice = LabelChoice(*plan.spec.resolve_label(label))
    if plan.label is None:
        plan.record("resolve_label", "LABEL PREDICTED is resolved by the first inference")
    else:
        shown = f"{plan.label} '{plan.label_name}'" if plan.label_name else str(plan.label)
        plan.record("resolve_label", f"LABEL {label.value!r} -> class {shown}")
    return plan
