"""Rule: resolve LABEL to a class index (PREDICTED waits for run time)."""
from __future__ import annotations

from kql.sources import resolve_label as _lookup


def resolve_label(plan):
    """Set ``plan.label`` / ``plan.label_name`` from the query's LABEL clause
    (changes the plan in place). ``PREDICTED`` stays ``None``: the executor
    takes the top class of the unoccluded image.
    """
    label = plan.query.label
    plan.label, plan.label_name = _lookup(plan.spec, label)
    heatmap = plan.root.find("Heatmap")
    if plan.label is None:
        heatmap.detail("label", "PREDICTED (top class of the unoccluded image, resolved at run time)")
        plan.record("resolve_label", "LABEL PREDICTED is resolved by the first inference")
    else:
        shown = f"{plan.label} '{plan.label_name}'" if plan.label_name else str(plan.label)
        heatmap.detail("label", shown)
        plan.record("resolve_label", f"LABEL {label.value!r} -> class {shown}")
    return plan
