"""What the page may ask for, turned into KQL through the Python API.

A request from the page is a handful of choices, each checked against an
enumeration the server publishes (:meth:`Engine.options`): an image id (a
bundled sample or an upload the server named), a model from ``SHOW MODELS``,
patch and stride from fixed lists, a mode, an SSIM target offered by
:func:`approximate_support`, and a crop of whole pixels inside the model's
input. The query text is built from those validated values only; the image
is always bound as the parameter ``img`` (``con.explain(query, img=pixels)``),
never pasted into the text, and no WEIGHTS clause or file path is ever
written, so no client can make the server read a file.
"""
from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from kql.errors import KqlError, first_line
from kql.web.errors import WebError
from kql.web.uploads import ImageStore

PATCHES = (4, 8, 16, 32)
STRIDES = (2, 4, 8, 16)
MODES = ("naive", "exact", "approximate")
#: How many classes a run explains: the predicted one, or the top k (``LABEL TOP k``), every map
#: from the same incremental run; the page shows a class picker for k > 1.
CLASSES = (1, 3, 5)
SAMPLE_PREFIX = "sample-"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The query the page runs. ``img`` is a binding, never text from the client.
QUERY = "SELECT HEATMAP FROM img USING {model} PATCH {patch} STRIDE {stride} {mode}{region}"


@dataclass(frozen=True)
class RunRequest:
    """A validated request from the page."""
    image: str
    model: str
    patch: int
    stride: int
    mode: str
    ssim: Optional[float]
    region: Optional[tuple[int, int, int, int]]  # x0, y0, x1, y1 in model-input pixels
    top: int = 1  # 1: the predicted class; k > 1: LABEL TOP k

    @property
    def query(self) -> str:
        """The KQL text of this request (see :data:`QUERY`).

        >>> RunRequest("sample-coffee", "efficientnet_lite0", 16, 8, "exact", None,
        ...            (0, 0, 112, 112)).query
        'SELECT HEATMAP FROM img USING efficientnet_lite0 PATCH 16 STRIDE 8 EXACT REGION (0, 0, 112, 112)'
        >>> RunRequest("sample-coffee", "resnet18", 16, 8, "exact", None, None, top=5).query
        'SELECT HEATMAP FROM img USING resnet18 PATCH 16 STRIDE 8 EXACT LABEL TOP 5'
        """
        if self.mode == "approximate":
            mode = f"APPROX SSIM {self.ssim:g}"
        else:
            mode = self.mode.upper()
        region = "" if self.region is None else " REGION ({}, {}, {}, {})".format(*self.region)
        if self.top > 1:
            region += f" LABEL TOP {self.top}"
        return QUERY.format(model=self.model, patch=self.patch, stride=self.stride, mode=mode, region=region)


#: SSIM targets the page offers when a calibration exists (the issue's and Krypton's).
SSIM_TARGETS = (0.8, 0.9, 0.95)


def approximate_support(con, model: str, patch: int) -> dict:
    """Whether the page may offer approximate mode for ``model`` at ``patch``,
    and with which SSIM targets.

    The one place that decides it: approximate mode needs a ``TUNE``
    calibration of the model at this patch size (``kql.calibration``, what
    ``SHOW CALIBRATIONS`` lists); without one ``APPROX SSIM`` would run exact,
    and the reason says how to make one. Each target comes with the τ the
    calibration picks for it (the plan that runs, and the SSIM predicted for
    it, are the EXPLAIN's: ``/api/explain``).

    Returns:
        ``{"available": bool, "ssim": [targets, ascending], "tau": {target: τ},
        "reason": str}`` (``reason`` says why not, for the page to show; ""
        when available).
    """
    from kql import calibration
    try:
        found = [c for c in calibration.load_all()
                 if c.model == model and tuple(c.patch) == (patch, patch)]
    except KqlError as e:
        return {"available": False, "ssim": [], "tau": {}, "reason": f"no calibrations: {first_line(e)}"}
    if not found:
        return {"available": False, "ssim": [], "tau": {},
                "reason": f"{model} has no SSIM calibration for patch {patch} yet; make one in the kql shell "
                          f"with TUNE {model} ON <sample images> PATCH {patch} (e.g. TUNE {model} ON coffee, "
                          f"chelsea, astronaut PATCH {patch}), then reload this page"}
    cal = found[0]
    return {"available": True, "ssim": list(SSIM_TARGETS),
            "tau": {str(t): cal.tau_for(t) for t in SSIM_TARGETS}, "reason": ""}


class Engine:
    """The KQL session behind the page, and what it may be asked.

    One :class:`kql.Connection` serves every request. ``lock`` is held while
    a job runs and while a model is planned for the first time: tracing a
    model (torch.fx patches ``nn.Module.__call__`` for the whole process)
    must never overlap a running query, and neither may calibrating a runtime
    estimate, which runs the model. Plans of models already traced whose
    estimate is calibrated are explained without it, so the page can show an
    estimate while a job runs.
    """

    def __init__(self, connection=None, *, uploads: Optional[ImageStore] = None) -> None:
        import kql
        self.con = connection if connection is not None else kql.connect(progress="off")
        self.uploads = uploads if uploads is not None else ImageStore()
        self.lock = threading.RLock()
        self._traced: set[str] = set()
        self.busy = False  # a job is running
        self._samples: dict[str, np.ndarray] = {}
        self._models = self._catalog_models()

    # -- what the page may choose ----------------------------------------------
    def _catalog_models(self) -> dict[str, dict]:
        """The built-in models of SHOW MODELS with a fixed input size (the only
        ones the page offers: never a file, never weights from the client)."""
        out = {}
        for row in self.con.execute("SHOW MODELS").as_dicts():
            m = re.fullmatch(r"(\d+)x(\d+)", str(row["input"]))
            if row["source"] in ("built-in", "torchvision") and m and _NAME.match(row["model"]):
                # SHOW MODELS says "random unless WEIGHTS '<file>.pth'": the page never loads a file
                weights = row["weights"] if row["source"] == "built-in" else \
                    "random (the page loads no weight files)"
                out[row["model"]] = {"name": row["model"], "input": [int(m.group(1)), int(m.group(2))],
                                     "weights": weights, "source": row["source"]}
        return out

    def options(self) -> dict:
        from kql import sources
        from kql.web import uploads
        return {
            "models": list(self._models.values()),
            "samples": [{"id": SAMPLE_PREFIX + name, "name": name, "description": s.description}
                        for name, s in sources.SAMPLE_IMAGES.items()],
            "patches": list(PATCHES), "strides": list(STRIDES), "modes": list(MODES),
            "classes": list(CLASSES),
            "limits": {"upload_bytes": uploads.MAX_BYTES, "upload_pixels": uploads.MAX_PIXELS},
        }

    def approximate(self, model: Any, patch: Any) -> dict:
        model, patch = self._model(model), _choice("patch", patch, PATCHES)
        return approximate_support(self.con, model, patch)

    def validate(self, payload: Any) -> RunRequest:
        """Check every field of a request from the page; WebError names the bad one."""
        if not isinstance(payload, dict):
            raise WebError("the request must be a JSON object")
        unknown = sorted(set(payload) - {"image", "model", "patch", "stride", "mode", "ssim", "region", "top"})
        if unknown:
            raise WebError(f"unknown field '{unknown[0]}'")
        image = payload.get("image")
        self.pixels(image)  # exists?
        model = self._model(payload.get("model"))
        patch = _choice("patch", payload.get("patch"), PATCHES)
        stride = _choice("stride", payload.get("stride"), STRIDES)
        mode = payload.get("mode", "exact")
        if mode not in MODES:
            raise WebError(f"mode must be one of {', '.join(MODES)}, got {_shown(mode)}")
        ssim = None
        if mode == "approximate":
            support = approximate_support(self.con, model, patch)
            if not support["available"]:
                raise WebError(f"approximate mode: {support['reason']}")
            ssim = payload.get("ssim")
            if isinstance(ssim, bool) or not isinstance(ssim, (int, float)) or float(ssim) not in support["ssim"]:
                targets = ", ".join(f"{t:g}" for t in support["ssim"])
                raise WebError(f"ssim must be one of the calibrated targets {targets}, got {_shown(ssim)}")
            ssim = float(ssim)
        region = self._region(payload.get("region"), model)
        top = _choice("top", payload.get("top", 1), CLASSES)
        return RunRequest(image, model, patch, stride, mode, ssim, region, top)

    def _model(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self._models:
            raise WebError(f"model must be one of {', '.join(self._models)}, got {_shown(name)}")
        return name

    def _region(self, region: Any, model: str) -> Optional[tuple[int, int, int, int]]:
        if region is None:
            return None
        h, w = self._models[model]["input"]
        if (not isinstance(region, list) or len(region) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in region)):
            raise WebError("region must be [x0, y0, x1, y1], four whole numbers of pixels")
        x0, y0, x1, y1 = region
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise WebError(f"region [{x0}, {y0}, {x1}, {y1}] must lie inside the {w}x{h} model input "
                           f"with x0 < x1 and y0 < y1")
        return x0, y0, x1, y1

    # -- images ------------------------------------------------------------------
    def pixels(self, image_id: Any) -> np.ndarray:
        """uint8 HxWx3 pixels of a sample (``sample-<name>``) or an upload id."""
        if not isinstance(image_id, str) or not image_id:
            raise WebError("choose an image: a sample or an upload")
        if image_id.startswith(SAMPLE_PREFIX):
            from kql import sources
            name = image_id[len(SAMPLE_PREFIX):]
            if name not in sources.SAMPLE_IMAGES:
                raise WebError(f"unknown sample image {_shown(name)}", 404)
            if name not in self._samples:
                self._samples[name] = np.round(sources.load_sample(name) * 255).astype(np.uint8)
            return self._samples[name]
        return self.uploads.get(image_id).pixels

    def image_png(self, image_id: Any, max_side: int = 1024) -> bytes:
        """The image as PNG for the page, no larger than ``max_side``."""
        pixels = self.pixels(image_id)
        h, w = pixels.shape[:2]
        if max(h, w) > max_side:
            from skimage.transform import resize
            scale = max_side / max(h, w)
            pixels = resize(pixels, (max(1, round(h * scale)), max(1, round(w * scale))),
                            anti_aliasing=True, preserve_range=True).round().astype(np.uint8)
        return _png(pixels)

    # -- EXPLAIN and estimates -------------------------------------------------------
    def explain(self, request: RunRequest) -> dict:
        """The plan of a request, before it runs: EXPLAIN text, theoretical
        speedup, positions and an estimated run time.

        EXPLAIN runs the model when it traces it (first plan of a model) and
        when it calibrates the runtime estimate (first plan of a model, mode
        family and batch size): both wait for the lock. A plan that needs
        neither is explained while a job runs."""
        from kql.executor import timing_cache
        from kql.planner.explain import explain_text
        pixels = self.pixels(request.image)
        # planning a traced model runs nothing; the estimate in the text may calibrate
        plan = self.con.plan(request.query, {"img": pixels}) if request.model in self._traced else None
        if plan is not None and timing_cache.is_profiled(plan):
            text = explain_text(plan)
        else:
            # Another estimate holding the lock takes seconds: wait for it.
            # A job holding it may take minutes: answer now, the page retries.
            if not self.lock.acquire(timeout=2.0 if self.busy else -1):
                raise WebError(f"the estimate needs {request.model} loaded and timed on this machine, which "
                               f"waits for the running job; it is shown when that job ends", 503)
            try:
                if plan is None:
                    plan = self.con.plan(request.query, {"img": pixels})
                    self._traced.add(request.model)
                text = explain_text(plan)
            finally:
                self.lock.release()
        seconds, basis = _estimate(plan)
        chosen = next((c for c in plan.candidates or () if c.chosen), None)
        return {"query": request.query, "explain": text, "mode": plan.mode,
                "approximate_plan": None if chosen is None else chosen.name,
                "predicted_ssim": None if plan.predicted_ssim is None else round(float(plan.predicted_ssim), 4),
                "speedup": round(float(plan.cost.r_grid), 3), "positions": int(plan.n_positions),
                "estimated_seconds": seconds, "estimate_basis": basis,
                "warnings": list(plan.warnings)}

    # -- running (in the job worker) -----------------------------------------------
    def run(self, job) -> None:
        """Run ``job.work`` (a RunRequest) with progress and cancellation; fill
        ``job.result`` and ``job.files``. Runs in the worker thread."""
        from kql.executor.common import batch_hook
        request: RunRequest = job.work
        pixels = self.pixels(request.image)
        with self.lock, batch_hook(job.progress):
            self.busy = True
            try:
                e = self.con.explain(request.query, analyze=True, img=pixels)
                self._traced.add(request.model)
            finally:
                self.busy = False
        r = e.result
        job.phase = "rendering"
        lo, hi = float(np.min(r.heatmap)), float(np.max(r.heatmap))
        # the figure shows every class explained (a panel each); the overlays are one per class
        job.files = {"overlay.png": _overlay_png(r, lo, hi), "figure.png": _figure_png(r)}
        classes = [_class_entry(r, lo, hi, "overlay.png")]
        for i, label in enumerate((r.labels or [])[1:], start=1):  # LABEL TOP k
            one = r.select(label)
            one_lo, one_hi = float(np.min(one.heatmap)), float(np.max(one.heatmap))
            job.files[f"overlay-{i}.png"] = _overlay_png(one, one_lo, one_hi)
            classes.append(_class_entry(one, one_lo, one_hi, f"overlay-{i}.png"))
        job.result = {
            "query": request.query, "model": r.model, "mode": r.mode,
            "label": r.label_text, "label_index": r.label, "probability": r.p_original,
            # the query's own time: EXPLAIN ANALYZE may also calibrate its estimate, once
            "seconds": r.timings["total"], "timings": {k: round(v, 4) for k, v in r.timings.items()},
            "grid": list(r.heatmap.shape), "positions": int(r.heatmap.size),
            "patch": list(r.patch), "stride": list(r.stride),
            "region": None if r.region is None else [r.region.x0, r.region.y0, r.region.x1, r.region.y1],
            "input": list(r.image.shape[:2]), "range": [lo, hi], "colormap": COLORMAP,
            "speedup": round(float(e.speedup), 3), "explain": e.text, "warnings": list(r.warnings),
            "predicted_ssim": None if r.plan.predicted_ssim is None else round(float(r.plan.predicted_ssim), 4),
            "estimated_ssim": None if r.estimated_ssim is None else round(float(r.estimated_ssim), 4),
            "computed": None if r.computed is None else int(r.computed.sum()),
            # one entry per class explained (the first is the fields above); the page's class picker
            "classes": classes,
        }


def _class_entry(result, lo: float, hi: float, overlay: str) -> dict:
    """What the page's class picker shows for one of a run's classes."""
    return {"label": result.label_text, "label_index": result.label, "probability": result.p_original,
            "range": [lo, hi], "overlay": overlay}


def _overlay_png(result, lo: float, hi: float) -> bytes:
    """The pixel map as an RGBA PNG of the model input's size: inferno
    colours, transparent where no patch reached (outside the crop)."""
    from matplotlib import colormaps
    values = result.pixel_map()
    span = hi - lo if hi - lo > 1e-6 else 1.0
    rgba = colormaps["inferno"](np.clip((np.nan_to_num(values, nan=lo) - lo) / span, 0, 1))
    rgba[..., 3] = np.where(np.isnan(values), 0.0, 1.0)
    return _png((rgba * 255).round().astype(np.uint8))


def _figure_png(result) -> bytes:
    """The same figure ``INTO '<file>.png'`` writes (image, overlay, colorbar, title)."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory(prefix="kql-web-") as d:
        path = result.save(os.path.join(d, "figure.png"))
        with open(path, "rb") as f:
            return f.read()


def _estimate(plan) -> tuple[Optional[float], str]:
    """Seconds EXPLAIN estimates for the plan (``planner.runtime``: per-layer
    timings of this model on this machine) and where they come from."""
    try:
        est = plan.runtime.get()
    except Exception as e:  # a model that cannot run a calibration batch: the run will say why
        first = first_line(e)
        return None, f"no estimate: calibrating failed ({first})"
    return round(float(est.seconds), 3), "per-layer timings of this model on this machine"


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _colormap(n: int = 11) -> list[str]:
    """``n`` evenly spaced stops of inferno as CSS colours, for the colorbar."""
    from matplotlib import colormaps
    cmap = colormaps["inferno"]
    return ["#%02x%02x%02x" % tuple(round(c * 255) for c in cmap(i / (n - 1))[:3]) for i in range(n)]


COLORMAP = _colormap()


def _choice(what: str, value: Any, allowed: tuple) -> int:
    # ints only: 16.0 == 16 would otherwise put "PATCH 16.0" in the query
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise WebError(f"{what} must be one of {', '.join(map(str, allowed))}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
