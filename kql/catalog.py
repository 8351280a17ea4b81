"""The session catalog: names of images and models, and caches of the costly
things derived from them (constructed models, traced graphs).

Names resolve in this order: names bound for one query (``con.execute(...,
img=array)``), then names registered in the session (``LOAD IMAGE``, ``LOAD
MODEL``, ``con.register_*``), then built-ins (bundled sample images, torchvision
architectures and efficientnet_lite0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from kql import sources
from kql.sources import volumes
from kql.sources.models import canonical_name
from kql.sources.names import did_you_mean
from kql.errors import PlanError


class Catalog:
    """Where names resolve, and what resolving them costs to redo: specs,
    decoded files and traced graphs. ``keep_graphs``: how many traced graphs
    to keep, the latest (None: all, for a connection's life)."""

    def __init__(self, keep_graphs: Optional[int] = None) -> None:
        self.images: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        # Path -> decoded image: a multi-image job hands its worker the bytes
        # it hashed, so FROM '<path>' must not read the file a second time.
        self.files: dict[str, Any] = {}
        self._specs: dict[tuple, Any] = {}
        self._graphs: dict[tuple, Any] = {}
        self._keep_graphs = keep_graphs

    # -- images -----------------------------------------------------------
    def image(self, source, bindings: Optional[dict] = None):
        """Load the image or volume a ``Source`` names: ``(array HxWx3 in
        [0,1] or a kql.sources.volumes.Volume, description)``."""
        bindings = bindings or {}
        if source.kind == "path":
            if source.value in self.files:
                return self.files[source.value], f"file '{source.value}'"
            if volumes.is_volume_path(source.value):
                return volumes.load_volume(source.value), f"file '{source.value}'"
            return sources.load_image(source.value), f"file '{source.value}'"
        name = source.value
        bound = bindings.get(name)
        if name in bindings and not isinstance(bound, torch.nn.Module):
            if volumes.looks_like_volume(bound):
                return volumes.load_volume(bound, f"bound volume '{name}'"), f"bound volume '{name}'"
            return sources.load_image(bound), f"bound image '{name}'"
        if name in self.images:
            kind = "volume" if isinstance(self.images[name], volumes.Volume) else "image"
            return self.images[name], f"{kind} '{name}'"
        if name.lower() in sources.SAMPLE_IMAGES:
            return sources.load_sample(name), f"sample image '{name.lower()}'"
        if name.lower() in volumes.SAMPLE_VOLUMES:
            volume = volumes.load_sample_volume(name)
            return volume, volume.description
        if isinstance(bound, torch.nn.Module):
            raise PlanError(f"'{name}' is bound to a model ({type(bound).__name__}), not an image: "
                            f"FROM takes an image (array, PIL image, tensor or file path)")
        known = [n for n, v in bindings.items() if not isinstance(v, torch.nn.Module)]
        known += list(self.images) + list(sources.SAMPLE_IMAGES) + list(volumes.SAMPLE_VOLUMES)
        hint = did_you_mean(name, known)
        raise PlanError(f"unknown image '{name}': not a bound name, a LOAD IMAGE name or a sample "
                        f"image{hint} (SHOW IMAGES lists them; quote a file path: FROM '{name}.png')")

    def add_image(self, name: str, obj: Any) -> None:
        if volumes.looks_like_volume(obj) or (isinstance(obj, (str, Path)) and volumes.is_volume_path(obj)):
            self.images[name] = volumes.load_volume(obj, f"volume '{name}'")
        else:
            self.images[name] = sources.load_image(obj)

    # -- models -----------------------------------------------------------
    def model(self, name: str, weights: Optional[str] = None, bindings: Optional[dict] = None):
        """The ``ModelSpec`` a name refers to (constructed once per session)."""
        bindings = bindings or {}
        bound = bindings.get(name)
        if isinstance(bound, torch.nn.Module):
            spec = self._specs.get(("bound", name, id(bound)))
            if spec is None or spec.module is not bound:
                spec = sources.spec_from_module(name, bound)
                self._specs[("bound", name, id(bound))] = spec
            return self._no_weights(spec, weights, name)
        if name in self.models:
            return self._no_weights(self.models[name], weights, name)
        if name in bindings and canonical_name(name) not in sources.list_models():
            # an image (or anything else) bound under the name USING gives
            raise PlanError(f"'{name}' is bound to an object of type {type(bound).__name__}, not a "
                            f"model: USING takes a torch.nn.Module")
        key = (name, str(Path(weights).resolve()) if weights else None)
        if key not in self._specs:
            self._specs[key] = sources.load_model(name, weights=weights)
        return self._specs[key]

    @staticmethod
    def _no_weights(spec, weights, name):
        if weights:
            raise PlanError(f"WEIGHTS applies to built-in architectures; '{name}' is a model of this "
                            f"session and has its own weights")
        return spec

    def add_model(self, name: str, spec) -> None:
        self.models[name] = spec

    # -- graphs -----------------------------------------------------------
    def graph(self, spec, input_shape: tuple[int, int, int]):
        """The traced, shape-annotated graph of a model for one input shape."""
        from kql.planner.tracer import trace
        key = (id(spec.module), tuple(input_shape))
        hit = self._graphs.get(key)
        if hit is None or hit[0] is not spec.module:
            hit = (spec.module, trace(spec.module, tuple(input_shape)))
            self._graphs[key] = hit
            while self._keep_graphs is not None and len(self._graphs) > self._keep_graphs:
                self._graphs.pop(next(iter(self._graphs)))
        return hit[1]
