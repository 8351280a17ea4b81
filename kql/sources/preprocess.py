"""How an image becomes model input: resizing, channels, normalisation, and
the colour of the occlusion patch as the model sees it."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from kql.ast import Color
from kql.errors import PlanError
from kql.sources.images import shape_text

if TYPE_CHECKING:
    from kql.sources.models import ModelSpec

__all__ = ["preprocess", "fill_value"]

# ITU-R BT.709 luma weights, the ones skimage.color.rgb2gray uses.
_LUMA = np.array([0.2125, 0.7154, 0.0721])


def preprocess(image: np.ndarray, spec: ModelSpec) -> tuple[torch.Tensor, np.ndarray]:
    """Turn a loaded image into the model's input.

    Resizes to ``spec.input_size`` (when set and different) with
    ``skimage.transform.resize`` (bilinear, anti-aliased), converts to
    ``spec.channels`` (luminance, ITU-R BT.709 weights, for 1 channel) and
    normalises with ``spec.mean`` / ``spec.std``.

    Args:
        image: float array ``HxWx3`` in ``[0, 1]`` (as :func:`load_image` returns).
        spec: the model.

    Returns:
        ``(x, display)``: ``x`` the float32 input tensor ``(C, H, W)``;
        ``display`` float32 ``HxWx3`` in ``[0, 1]``, the resized image as the
        model sees it before normalisation (gray repeated over three channels
        for a 1-channel model). Patch coordinates refer to both.

    Raises:
        PlanError: the image is not ``HxWx3``.

    >>> from kql.sources import load_model
    >>> x, shown = preprocess(np.zeros((100, 50, 3), np.float32), load_model("efficientnet_lite0"))
    >>> tuple(x.shape), shown.shape, float(x.min())
    ((3, 224, 224), (224, 224, 3), -1.0)
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise PlanError(f"preprocess takes an HxWx3 image (load it with load_image), got shape "
                        f"{shape_text(image.shape)}")
    x = image.astype(np.float32, copy=False)
    if spec.input_size is not None and tuple(x.shape[:2]) != tuple(spec.input_size):
        from skimage.transform import resize
        x = resize(x, tuple(spec.input_size), order=1, anti_aliasing=True, preserve_range=True)
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if spec.channels == 1:
        gray = (x @ _LUMA.astype(np.float32))[:, :, None]
        display = np.repeat(gray, 3, axis=2)
        chans = gray
    else:
        display = x
        chans = x
    display = np.ascontiguousarray(display, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normed = (chans - mean) / std
    tensor = torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1), dtype=np.float32))
    return tensor, display


def fill_value(color: Color, display_image: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """The occlusion patch colour as the model sees it: one value per input channel.

    ``BLACK`` is 0, ``GRAY`` 128/255, ``MEAN`` the display image's per-channel
    mean, a value or RGB triple is on the 0-255 scale. For a 1-channel model
    the colour is converted to luminance. The result is normalised,
    ``(v - mean) / std``, so it can be written straight into the input tensor.

    Args:
        color: the ``kql.ast.Color`` of the query.
        display_image: the display image from :func:`preprocess`.
        spec: the model.

    Returns:
        float32 tensor of shape ``(spec.channels,)``.

    Raises:
        PlanError: a value outside 0-255, or a malformed colour.

    >>> from kql.sources import Color, load_model
    >>> spec = load_model("efficientnet_lite0")
    >>> fill_value(Color("black"), np.zeros((2, 2, 3)), spec).tolist()
    [-1.0, -1.0, -1.0]
    """
    kind = color.kind
    if kind == "black":
        rgb = np.zeros(3)
    elif kind == "gray":
        rgb = np.full(3, 128 / 255)
    elif kind == "mean":
        img = np.asarray(display_image, dtype=np.float64)
        rgb = img.reshape(-1, img.shape[-1]).mean(axis=0)
    elif kind in ("value", "rgb"):
        want = 1 if kind == "value" else 3
        raw = color.value
        vals = (raw,) if isinstance(raw, (int, float, np.number)) else tuple(raw or ())
        if len(vals) != want:
            raise PlanError(f"COLOR {kind.upper()} takes {want} value{'s' if want > 1 else ''} on the "
                            f"0-255 scale, got {vals!r}")
        if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals):
            raise PlanError(f"COLOR {kind.upper()} takes numbers on the 0-255 scale, got {vals!r}")
        for v in vals:
            if not (math.isfinite(v) and 0 <= v <= 255):
                shown = f"{v:g}" if kind == "value" else f"({', '.join(f'{u:g}' for u in vals)})"
                raise PlanError(f"COLOR {shown} is out of range: {v:g} is not in 0-255")
        rgb = np.array(vals * 3 if kind == "value" else vals, dtype=np.float64) / 255
    else:
        raise PlanError(f"unknown colour {kind!r}: use BLACK, GRAY, MEAN, a value 0-255 or (r, g, b)")

    if spec.channels == 1:
        chans = np.array([float(rgb @ _LUMA)])
    else:
        chans = rgb
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.asarray(spec.std, dtype=np.float64)
    return torch.tensor((chans - mean) / std, dtype=torch.float32)
