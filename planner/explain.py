"""EXPLAIN: print a plan tree, its per-layer cost table and the optimizer's
decisions.

The tree is rendered from the plan's typed records (:func:`plan_tree`): the
rules decide, this module says what they decided. Every step prints its own
line (``Step.lines``); the printer only walks the tree and lays out columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from kql.planner.plan import Plan, Step, format_bytes, format_flops, format_seconds
from kql.planner.rules.gather_backend import gather_summary
from kql.planner.geometry import gate_sources
from kql.planner.runtime import runtime_lines


@dataclass
class Explanation:
    """What ``EXPLAIN`` returns: the text and the structure behind it.

    Attributes:
        text: the printed plan.
        plan: the optimized :class:`~kql.planner.plan.Plan` (decisions in its
            records and ``plan.rewrites``, cost in ``plan.cost``).
        result: the ``HeatmapResult`` when ``EXPLAIN ANALYZE`` ran the query.
        timings: what ``EXPLAIN ANALYZE`` measured (seconds by stage), else None.
    """
    text: str
    plan: Plan
    result: Optional[Any] = None
    timings: Optional[dict] = None

    @property
    def speedup(self) -> float:
        """Theoretical speedup of incremental over naive inference on this grid."""
        return self.plan.cost.r_grid

    @property
    def root(self) -> Step:
        """The plan tree EXPLAIN prints (:func:`plan_tree`)."""
        return plan_tree(self.plan, self.timings)

    @property
    def steps(self) -> list[dict]:
        """The plan tree flattened pre-order: op, details, depth, FLOPs, seconds."""
        out = []

        def visit(step, depth):
            out.append({"op": step.op, "details": dict(step.details), "depth": depth,
                        "flops": step.flops, "seconds": step.seconds})
            for c in step.children:
                visit(c, depth + 1)
        visit(self.root, 0)
        return out

    def __str__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer, cycle) -> None:
        """IPython and Jupyter show the EXPLAIN text as it prints."""
        printer.text(self.text)

    def _repr_html_(self) -> str:
        import html
        return f"<pre>{html.escape(self.text)}</pre>"


def plan_tree(plan: Plan, timings: Optional[dict] = None) -> Step:
    """The plan as a tree of steps, read bottom-up: Scan -> Preprocess ->
    Occlude -> Infer -> Heatmap; an incremental plan materializes the
    unoccluded image's views first, and DRILLDOWN puts both stages' Infer
    under one DrillDown step. With EXPLAIN ANALYZE's ``timings`` the first
    Infer step carries the measured occlusion time."""
    q, spec = plan.query, plan.spec
    original, size = tuple(plan.original_hw), tuple(plan.input.shape[1:])   # (H, W), or (D, H, W)
    C = plan.input.shape[0]
    scan = Step("Scan", [("", f"{plan.image_desc} ({_x(original)})")])
    prep = Step("Preprocess", [("", f"resize {_x(original)} -> {_x(size)}" if original != size
                                    else f"{_x(size)}, no resize"),
                               ("normalize", f"mean {_tup(spec.mean)} std {_tup(spec.std)}"),
                               ("channels", str(C))], [scan])
    steps = getattr(plan.display, "steps", None)    # a volume's preprocessing (kql.sources.volumes.ScanView)
    if steps is not None:
        prep = Step("Preprocess", [*steps, ("channels", str(C))], [scan])
    infer = _infer_step(plan, prep)
    if plan.drilldown is not None:
        dd = plan.drilldown
        one = _infer_step(dd.stage_one, prep)
        s1, s2 = dd.stride_one, dd.stride_two
        one.details.insert(0, ("stage", f"one, stride {_x(s1)}, {dd.stage_one.n_positions} positions"))
        infer.details.insert(0, ("stage", f"two, the {dd.n_select} of {dd.n_fine} positions "
                                          f"(r = {dd.fraction:g}) with the largest drop, at stride {_x(s2)}"))
        infer = Step("DrillDown", [("S1", _x(s1)), ("r", f"{dd.fraction:g}"),
                                   ("expected speedup", f"{dd.expected_speedup:.2f}x (eq. 46; "
                                                        f"≤{dd.max_positions} of {dd.n_fine} positions)")],
                     [one, infer], flops=one.flops + dd.fraction * infer.flops)
    heatmap = Step("Heatmap", [], [infer])
    if q.into:
        heatmap.detail("into", q.into)
    choice = plan.label_choice
    if choice.several == "list":
        shown = ", ".join("PREDICTED" if one.index is None else
                          (f"{one.index} '{one.name}'" if one.name else str(one.index)) for one in choice.listed)
        heatmap.detail("labels", f"{shown} (one run, a map each)")
    elif choice.several == "top":
        heatmap.detail("labels", f"TOP {choice.top} (the most probable classes of the unoccluded image, "
                                 f"resolved at run time; one run)")
    elif choice.several == "all":
        n = spec.num_classes
        heatmap.detail("labels", f"ALL ({n} classes; one run)" if n else "ALL (every class; one run)")
    elif plan.label is None:
        heatmap.detail("label", "PREDICTED (top class of the unoccluded image, resolved at run time)")
    else:
        heatmap.detail("label", f"{plan.label} '{plan.label_name}'" if plan.label_name else str(plan.label))
    if timings:
        heatmap.find("Infer").seconds = timings.get("occlusion")
    return heatmap


def _infer_step(plan: Plan, prep: Step) -> Step:
    """The Infer step of one plan (its Occlude and, incremental, Materialize under it)."""
    q, spec = plan.query, plan.spec
    color = q.color
    shown = plan.fill_text or (color.kind.upper() if color.value is None else (
        str(color.value[0]) if color.kind == "value" else str(tuple(color.value))))
    region = plan.region
    region_text = region.text() if hasattr(region, "text") else (
        f"({region.x0}, {region.y0}, {region.x1}, {region.y1})" if region is not None else
        "whole " + ", ".join(f"[{a}, {b})" for a, b in plan.grid.bounds))
    occlude = Step("Occlude", [("patch", _x(plan.patch)), ("stride", _x(plan.stride)),
                               ("color", shown),
                               ("grid", f"{_x(plan.grid.shape)} = {plan.n_positions} positions"),
                               ("region", region_text)])
    infer = Step("Infer", [("model", f"{spec.name} ({spec.weights})"), ("device", plan.device)],
                 flops=plan.estimates.infer_flops)
    if plan.incremental:
        layers = plan.graph.layers()
        views = len([l for l in layers if l.spatial and l.name not in plan.full_layers])
        if plan.refine is not None:
            policy = plan.refine
            infer.detail("check", f"SSIM ≥ {policy.target:g} checked at run time (stops at estimated "
                                  f"{policy.goal:.3f})")
            infer.detail("mode", "approximate (adaptive refinement: exact incremental values at the "
                                 "positions it computes)")
        else:
            infer.detail("mode", "exact (incremental)" if plan.approximation is None else
                         f"approximate (incremental, {approximation_words(plan)})")
        infer.detail("views", f"{views} layers materialized, ≈{format_bytes(plan.schedule.view_bytes)}")
        infer.detail("cutoff", plan.cutoff or "none")
        sizes = np.diff(plan.bounds)
        infer.detail("batch", f"≤{plan.batch_size} ({len(sizes)} batches grouped by patch size)")
        if plan.layer_backends:
            infer.detail("gather", gather_summary(plan.layer_backends))
        materialize = Step("Materialize", [("", "every layer's output for the unoccluded image, once")], [prep])
        infer.children = [materialize, occlude]
    else:
        per = max(int(plan.per_position_bytes), 1)
        batches = -(-max(plan.n_positions, 1) // plan.batch_size)
        infer.detail("mode", plan.mode)
        infer.detail("batch", f"{plan.batch_size} ({batches} batches, ≈{format_bytes(plan.batch_size * per)} "
                              f"per batch)")
        occlude.children = [prep]
        infer.children = [occlude]
    return infer


def _x(sizes) -> str:
    """``(8, 8, 8)`` -> '8x8x8'."""
    return "x".join(map(str, sizes))


def _tup(v) -> str:
    return "(" + ", ".join(f"{float(a):.3g}" for a in v) + ")"


def tree_lines(step, prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """Render a step tree with box-drawing branches."""
    head = "" if root else prefix + ("└─ " if last else "├─ ")
    lines = [head + step.lines()[0]]
    child_prefix = "" if root else prefix + ("   " if last else "│  ")
    for i, child in enumerate(step.children):
        lines += tree_lines(child, child_prefix, i == len(step.children) - 1, False)
    return lines


def explain_text(plan: Plan, timings: Optional[dict] = None, peak_memory: Optional[int] = None,
                 result=None) -> str:
    """The full EXPLAIN text of an optimized plan; with ``timings`` (EXPLAIN
    ANALYZE) the measured seconds and peak memory too, and with the
    ``result`` what adaptive refinement did."""
    measured = measured_line(plan, timings, peak_memory) if timings else None
    lines = [f"Plan ({plan.mode}{', analyzed' if timings else ''})"]
    lines += tree_lines(plan_tree(plan, timings))
    if measured:
        lines.append(measured)
    lines += runtime_lines(plan, timings)
    lines.append("")
    lines.append(f"Layers (input {_x(plan.input.shape)}, patch {_x(plan.patch)}; patch in -> out is the "
                 f"largest changed region over the grid)")
    lines.append(plan.cost.table())
    lines.append("")
    full = plan.cost.full_flops
    inc = float(plan.cost.inc_flops.mean())
    lines.append(f"FLOPs per position: {_g(full)} full, {_g(inc)} incremental (mean over "
                 f"{plan.n_positions} positions)")
    batched = (f"; {plan.r_batched:.2f} with the chosen batches and cutoff"
               if plan.r_batched is not None else "")
    regions = "exact regions" if plan.tau is None else f"regions capped at τ = {plan.tau:g}"
    if plan.gates != "exact":
        regions += f", gates {plan.gates}"
    lines.append(f"theoretical speedup of incremental vs naive: R = {plan.cost.r_grid:.2f} "
                 f"({regions} over the grid; {plan.cost.r_uniform:.2f} with one patch size per layer"
                 f"{batched})")
    if plan.approximation is not None:
        lines += _approx_lines(plan)
    if plan.drilldown is not None:
        lines += _drilldown_lines(plan)
    if plan.contract is not None:
        lines += _candidate_lines(plan)
    if result is not None and result.refine_stages:
        lines += _refined_lines(result)
    if plan.incremental:
        lines += _exact_lines(plan)
    globals_ = [layer for layer in plan.graph.layers() if layer.reason]
    if globals_:
        lines.append("not incremental (computed in full, with everything after them):")
        lines += [f"  {layer.name} ({layer.target}): {layer.reason}" for layer in globals_]
    if plan.mode == "naive":
        lines.append(f"memory: ≈{format_bytes(plan.per_position_bytes)} per position, "
                     f"batch {plan.batch_size}")
    lines.append("")
    lines.append("Optimizer")
    width = max(len(r.rule) for r in plan.rewrites)
    lines += [f"  {r.rule:<{width}}  {r.message}" for r in plan.rewrites]
    if plan.warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def approximation_words(plan) -> str:
    """What an approximate plan approximates, in words: 'projective-field
    threshold τ = 0.5, gates local'."""
    parts = []
    if plan.tau is not None:
        parts.append(f"projective-field threshold τ = {plan.tau:g}")
    if plan.gates != "exact":
        parts.append(f"gates {plan.gates}")
    return ", ".join(parts) or "exact regions"


def _approx_lines(plan: Plan) -> list[str]:
    """τ, where it came from, what it buys and the SSIM it is predicted to keep."""
    exact = plan.estimates.cost_exact
    gain = ""
    if exact is not None:
        what = "thresholding" if plan.gates == "exact" else "approximating"
        gain = (f"; exact incremental would be R = {exact.r_grid:.2f}, so {what} saves "
                f"{plan.cost.r_grid / exact.r_grid:.2f}x more")
    approx = plan.approximation
    missing = ("no TUNE calibration for this model, weights, input size and patch" if approx.gates == "exact" else
               "TUNE measured no such gates at this τ for this model, weights, input size and patch")
    ssim = (f"no SSIM prediction ({missing})"
            if approx.predicted_ssim is None else f"predicted SSIM vs exact {approx.predicted_ssim:.3f}")
    parts = []
    if approx.tau is not None:
        parts.append(f"projective-field threshold τ = {approx.tau:g}")
    if approx.gates != "exact":
        n = len(gate_sources(plan.graph))
        how = ("recomputed, applied only where the patch changed the map" if approx.gates == "local"
               else "kept at their unoccluded value")
        parts.append(f"{n} global gate{'s' if n != 1 else ''} {approx.gates} ({how})")
    return [f"approximate: {' and '.join(parts)} from {approx.source}; {ssim}{gain}"]


def _candidate_lines(plan: Plan) -> list[str]:
    """The plans APPROX SSIM considered, with predicted SSIM and time (the
    runtime model's estimate of this plan, scaled by each one's share of the
    exact plan's work), the chosen one marked →."""
    from kql.planner.candidates import table_lines
    contract = plan.contract
    chosen = contract.chosen
    exact_parts = None
    runtime = plan.runtime
    if runtime is not None:
        try:
            parts = dict(runtime.get().parts)
        except Exception:   # the estimate line says why
            parts = None
        if parts is not None and chosen.cost > 0:
            parts["batches"] = parts.get("batches", 0.0) / chosen.cost
            exact_parts = parts
    return table_lines(contract.candidates, contract.target, exact_parts)


def _refined_lines(result) -> list[str]:
    """EXPLAIN ANALYZE of adaptive refinement: the stages run, the positions
    computed and the estimated SSIM."""
    n = result.computed.size
    done = int(result.computed.sum())
    lines = [f"refinement: computed {done} of {n} positions ({100 * done / n:.0f} %), estimated SSIM vs "
             f"exact {result.estimated_ssim:.3f}; stages:"]
    for i, st in enumerate(result.refine_stages):
        est = "not yet estimated" if i == 0 else f"estimated SSIM {st['estimated_ssim']:.3f}"
        lines.append(f"  {i + 1}. {st['stage']}: +{st['positions']} positions → {st['computed']} computed, {est}")
    return lines


def _drilldown_lines(plan: Plan) -> list[str]:
    """The two stages of DRILLDOWN and the speedup they promise."""
    dd = plan.drilldown
    one, two = ("x".join(map(str, s)) for s in (dd.stride_one, dd.stride_two))   # 2 or 3 axes
    return [f"drill-down: stage one at stride {one} ({dd.n_coarse} positions), stage two at stride "
            f"{two} on the {dd.n_select} of {dd.n_fine} positions (r = {dd.fraction:g}) with the largest "
            f"drop, less those stage one ran; expected speedup {dd.expected_speedup:.2f}x over the full "
            f"grid (Krypton eq. 46 at S1 = {one}, target {dd.speedup:g}x), at most "
            f"{dd.max_positions} of {dd.n_fine} positions ({dd.position_speedup:.2f}x)"]


def _exact_lines(plan: Plan) -> list[str]:
    """Cutoff, kernels and memory of an exact plan."""
    out = []
    if plan.cutoff:
        past = [r for r in plan.cost.rows if r.name in plan.full_layers]
        inc = sum(r.inc_flops for r in past)
        full = sum(r.full_flops for r in past)
        out.append(f"IVM cutoff: from {plan.cutoff} on every layer runs in full ({_g(full)} per position "
                   f"there; incremental would be {_g(inc)} of conv work plus gathering windows that "
                   f"cover most of each map)")
    else:
        out.append("IVM cutoff: none before the first global layer")
    if plan.layer_backends:
        out.append(f"gather kernel: {plan.gather_backend} "
                   f"({', '.join(sorted(set(plan.layer_backends.values())))} in use)")
    out.append(f"memory: views ≈{format_bytes(plan.schedule.view_bytes)} (kept once), "
               f"≈{format_bytes(plan.per_position_bytes)} per position, batches of ≤{plan.batch_size}")
    return out


def _g(flops: float) -> str:
    return format_flops(flops, unit="G")


def measured_line(plan: Plan, timings: dict, peak_memory: Optional[int] = None) -> str:
    """One line of measured times for EXPLAIN ANALYZE."""
    per = timings.get("occlusion", 0.0) / max(plan.n_positions, 1)
    parts = [f"{name} {format_seconds(timings[name])}" for name in
             ("bind", "optimize", "reference", "occlusion", "save", "total") if name in timings]
    line = "measured: " + " · ".join(parts) + f" ({format_seconds(per)} per position)"
    if peak_memory is not None:
        line += f" · peak memory +{format_bytes(max(peak_memory, 0))}"
    return line


def describe(spec, graph, patch=None, stride=None):
    """DESCRIBE: the layer table of a model for one input size, as
    ``(columns, rows, title)`` (the front end lays it out); with PATCH and
    STRIDE the text of the incremental patch sizes and the theoretical speedup."""
    from kql.errors import PlanError
    from kql.planner.geometry import grid

    shape = graph.input_shape[1:]
    nd = len(shape)
    title = (f"{spec.name}: input {_x(graph.input_shape)}, {len(graph)} layers, "
             f"{format_flops(graph.total_flops, unit='G')} (multiply-adds) per image; weights: {spec.weights}")
    if patch is None:
        rows = []
        for layer in graph.layers():
            geo = ""
            if layer.kind.value == "local":
                pads = ",".join(f"{a},{b}" for a, b in layer.padding)
                geo = (f"k{_x(layer.kernel)} s{_x(layer.stride)} p({pads})"
                       + (f" d{layer.dilation[0]}" if any(d != 1 for d in layer.dilation) else "")
                       + (f" g{layer.groups}" if layer.groups > 1 else ""))
            rows.append([layer.name, layer.op, str(layer.kind), geo,
                         "x".join(map(str, layer.out_shape)), f"{layer.flops:,}"])
        return ["layer", "op", "kind", "geometry", "output", "FLOPs"], rows, title
    if stride is None:
        raise PlanError("DESCRIBE ... PATCH needs STRIDE too (e.g. PATCH 16 STRIDE 4)")
    patch, stride = tuple(patch), tuple(stride)
    patch = patch * nd if len(patch) == 1 else patch
    stride = stride * nd if len(stride) == 1 else stride
    if len(patch) != nd or len(stride) != nd:
        raise PlanError(f"PATCH {_x(patch)} STRIDE {_x(stride)} do not have the {nd} axes of the "
                        f"input {_x(graph.input_shape)}")
    if min(patch) < 1 or min(stride) < 1:
        raise PlanError(f"patch and stride must be at least 1, got PATCH {_x(patch)} STRIDE {_x(stride)}")
    if any(p > n for p, n in zip(patch, shape)):
        raise PlanError(f"patch {_x(patch)} does not fit {'image' if nd == 2 else 'volume'} {_x(shape)}")
    from kql.planner.cost import theoretical_speedup
    starts = grid(shape, patch, stride)
    report = theoretical_speedup(graph, *starts, patch)
    return "\n".join([title, report.table(), "",
                      f"theoretical speedup of incremental vs naive: R = {report.r_grid:.2f} "
                      f"(exact regions over {starts[0].size} positions; {report.r_uniform:.2f} with one "
                      f"patch size per layer)"])


# ---------------------------------------------------------------- multi-image queries

def estimate_job_seconds(plan: Plan, n_images: int, forward: float) -> tuple[float, float, str]:
    """``(seconds per image, seconds for n_images, how)`` for a multi-image query.

    One image costs what the plan's runtime estimate says (``planner/runtime.py``,
    calibrated on this machine: reference inference plus occlusion). Without
    one (it failed, or the plan has none), FLOPs become seconds at the rate
    of one measured unoccluded inference (``forward`` seconds for
    ``full_flops``): a lower bound for exact plans on the CPU, as it ignores
    gathering and per-call overhead."""
    if plan.runtime is not None:
        try:
            per_image = plan.runtime.get().seconds
            return per_image, per_image * n_images, "the plan's runtime estimate for one image"
        except Exception:  # noqa: BLE001 - a failed calibration falls back to the FLOPs rate
            pass
    full = float(plan.cost.full_flops) or 1.0
    ratio = float(plan.estimates.infer_flops) / full
    per_image = forward * (1.0 + ratio)
    return per_image, per_image * n_images, (f"1 + {ratio:.1f} full inferences' worth of FLOPs at "
                                             f"{format_seconds(forward)} each, measured on the first image")
