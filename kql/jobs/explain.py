"""EXPLAIN of a multi-image query: the job, its estimated total time and the
plan of its first image."""
from __future__ import annotations

from kql.planner.explain import estimate_job_seconds, explain_text
from kql.planner.plan import Plan, format_seconds


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
