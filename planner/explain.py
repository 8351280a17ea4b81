"""EXPLAIN: print a plan tree, its per-layer cost table and the optimizer's
decisions. Every step prints its own line (``Step.lines``); this module only
walks the tree and lays out columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kql.planner.plan import Plan, format_bytes, format_seconds
from kql.planner.runtime import runtime_lines


@dataclass
class Explanation:
    """What ``EXPLAIN`` returns: the text and the structure behind it.

    Attributes:
        text: the printed plan.
        plan: the optimized :class:`~kql.planner.plan.Plan` (step tree in
            ``plan.root``, decisions in ``plan.rewrites``, cost in ``plan.cost``).
        result: the ``HeatmapResult`` when ``EXPLAIN ANALYZE`` ran the query.
    """
    text: str
    plan: Plan
    result: Optional[Any] = None

    @property
    def speedup(self) -> float:
        """Theoretical speedup of incremental over naive inference on this grid."""
        return self.plan.cost.r_grid

    @property
    def steps(self) -> list[dict]:
        """The plan tree flattened pre-order: op, details, depth, FLOPs, seconds."""
        out = []

        def visit(step, depth):
            out.append({"op": step.op, "details": dict(step.details), "depth": depth,
                        "flops": step.flops, "seconds": step.seconds})
            for c in step.children:
                visit(c, depth + 1)
        visit(self.plan.root, 0)
        return out

    def __str__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer, cycle) -> None:
        """IPython and Jupyter show the EXPLAIN text as it prints."""
        printer.text(self.text)

    def _repr_html_(self) -> str:
        import html
        return f"<pre>{html.escape(self.text)}</pre>"


def tree_lines(step, prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """Render a step tree with box-drawing branches."""
    head = "" if root else prefix + ("└─ " if last else "├─ ")
    lines = [head + step.lines()[0]]
    child_prefix = "" if root else prefix + ("   " if last else "│  ")
    for i, child in enumerate(step.children):
        lines += tree_lines(child, child_prefix, i == len(step.children) - 1, False)
    return lines


def explain_text(plan: Plan, timings: Optional[dict] = None, peak_memory: Optional[int] = None) -> str:
    """The full EXPLAIN text of an optimized plan; with ``timings`` (EXPLAIN
    ANALYZE) the measured seconds and peak memory too."""
    q = plan.query
    measured = measured_line(plan, timings, peak_memory) if timings else None
    lines = [f"Plan ({plan.mode}{', analyzed' if timings else ''})"]
    lines += tree_lines(plan.root)
    if measured:
        lines.append(measured)
    lines += runtime_lines(plan, timings)
    C, H, W = plan.input.shape
    lines.append("")
    lines.append(f"Layers (input {C}x{H}x{W}, patch {q.patch[0]}x{q.patch[1]}; patch in -> out is the "
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
    lines.append(f"theoretical speedup of incremental vs naive: R = {plan.cost.r_grid:.2f} "
                 f"({regions} over the grid; {plan.cost.r_uniform:.2f} with one patch size per layer"
                 f"{batched})")
    if plan.tau is not None:
        lines += _approx_lines(plan)
    if plan.drilldown is not None:
        lines += _drilldown_lines(plan)
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


def _approx_lines(plan: Plan) -> list[str]:
    """τ, where it came from, what it buys and the SSIM it is predicted to keep."""
    exact = getattr(plan, "cost_exact", None)
    gain = ""
    if exact is not None:
        gain = (f"; exact incremental would be R = {exact.r_grid:.2f}, so thresholding saves "
                f"{plan.cost.r_grid / exact.r_grid:.2f}x more")
    ssim = ("no SSIM prediction (no TUNE calibration for this model, weights, input size and patch)"
            if plan.predicted_ssim is None else f"predicted SSIM vs exact {plan.predicted_ssim:.3f}")
    return [f"approximate: projective-field threshold τ = {plan.tau:g} from {plan.tau_source}; {ssim}{gain}"]


def _drilldown_lines(plan: Plan) -> list[str]:
    """The two stages of DRILLDOWN and the speedup they promise."""
    dd = plan.drilldown
    (a, b), (c, d) = dd.stride_one, dd.stride_two
    return [f"drill-down: stage one at stride {a}x{b} ({dd.n_coarse} positions), stage two at stride "
            f"{c}x{d} on the {dd.n_select} of {dd.n_fine} positions (r = {dd.fraction:g}) with the largest "
            f"drop, less those stage one ran; expected speedup {dd.expected_speedup:.2f}x over the full "
            f"grid (Krypton eq. 46 at S1 = {a}, target {dd.speedup:g}x), at most "
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
    out.append(f"memory: views ≈{format_bytes(plan.view_bytes)} (kept once), "
               f"≈{format_bytes(plan.per_position_bytes)} per position, batches of ≤{plan.batch_size}")
    return out


def _g(flops: float) -> str:
    return f"{flops / 1e9:.3g} GFLOPs"


def measured_line(plan: Plan, timings: dict, peak_memory: Optional[int] = None) -> str:
    """One line of measured times for EXPLAIN ANALYZE (and the Infer step's time)."""
    infer = plan.root.find("Infer")
    infer.seconds = timings.get("occlusion")
    per = timings.get("occlusion", 0.0) / max(plan.n_positions, 1)
    parts = [f"{name} {format_seconds(timings[name])}" for name in
             ("bind", "optimize", "reference", "occlusion", "save", "total") if name in timings]
    line = "measured: " + " · ".join(parts) + f" ({format_seconds(per)} per position)"
    if peak_memory is not None:
        line += f" · peak memory +{format_bytes(max(peak_memory, 0))}"
    return line


def describe(spec, graph, patch=None, stride=None):
    """DESCRIBE: the layer table of a model for one input size; with PATCH and
    STRIDE also the incremental patch sizes and the theoretical speedup."""
    from kql.errors import PlanError
    from kql.planner.geometry import grid
    from kql.table import Table

    C, H, W = graph.input_shape
    title = (f"{spec.name}: input {C}x{H}x{W}, {len(graph)} layers, "
             f"{graph.total_flops / 1e9:.3g} GFLOPs (multiply-adds) per image; weights: {spec.weights}")
    if patch is None:
        rows = []
        for layer in graph.layers():
            geo = ""
            if layer.kind.value == "local":
                (pt, pb), (pl, pr) = layer.padding
                geo = (f"k{layer.kernel[0]}x{layer.kernel[1]} s{layer.stride[0]}x{layer.stride[1]} "
                       f"p({pt},{pb},{pl},{pr})" + (f" d{layer.dilation[0]}" if layer.dilation != (1, 1) else "")
                       + (f" g{layer.groups}" if layer.groups > 1 else ""))
            rows.append([layer.name, layer.op, str(layer.kind), geo,
                         "x".join(map(str, layer.out_shape)), f"{layer.flops:,}"])
        return Table(["layer", "op", "kind", "geometry", "output", "FLOPs"], rows, title=title)
    if stride is None:
        raise PlanError("DESCRIBE ... PATCH needs STRIDE too (e.g. PATCH 16 STRIDE 4)")
    (ph, pw), (sy, sx) = patch, stride
    if min(ph, pw) < 1 or min(sy, sx) < 1:
        raise PlanError(f"patch and stride must be at least 1, got PATCH {ph}x{pw} STRIDE {sy}x{sx}")
    if ph > H or pw > W:
        raise PlanError(f"patch {ph}x{pw} does not fit image {H}x{W}")
    from kql.planner.cost import theoretical_speedup
    ys, xs = grid((H, W), (ph, pw), (sy, sx))
    report = theoretical_speedup(graph, ys, xs, (ph, pw))
    return "\n".join([title, report.table(), "",
                      f"theoretical speedup of incremental vs naive: R = {report.r_grid:.2f} "
                      f"(exact regions over {ys.size} positions; {report.r_uniform:.2f} with one "
                      f"patch size per layer)"])


# ---------------------------------------------------------------- multi-image queries

def forward_seconds(plan: Plan, threads: int) -> float:
    """Seconds one unoccluded inference of the plan's model takes here (the
    second of two runs, with the job's thread count): the unit of the time
    estimate until a calibrated model of seconds replaces it."""
    import time

    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = plan.spec.module.to(plan.device).eval()
        x = plan.input.to(plan.device)[None]
        with torch.inference_mode():
            model(x)
            if plan.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if plan.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)


def estimate_job_seconds(plan: Plan, n_images: int, forward: float) -> tuple[float, float, str]:
    """``(seconds per image, seconds for n_images, how)`` for a multi-image query.

    One image costs what the plan's runtime estimate says (``planner/runtime.py``,
    calibrated on this machine: reference inference plus occlusion). Without
    one (it failed, or the plan has none), FLOPs become seconds at the rate
    of one measured unoccluded inference (``forward`` seconds for
    ``full_flops``): a lower bound for exact plans on the CPU, as it ignores
    gathering and per-call overhead."""
    runtime = getattr(plan, "runtime", None)
    if runtime is not None:
        try:
            per_image = runtime.get().seconds
            return per_image, per_image * n_images, "the plan's runtime estimate for one image"
        except Exception:  # noqa: BLE001 - a failed calibration falls back to the FLOPs rate
            pass
    infer = plan.root.find("Infer")
    full = float(plan.cost.full_flops) or 1.0
    ratio = float(infer.flops or 0.0) / full
    per_image = forward * (1.0 + ratio)
    return per_image, per_image * n_images, (f"1 + {ratio:.1f} full inferences' worth of FLOPs at "
                                             f"{format_seconds(forward)} each, measured on the first image")


def batch_explain_text(job, plan: Plan, first: str, done: int, todo: int, forward: float,
                       measured: bool = False) -> str:
    """EXPLAIN of a multi-image query: the job, its estimated total time and
    the plan of its first image (every image is planned alike)."""
    into = f" -> '{job.into}'" if job.into else " (no INTO: results are streamed, not written)"
    lines = [f"Batch ({len(job.files)} images from '{job.source}'{into}; executor {job.executor}, "
             f"{job.threads} thread{'s' if job.threads != 1 else ''} per image)"]
    counts = f"images: {len(job.files)}"
    if job.into:
        counts += f" · {done} done earlier (valid in the manifest) · {todo} to run"
    lines.append("  " + counts)
    per, total, how = estimate_job_seconds(plan, todo if job.into else len(job.files), forward)
    n = todo if job.into else len(job.files)
    workers = "; the ray executor divides it among its workers" if job.executor == "ray" else ""
    lines.append(f"  estimated total: {n} x {format_seconds(per)} ≈ {format_seconds(total)} "
                 f"(per image: {how}{workers})")
    if measured:
        c = job.counts
        ran = c["ok"] + c["failed"]
        lines.append(f"  measured: {c['ok']} explained, {c['skipped']} done earlier, {c['failed']} failed "
                     f"in {format_seconds(job.seconds)}"
                     + (f" ({format_seconds(job.seconds / ran)} per image run)" if ran else ""))
    lines.append("")
    lines.append(f"Plan of the first image, '{first}':")
    lines.append(explain_text(plan))
    return "\n".join(lines)
