"""The binder: resolve a SELECT's names against the session catalog and build
the initial plan (the bound query, before any rule's decision).

Binding loads the image and the model, preprocesses the image and traces the
model once; the optimizer rules then decide everything else.

The binder is handed what it resolves names with, and imports nothing of the
front end: ``catalog`` answers ``image(source, bindings) -> (HxWx3 array,
description)``, ``model(name, weights, bindings) -> spec`` and
``graph(spec, input_shape) -> CNNGraph``; the model ``spec`` answers
``preprocess(image) -> (input tensor, display image)`` and
``fill_value(color, display) -> tensor`` (``kql.catalog.Catalog`` and
``kql.sources.ModelSpec`` are the front end's).
"""
from __future__ import annotations

from kql.errors import PlanError
from kql.planner.plan import Plan


def check_device(device: str, unavailable: str = "ON CUDA: CUDA is not available on this machine; use ON CPU") -> str:
    """``device`` in lower case; ``cuda`` on a machine without CUDA raises
    ``PlanError(unavailable)``. The one CUDA check of the query path."""
    device = str(device).lower()
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise PlanError(unavailable)
    return device


def bind(select, catalog, settings, bindings=None) -> Plan:
    """Build an unoptimized :class:`Plan` for ``select`` (its INTO path is
    the front end's to check, ``kql.compiler.compile_select``)."""
    device = check_device(select.device or settings.device)
    image, image_desc = catalog.image(select.source, bindings)
    spec = catalog.model(select.model, select.weights, bindings)
    x, display = spec.preprocess(image, select)     # the query's WINDOW / NORMALIZE / RESAMPLE for volumes
    graph = catalog.graph(spec, tuple(x.shape))
    fill = spec.fill_value(select.color, display)
    original = getattr(image, "spatial_shape", None) or image.shape[:2]    # a volume's (D, H, W)
    return bind_input(select, spec, graph, x, display, fill, settings, device,
                      image_desc=image_desc, original_hw=tuple(original))


def bind_input(select, spec, graph, x, display, fill, settings, device: str, *, image_desc: str,
               original_hw: tuple[int, int], fill_text: str = "") -> Plan:
    """The unoptimized :class:`Plan` of ``select`` over an input already in
    the model's space: ``x`` ``(C, H, W)``, its ``display`` image, the traced
    ``graph`` and the patch ``fill`` (``(C,)``, a ``(C, H, W)`` baseline or a
    callable, see ``executor.common.patch_values``). :func:`bind` calls it
    after loading and preprocessing an image; the tensor API
    (``kql.tensor_api``) with tensors the caller already normalised, and
    ``fill_text`` saying what its patch holds (EXPLAIN's ``color``)."""
    plan = Plan(query=select, spec=spec, graph=graph, image_desc=image_desc,
                original_hw=tuple(original_hw), input=x, display=display,
                settings=settings, fill=fill, fill_text=fill_text, device=device,
                allocator=settings.allocator)
    if spec.warning:
        plan.warnings.append(spec.warning)
    return plan

