"""Rule: resolve LABEL to a class index (PREDICTED waits for run time)."""
from __future__ import annotations

from kql.ast import label_text
from kql.errors import PlanError
from kql.planner.plan import LabelChoice


def resolve_label(plan):
    """Set ``plan.label_choice`` from the query's LABEL clause
    (changes the plan in place). ``PREDICTED`` stays ``None``: the executor
    takes the top class of the unoccluded image. ``LABEL a, b, ...``,
    ``TOP k`` and ``ALL`` ask for a map per class from one run
    (``LabelChoice.several``); TOP's classes wait for run time too.
    """
    label = plan.query.label
    if label.kind in ("list", "top", "all"):
        return _several(plan, label)
    plan.label_choice = LabelChoice(*plan.spec.resolve_label(label))
    if plan.label is None:
        plan.record("resolve_label", "LABEL PREDICTED is resolved by the first inference")
    else:
        shown = f"{plan.label} '{plan.label_name}'" if plan.label_name else str(plan.label)
        plan.record("resolve_label", f"LABEL {label.value!r} -> class {shown}")
    return plan


def _several(plan, label):
    """LABEL a, b, ... / TOP k / ALL: one run, a map per class."""
    if getattr(plan.query, "drilldown", None) is not None:
        raise PlanError(f"DRILLDOWN takes one label (it refines where that class's probability drops), "
                        f"not LABEL {label_text(label)}")
    if label.kind == "list":
        listed = tuple(LabelChoice(*plan.spec.resolve_label(one)) for one in label.value)
        plan.label_choice = LabelChoice(listed[0].index, listed[0].name, several="list", listed=listed)
        plan.record("resolve_label", f"LABEL {label_text(label)} -> {len(listed)} maps from one run")
    elif label.kind == "top":
        plan.spec.resolve_label(label)  # checks k against the model's classes
        plan.label_choice = LabelChoice(several="top", top=int(label.value))
        plan.record("resolve_label", f"LABEL TOP {label.value}: {label.value} maps from one run")
    else:
        plan.label_choice = LabelChoice(several="all")
        plan.record("resolve_label", "LABEL ALL: a map per class from one run")
    return plan
