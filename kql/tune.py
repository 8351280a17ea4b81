"""``TUNE``: calibrate the projective-field threshold τ against SSIM.

Krypton section 4.4: on a sample of images, compare the heatmap of ``APPROX
TAU t`` with the exact one for a grid of thresholds, fit SSIM as a degree-2
polynomial of τ, and store the fit; ``APPROX SSIM s`` then picks τ from it
(``kql.calibration``).

What is compared (:func:`heatmap_ssim`):

- the two *probability heatmaps* on the query's position grid
  (``HeatmapResult.heatmap``: the label's probability with the patch at each
  position), for the same label: the class the exact run predicts on the
  unoccluded image;
- ``data_range`` is the exact heatmap's peak-to-peak (max - min), so SSIM is
  relative to the heatmap's own contrast. With ``data_range = 1`` (the
  probability scale) the stabilising constants ``C1 = (0.01 L)²`` and
  ``C2 = (0.03 L)²`` would swamp a heatmap whose probability moves by a few
  hundredths, and any two heatmaps would look alike;
- the window is skimage's uniform square window, 7x7, or the largest odd size
  that fits the heatmap (at least 3x3: a heatmap needs 3 rows and 3 columns of
  positions to be compared);
- a *flat* exact heatmap (peak-to-peak below :data:`FLAT`: occlusion never moves
  the probability) has no structure to preserve and makes SSIM undefined; such
  an image is left out of the fit, with a note, and TUNE fails if all are.

τ = 1 is exact inference: its SSIM is 1 by definition and is not recomputed.

Every heatmap runs through the public query path: an ``ast.Select`` per run,
planned by ``Connection.plan`` and run by ``kql.compiler.run``, with the
sample image bound as a query binding (never pasted into query text).
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import os
from typing import Any, Optional, Sequence

import numpy as np

from kql import ast, calibration
from kql.planner import refine
from kql.planner.gates import gate_sources
from kql.planner.refine import FLAT, heatmap_ssim   # noqa: F401  (kql.tune.heatmap_ssim is public)
from kql.errors import KqlError, PlanError, QueryInterrupted
from kql.sources.volumes import Volume
from kql.table import Table

__all__ = ["DEFAULT_TAUS", "FLAT", "GATE_APPROX", "default_stride", "heatmap_ssim",
           "sample_images", "tune", "tune_tensors", "show_calibrations"]

#: The thresholds TUNE measures when the statement gives no TAUS (Krypton's
#: 0.9 ... 0.4, plus 1.0, which is exact and anchors the fit at SSIM 1).
DEFAULT_TAUS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)

#: File types a folder or glob of sample images is filtered on.

#: The SSIM targets SHOW CALIBRATIONS and TUNE report a τ for.
TARGETS = (0.8, 0.9, 0.95)

_BOUND = "__kql_tune_image__"     # the binding each sample image runs under

#: The gate approximations TUNE measures on a model with global gates (planner.gates).
GATE_APPROX = ("local", "frozen")


def default_stride(patch: tuple[int, ...]) -> tuple[int, ...]:
    """The stride TUNE uses when none is given: half the patch (at least 1) on every axis.

    Neighbouring patches overlap by half, so the heatmap has the smooth
    structure a finer query grid shows, at a quarter of the cost of a stride
    of patch/4 (TUNE runs ``1 + len(TAUS) - 1`` heatmaps per image).

    >>> default_stride((16, 16)), default_stride((1, 3)), default_stride((8, 8, 4))
    ((8, 8), (1, 1), (4, 4, 2))
    """
    return tuple(max(1, p // 2) for p in patch)


# ---------------------------------------------------------------------------
# Sample images
# ---------------------------------------------------------------------------


def sample_images(con, images, bindings: dict) -> list[tuple[str, Any]]:
    """The sample images of a TUNE statement: ``[(name, HxWx3 array)]``, or
    ``[(name, kql.sources.volumes.Volume)]`` when they are volumes.

    ``images`` is an ``ast.Source`` of kind ``"path"`` (a folder: its image
    and volume files, sorted, not recursive; a glob pattern; or one file) or a
    tuple of names (resolved as ``FROM <name>`` resolves them: bound, LOAD
    IMAGE, sample).

    Raises:
        PlanError: nothing found, a file that is not an image or a volume, a
            name that is not one, images and volumes mixed.
    """
    if isinstance(images, ast.Source):
        out = [(f, con.catalog.image(ast.Source("path", f))[0]) for f in _image_files(images.value)]
    else:
        out, seen = [], set()
        for name in images:
            if name in seen:
                raise PlanError(f"TUNE lists image '{name}' twice")
            seen.add(name)
            array, _ = con.catalog.image(ast.Source("name", name), bindings)
            out.append((name, array))
    kinds = ["volume" if isinstance(x, Volume) else "image" for _, x in out]
    if len(set(kinds)) > 1:
        other = kinds.index("image" if kinds[0] == "volume" else "volume")
        raise PlanError(f"TUNE calibrates on images or on volumes, not both: '{out[0][0]}' is {_article(kinds[0])} "
                        f"but '{out[other][0]}' is {_article(kinds[other])} (a calibration holds for one input "
                        f"shape)")
    return out


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _image_files(pattern: str) -> list[str]:
    """The files ``TUNE ... ON '<folder, glob or file>'`` names: a folder or a
    glob as a multi-image SELECT reads them (:func:`kql.sources.list_images`),
    or one file."""
    from kql import sources
    shown = os.fspath(pattern)
    path = os.path.expanduser(shown)
    if os.path.isdir(path) or glob.has_magic(shown):
        return sources.list_images(path)[1]
    if os.path.isfile(path):
        return [shown]
    raise PlanError(f"TUNE ... ON '{shown}': no such folder or file (give a folder, a glob such as "
                    f"'photos/*.png', or image names)")


# ---------------------------------------------------------------------------
# TUNE
# ---------------------------------------------------------------------------


def _check_taus(taus: Sequence[float]) -> list[float]:
    bad = [t for t in taus if not 0 < t <= 1]
    if bad:
        raise PlanError(f"TAUS must be in (0, 1], got {bad[0]:g}")
    distinct = sorted(set(float(t) for t in taus), reverse=True)
    if len(distinct) < 3:
        raise PlanError(f"TAUS needs at least 3 different thresholds for a degree-2 fit, got "
                        f"{', '.join(f'{t:g}' for t in distinct)}")
    return distinct


def tune(con, stmt: ast.Tune, bindings: Optional[dict] = None, progress: str = "auto") -> Table:
    """Run a ``TUNE`` statement: measure, fit, store; return the summary table.

    Args:
        con: the :class:`kql.api.Connection` (its catalog resolves names).
        stmt: the parsed statement.
        bindings: names bound for this statement (images and models).
        progress: ``"auto"``, ``"on"`` or ``"off"``: a bar over images x τ.

    Returns:
        A :class:`Table`: per τ the mean and minimum SSIM over the images and
        the fitted value; the footer gives the fit, τ for SSIM 0.8 / 0.9 /
        0.95 and where the calibration was written.

    Raises:
        PlanError: bad TAUS, no images, a heatmap too small or all flat, and
            anything a SELECT with these clauses raises.
        QueryInterrupted: Ctrl-C; no calibration is written.
    """
    bindings = dict(bindings or {})
    if _BOUND in bindings:
        raise PlanError(f"the name {_BOUND} is reserved by TUNE")
    taus = _check_taus(stmt.taus if stmt.taus is not None else DEFAULT_TAUS)
    spec = con.catalog.model(stmt.model, stmt.weights, bindings)   # fails early on an unknown model
    images = sample_images(con, stmt.images, bindings)
    volumes = bool(images) and isinstance(images[0][1], Volume)
    ndim = 3 if volumes else 2
    patch = stmt.patch_for(ndim)
    stride = stmt.stride_for(ndim) or default_stride(patch)
    kind = "volume" if volumes else "image"

    approx_taus = [t for t in taus if t < 1]
    # a model with global (squeeze-and-excitation) gates: gate freezing is measured
    # too, both modes alone (τ 1) and with every tuned τ
    base = _exact_select(stmt, patch, stride)
    first = con.plan(base, dict(bindings, **{_BOUND: images[0][1]}))
    gated = len(gate_sources(first.graph))
    gate_taus = [1.0] + approx_taus             # τ 1: the gates alone, every other region exact
    gate_runs = len(GATE_APPROX) * len(gate_taus) if gated else 0
    total = len(images) * (1 + len(approx_taus) + gate_runs)
    gate_ssim: dict[str, dict[str, list[float]]] = {m: {} for m in GATE_APPROX}
    ssim: dict[str, list[float]] = {}
    notes: list[str] = []
    input_hw = None
    done = 0
    policy = refine.RefinePolicy(1.0)
    maps: dict[str, list] = {}
    trajectories: dict[str, list] = {}
    bar = _bar(total, progress)

    def approx_ssim(run: dict, label: ast.Label, exact_map: np.ndarray, tau: float,
                    gates: Optional[str] = None) -> float:
        """The SSIM of the map at threshold ``tau`` (gates ``gates``) against the exact one."""
        nonlocal done
        query = dataclasses.replace(base, label=label, mode="approx", approx=ast.Approx("tau", tau), gates=gates)
        value = heatmap_ssim(exact_map, _heatmap(con, query, run).heatmap)
        done += 1
        bar.update(1)
        return value

    try:
        for name, array in images:
            run = dict(bindings, **{_BOUND: array})
            exact = _heatmap(con, base, run)
            done += 1
            bar.update(1)
            hw = tuple(exact.plan.input_hw) if volumes else tuple(exact.image.shape[:2])
            if input_hw is not None and hw != input_hw:
                how = "RESAMPLE them to one grid" if volumes else "resize them first"
                raise PlanError(f"TUNE needs one input size: {kind} '{name}' is {_hw(hw)} but "
                                f"the first was {_hw(input_hw)} (model '{spec.name}' "
                                f"takes {kind}s of any size; {how})")
            input_hw = hw
            notes += [w for w in exact.warnings if w not in notes]
            span = float(np.ptp(exact.heatmap))
            if span < FLAT:
                notes.append(f"{kind} '{name}': the exact heatmap is flat (probability spans {span:.2g}): "
                             f"left out")
                done += len(approx_taus) + gate_runs
                bar.update(len(approx_taus) + gate_runs)
                continue
            maps[name] = np.round(np.asarray(exact.heatmap, dtype=np.float64), 6).tolist()
            if policy.too_small(exact.heatmap.shape) is None:   # replayed on the exact map: no inference
                trajectories[name] = [list(t) for t in refine.trajectory(policy, exact.heatmap)]
            label = ast.Label("index", exact.label)
            row = [1.0 if tau >= 1 else approx_ssim(run, label, exact.heatmap, tau) for tau in taus]
            for mode in GATE_APPROX if gated else ():
                gate_ssim[mode][name] = [approx_ssim(run, label, exact.heatmap, tau, mode) for tau in gate_taus]
            ssim[name] = row
    except KeyboardInterrupt:
        raise QueryInterrupted(f"TUNE interrupted after {done} of {total} heatmaps; no calibration "
                               f"was written") from None
    finally:
        bar.close()
    if not ssim:
        raise PlanError(f"every exact heatmap of TUNE {spec.name} is flat: occluding "
                        f"{_hw(patch)} patches never changes the probability, so there is "
                        f"nothing to calibrate; use a larger PATCH or other {kind}s")

    cal = calibration.Calibration(
        model=spec.name, weights=spec.weights, fingerprint=calibration.weights_fingerprint(spec.module),
        input_hw=input_hw, patch=tuple(patch), stride=tuple(stride), color=_color_text(stmt.color),
        taus=taus, ssim=ssim, coefficients=calibration.fit(taus, ssim),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        refine=refine_record(policy, stride, trajectories) if trajectories else None,
        exact_maps={k: v for k, v in maps.items() if k in ssim},
        gates=gate_record(first, gate_taus, gated, gate_ssim) if gated else None)
    if not trajectories:
        notes.append(f"adaptive refinement not calibrated: {policy.too_small(np.shape(exact.heatmap))}")
    path = calibration.save(cal)
    return summary(cal, notes + [f"saved to {path}"])


def tune_tensors(model, inputs, patch, stride=None, *, taus: Sequence[float] = DEFAULT_TAUS,
                 baseline: float = 0.0, score: str = "softmax", name: Optional[str] = None,
                 save: bool = False) -> calibration.Calibration:
    """TUNE for inputs already in the model's space (the tensor API's):
    images ``(N, C, H, W)`` or volumes ``(N, C, D, H, W)``.

    For every input, the exact heatmap of its top class and the approximate
    one at each of ``taus`` (``kql.occlusion(..., mode='approx', tau=t)``),
    compared by :func:`heatmap_ssim` (on volumes over ``(nd, nh, nw)`` grid
    cells); flat exact heatmaps are left out, as TUNE leaves them out. Then
    ``kql.occlusion(..., mode='approx', tau=cal.tau_for(0.9))`` is the
    tensor API's ``APPROX SSIM 0.9``.

    Args:
        model: the module (or a function around one), as for ``kql.occlusion``.
        inputs: the sample inputs.
        patch, stride: as for ``kql.occlusion`` (default stride: half the patch).
        taus: the thresholds to measure (at least 3 different ones).
        baseline: the patch's value (a number).
        score: ``"softmax"``, ``"sigmoid"`` or ``"logits"``.
        name: the calibration's model name (default the module's class name).
        save: also store it in the user's calibrations (``SHOW CALIBRATIONS``).

    Returns:
        The :class:`kql.calibration.Calibration` (``input_hw`` is the input's
        spatial shape, 2 or 3 sizes).

    Raises:
        PlanError: bad ``taus``, or every exact heatmap flat.
        ValueError / TypeError: what ``kql.occlusion`` raises for the arguments.
    """
    from kql.tensor_api import _per_axis, as_module, occlusion
    taus = _check_taus(taus)
    module, default_name = as_module(model)
    ndim = inputs.dim() - 2
    patch = _per_axis(patch, "patch", ndim)
    stride = default_stride(patch) if stride is None else _per_axis(stride, "stride", ndim)
    ssim: dict[str, list[float]] = {}
    for n, exact in enumerate(occlusion(module, inputs, patch, stride, baseline=baseline, score=score)):
        if float(np.ptp(exact.heatmap)) < FLAT:
            continue
        one = inputs[n:n + 1]
        ssim[f"inputs[{n}]"] = [1.0 if t >= 1 else heatmap_ssim(exact.heatmap, occlusion(
            module, one, patch, stride, target=exact.label, baseline=baseline, score=score, mode="approx",
            tau=t)[0].heatmap) for t in taus]
    if not ssim:
        raise PlanError(f"every exact heatmap is flat: occluding {'x'.join(map(str, patch))} patches never "
                        f"changes the score, so there is nothing to calibrate")
    cal = calibration.Calibration(
        model=name or default_name, weights="bound from Python",
        fingerprint=calibration.weights_fingerprint(module), input_hw=tuple(inputs.shape[2:]),
        patch=tuple(patch), stride=tuple(stride), color=f"value {float(baseline):g}", taus=taus, ssim=ssim,
        coefficients=calibration.fit(taus, ssim),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if save:
        calibration.save(cal)
    return cal


def measure_refinement(con, model: str, images, patch, stride, color=None, weights=None,
                       bindings: Optional[dict] = None, progress: str = "auto") -> tuple[dict, dict]:
    """Calibrate adaptive refinement at another stride than a TUNE's τ curve
    (``scripts/calibrate_efficientnet.py`` does, to calibrate refinement on the
    fine grids it is for while the τ curve stays cheap): the exact heatmap of
    every image at ``stride``, refinement replayed on each. Returns
    ``(refine record, exact heatmaps)`` for :class:`kql.calibration.Calibration`."""
    bindings = dict(bindings or {})
    policy = refine.RefinePolicy(1.0)
    trajectories, maps = {}, {}
    pics = sample_images(con, images, bindings)
    bar = _bar(len(pics), progress)
    try:
        for name, array in pics:
            run = dict(bindings, **{_BOUND: array})
            exact = _heatmap(con, ast.Select(source=ast.Source("name", _BOUND), model=model, weights=weights,
                                             patch=patch, stride=stride, color=color or ast.Color("gray"),
                                             mode="exact"), run)
            bar.update(1)
            if np.ptp(exact.heatmap) < FLAT or policy.too_small(exact.heatmap.shape):
                continue
            maps[name] = np.round(np.asarray(exact.heatmap, dtype=np.float64), 6).tolist()
            trajectories[name] = refine.trajectory(policy, exact.heatmap)
    finally:
        bar.close()
    if not trajectories:
        raise PlanError(f"no heatmap of {model} at patch {_hw(patch)}, stride {_hw(stride)} "
                        f"can calibrate refinement (all flat, or grids too small)")
    return refine_record(policy, stride, trajectories), maps


def gate_record(plan, taus: Sequence[float], count: int, ssim: dict) -> dict:
    """What a calibration keeps of gate freezing: the number of gates, the
    thresholds, per mode the SSIM of every tuning image at each τ (τ 1: the
    gates alone), and the work share the cost model gives each on the
    tuning grid (:func:`kql.planner.rules.approximate.work_shares`)."""
    from kql.planner.rules.approximate import work_shares
    share = work_shares(plan.graph, plan.grid.starts, plan.patch)
    return {"count": count, "taus": [float(t) for t in taus],
            "ssim": {m: {k: [round(v, 6) for v in row] for k, row in ssim[m].items()} for m in GATE_APPROX},
            "share": {m: [round(share(t, m), 6) for t in taus] for m in GATE_APPROX}}


def refine_record(policy, stride, trajectories: dict) -> dict:
    """What a calibration keeps of adaptive refinement: the policy's settings,
    the grid stride and per image the trajectory (share computed, estimated
    SSIM, SSIM against exact, per stage) of :func:`kql.planner.refine.trajectory`."""
    return {"step": policy.step, "batch": policy.batch, "audit": policy.audit, "history": policy.history,
            "stride": list(stride),
            "trajectories": {k: [[round(v, 6) for v in st] for st in t] for k, t in trajectories.items()}}


def _exact_select(stmt: ast.Tune, patch, stride) -> ast.Select:
    """The exact heatmap of the image (or volume, with the statement's
    WINDOW, NORMALIZE and RESAMPLE) bound as :data:`_BOUND`."""
    return ast.Select(source=ast.Source("name", _BOUND), model=stmt.model, weights=stmt.weights,
                      patch=patch, stride=stride, color=stmt.color, mode="exact", window=stmt.window,
                      normalize=stmt.normalize, resample=stmt.resample)


def _heatmap(con, select: ast.Select, bindings: dict):
    from kql.compiler import run
    return run(con.plan(select, bindings), progress="off")


def _color_text(color: ast.Color) -> str:
    if color.kind in ("value", "rgb"):
        return f"{color.kind} {tuple(color.value) if color.kind == 'rgb' else color.value}"
    return color.kind


def _bar(total: int, progress: str):
    """A tqdm bar over the heatmaps of a TUNE (the same rules as the executor's)."""
    from kql.executor.common import progress_bar
    return progress_bar(total, progress, "TUNE", "heatmap")


def summary(cal: calibration.Calibration, notes: Sequence[str] = ()) -> Table:
    """The table TUNE returns for a calibration."""
    values = np.asarray(list(cal.ssim.values()))
    rows = []
    for i, tau in enumerate(cal.taus):
        col = values[:, i]
        rows.append([f"{tau:g}", f"{col.mean():.3f}", f"{col.min():.3f}", f"{cal.predict(tau):.3f}",
                     f"{int((col >= 0.9).sum())}/{len(col)}"])
    picks = ", ".join(f"{s:g} → τ {cal.tau_for(s):.2f}" for s in TARGETS)
    footer = [f"fit: {cal.fit_text()}",
              f"APPROX SSIM {picks}"]
    if cal.refine:
        footer.append(f"adaptive refinement (margin, median share of positions computed): {refine_text(cal)}")
    if cal.gates:
        footer.append(f"gate freezing ({cal.gates['count']} gates; SSIM 80 % of the images reached alone, "
                      f"work vs exact; τ with the gates for SSIM {'/'.join(f'{s:g}' for s in TARGETS)}): "
                      f"{gates_text(cal)}")
    footer += list(notes)
    title = (f"TUNE {cal.model} ({cal.weights}), input {_hw(cal.input_hw)}, patch {_hw(cal.patch)}, "
             f"stride {_hw(cal.stride)}, {cal.n_images} {'volume' if len(cal.input_hw) == 3 else 'image'}"
             f"{'s' if cal.n_images != 1 else ''}")
    return Table(["τ", "mean SSIM", "min SSIM", "fitted", "≥ 0.9"], rows, title=title, footer=footer)


def refine_text(cal) -> str:
    """``0.8: +0.000, 31 % · 0.9: ...`` (``-`` where no margin worked or not measured)."""
    out = []
    for s in TARGETS:
        got = cal.refine_margin(s)
        out.append(f"{s:g}: " + ("-" if got is None else f"+{got[0]:.3f}, {100 * got[1]:.0f} %"))
    return " · ".join(out)


def gates_text(cal) -> str:
    """``local 0.999, 27 %, τ 0.40/0.50/0.70 · frozen ...`` (``-`` for a target
    not even the gates alone reach); ``-`` when gates were not measured."""
    if not cal.gates:
        return "-"
    out = []
    for mode in GATE_APPROX:
        if mode not in cal.gates.get("ssim", {}):
            continue
        picks = "/".join("-" if (t := cal.gate_tau_for(mode, s)) is None else f"{t:.2f}" for s in TARGETS)
        out.append(f"{mode} {cal.gate_reached(mode, 1.0):.3f}, {100 * cal.gate_share(mode, 1.0):.0f} %, "
                   f"τ {picks}")
    return " · ".join(out)


def _hw(hw) -> str:
    return "x".join(str(v) for v in hw)


# ---------------------------------------------------------------------------
# SHOW CALIBRATIONS
# ---------------------------------------------------------------------------


def show_calibrations() -> Table:
    """Every stored calibration: the user's, then the built-in ones."""
    rows = []
    for c in calibration.load_all():
        taus = f"{min(c.taus):g}-{max(c.taus):g} ({len(c.taus)})"
        picks = " / ".join(f"{c.tau_for(s):.2f}" for s in TARGETS)
        stride = _hw(c.stride)
        if c.refine and tuple(c.refine.get("stride", c.stride)) != tuple(c.stride):
            stride += f" (refinement {_hw(c.refine['stride'])})"
        rows.append([c.model, c.weights, _hw(c.input_hw), _hw(c.patch), stride, str(c.n_images),
                     taus, c.fit_text(short=True), picks, refine_text(c) if c.refine else "-", gates_text(c),
                     c.source, c.created[:16].replace("T", " ")])
    cols = ["model", "weights", "input", "patch", "stride", "images", "τ range", "fit",
            "τ for SSIM " + "/".join(f"{s:g}" for s in TARGETS), "refinement (margin, share)",
            "gates (SSIM, work, τ)", "source", "created"]
    footer = [f"(user store: {calibration.user_store()}; TUNE adds to it)"]
    if not rows:
        footer.insert(0, "(no calibrations: make one with TUNE <model> ON <images> PATCH <n>)")
    return Table(cols, rows, footer=footer)
