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
    if label.kind in ("list", "top", "all"):
        return _several(plan, label, heatmap)
    if plan.label is None:
        heatmap.detail("label", "PREDICTED (top class of the unoccluded image, resolved at run time)")
        plan.record("resolve_label", "LABEL PREDICTED is resolved by the first inference")
    else:
        shown = f"{plan.label} '{plan.label_name}'" if plan.label_name else str(plan.label)
        heatmap.detail("label", shown)
        plan.record("resolve_label", f"LABEL {label.value!r} -> class {shown}")
    return plan


def _several(plan, label, heatmap):
    """LABEL a, b, ... / TOP k / ALL: one run, a map per class."""
    from kql.ast import label_text
    from kql.errors import PlanError
    if getattr(plan.query, "drilldown", None) is not None:
        raise PlanError(f"DRILLDOWN takes one label (it refines where that class's probability drops), "
                        f"not LABEL {label_text(label)}")
    if label.kind == "list":
        plan.labels = [_lookup(plan.spec, one) for one in label.value]
        shown = ", ".join("PREDICTED" if i is None else (f"{i} '{n}'" if n else str(i))
                          for i, n in plan.labels)
        heatmap.detail("labels", f"{shown} (one run, a map each)")
        plan.record("resolve_label", f"LABEL {label_text(label)} -> {len(plan.labels)} maps from one run")
    elif label.kind == "top":
        heatmap.detail("labels", f"TOP {label.value} (the most probable classes of the unoccluded image, "
                                 f"resolved at run time; one run)")
        plan.record("resolve_label", f"LABEL TOP {label.value}: {label.value} maps from one run")
    else:
        n = plan.spec.num_classes
        heatmap.detail("labels", f"ALL ({n} classes; one run)" if n else "ALL (every class; one run)")
        plan.record("resolve_label", "LABEL ALL: a map per class from one run")
    return plan
