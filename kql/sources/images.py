"""Images: the bundled sample photos, loading and decoding any image a user
passes (file, bytes, array, PIL image, tensor), and the folders and globs of
multi-image queries.

Images are float32 ``HxWx3`` arrays in ``[0, 1]`` throughout.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch

from kql.errors import PlanError
from kql.sources.names import did_you_mean

__all__ = ["SAMPLE_IMAGES", "SampleImage", "load_sample", "load_image", "decode_image",
           "is_multi_image", "list_images", "shape_text"]


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
        raise PlanError(f"unknown sample image '{name}'{did_you_mean(key, SAMPLE_IMAGES)} "
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
        raise PlanError(f"unsupported image tensor shape {shape_text(shape)}: expected HxW, CxHxW, "
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
        raise PlanError(f"unsupported image shape {shape_text(shape)} for {what}: expected HxW, "
                        f"HxWx1, HxWx3 or HxWx4{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PlanError(f"{what} is empty: shape {shape_text(shape)} has no pixels")

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


def shape_text(shape: Sequence[int]) -> str:
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
    (``.png``, ``.jpg``, ``.tif``, ...) and its volumes (``.npy``,
    ``.nii``, ``.nii.gz``); other files are left alone. A glob
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
    from kql.sources.volumes import is_volume_path
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith(".") and (os.path.splitext(f)[1].lower() in _image_extensions()
                                                 or is_volume_path(f))
                   and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise PlanError(f"folder '{path}' holds no image files (known extensions: .png, .jpg, .tif, ...; "
                        f"a glob such as '{os.path.join(path, '*')}' takes every file)")
    return path, files
