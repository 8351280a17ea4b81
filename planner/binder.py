"""The binder: resolve a SELECT's names against the session catalog and build
the initial plan tree (Scan -> Preprocess -> Occlude -> Infer -> Heatmap).

Binding loads the image and the model, preprocesses the image and traces the
model once; the optimizer rules then decide everything else.
"""
from __future__ import annotations

from kql import sources
from kql.errors import PlanError
from kql.result import check_output_path
from kql.planner.plan import Plan, Step


def bind(select, catalog, settings, bindings=None) -> Plan:
    """Build an unoptimized :class:`Plan` for ``select``."""
    if select.into is not None:
        check_output_path(select.into)  # fail before the work, not after
    device = (select.device or settings.device).lower()
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise PlanError("ON CUDA: CUDA is not available on this machine; use ON CPU")
    image, image_desc = catalog.image(select.source, bindings)
    spec = catalog.model(select.model, select.weights, bindings)
    x, display = sources.preprocess(image, spec)
    graph = catalog.graph(spec, tuple(x.shape))
    fill = sources.fill_value(select.color, display, spec)
    H, W = image.shape[:2]
    C, h, w = x.shape
    color = select.color
    shown = color.kind.upper() if color.value is None else (
        str(color.value[0]) if color.kind == "value" else str(tuple(color.value)))
    prep = [("", f"resize {H}x{W} -> {h}x{w}" if (H, W) != (h, w) else f"{h}x{w}, no resize"),
            ("normalize", f"mean {_tup(spec.mean)} std {_tup(spec.std)}"), ("channels", str(C))]
    return bind_input(select, spec, graph, x, display, fill, settings, device,
                      image_desc=image_desc, original_hw=(H, W), preprocess=prep, fill_text=shown)


def bind_input(select, spec, graph, x, display, fill, settings, device: str, *, image_desc: str,
               original_hw: tuple[int, int], preprocess: list, fill_text: str) -> Plan:
    """The unoptimized :class:`Plan` of ``select`` over an input already in
    the model's space: ``x`` ``(C, H, W)``, its ``display`` image, the traced
    ``graph`` and the patch ``fill`` (``(C,)``, or a ``(C, H, W)`` baseline).
    :func:`bind` calls it after loading and preprocessing an image; the tensor
    API (``kql.tensor_api``) with tensors the caller already normalised.
    ``preprocess`` holds the Preprocess step's details."""
    plan = Plan(query=select, spec=spec, graph=graph, image_desc=image_desc,
                original_hw=tuple(original_hw), input=x, display=display,
                settings=settings, fill=fill, device=device)
    if spec.warning:
        plan.warnings.append(spec.warning)
    H, W = original_hw
    scan = Step("Scan", [("", f"{image_desc} ({H}x{W})")])
    prep = Step("Preprocess", list(preprocess), [scan])
    shown = fill_text
    occlude = Step("Occlude", [("patch", f"{select.patch[0]}x{select.patch[1]}"),
                               ("stride", f"{select.stride[0]}x{select.stride[1]}"),
                               ("color", shown)], [prep])
    infer = Step("Infer", [("model", f"{spec.name} ({spec.weights})"),
                           ("device", device)], [occlude])
    heatmap = Step("Heatmap", [], [infer])
    if select.into:
        heatmap.detail("into", select.into)
    plan.root = heatmap
    return plan


def _tup(v) -> str:
    return "(" + ", ".join(f"{float(a):.3g}" for a in v) + ")"

