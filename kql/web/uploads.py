"""Uploaded images: checked before they are decoded, decoded with
scikit-image, kept in memory under names the server makes up.

An upload is refused, with a one-line message, when it is empty, larger than
the byte cap, not an image in one of the accepted formats, or larger than the
pixel cap. The pixel cap is checked on the header, before any pixel is
decoded, so a small file that claims a huge size (a decompression bomb) never
gets to allocate it; frames of an animation count against it too.
"""
from __future__ import annotations

import io
import secrets
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kql.web.errors import WebError

#: Formats accepted, as Pillow names them (the header tells, not the file name).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MAX_BYTES = 16 * 2**20
MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Upload:
    """A decoded upload: ``pixels`` uint8 ``HxWx3``; ``name`` is for display only."""
    id: str
    name: str
    pixels: np.ndarray


def decode(data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Check and decode an uploaded file into uint8 ``HxWx3`` pixels.

    Raises:
        WebError (400 or 413): empty, too many bytes, not an accepted image,
            too many pixels, or undecodable; the message says which.

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (3, 2)).save(buf, "PNG")
    >>> decode(buf.getvalue()).shape
    (2, 3, 3)
    """
    if not data:
        raise WebError("the upload is empty: choose an image file")
    if len(data) > max_bytes:
        raise WebError(f"the upload is {_mb(len(data))}; the limit is {_mb(max_bytes)}", 413)
    width, height, frames, mode, orientation = _header(data)
    pixels = width * height * frames
    if pixels > max_pixels:
        what = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise WebError(f"the image is {what} = {_mp(pixels)} pixels; the limit is {_mp(max_pixels)} "
                       f"(downscale it first)", 413)
    if mode == "CMYK":
        raise WebError("CMYK images are not supported: save it as RGB")
    try:
        import skimage.io
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(skimage.io.imread(io.BytesIO(data)))
    except Exception:
        raise WebError("the upload could not be decoded: the image file is damaged or truncated") from None
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]  # an animation: its first frame, like load_image
    if arr.shape[:2] != (height, width):
        raise WebError(f"the upload could not be decoded: its header says {width}x{height}, "
                       f"its pixels are {'x'.join(map(str, arr.shape[1::-1]))}")
    arr = _orient(arr, orientation)
    if arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha -> RGBA
        arr = np.concatenate([arr[..., :1]] * 3 + [arr[..., 1:]], axis=2)
    from kql import sources
    from kql.errors import KqlError
    try:
        image = sources.load_image(arr)  # validates shape and range; float HxWx3
    except KqlError as e:
        raise WebError(f"the upload is not a usable image: {e}") from None
    return np.round(image * 255).astype(np.uint8)


def _header(data: bytes) -> tuple[int, int, int, str, int]:
    """(width, height, frames, mode, EXIF orientation) from the file's header,
    nothing decoded."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own cap decides
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                width, height = img.size
                frames = int(getattr(img, "n_frames", 1) or 1)
                mode = img.mode
                try:
                    orientation = int(img.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block does not make the image unreadable
                    orientation = 1
    except Image.DecompressionBombError:
        raise WebError("the image has far more pixels than the limit (a decompression bomb?)", 413) from None
    except Exception:
        raise WebError(f"the upload is not an image: accepted formats are {', '.join(FORMATS)}") from None
    if fmt not in FORMATS:
        raise WebError(f"{fmt} images are not accepted: accepted formats are {', '.join(FORMATS)}")
    if width < 1 or height < 1:
        raise WebError(f"the image is empty ({width}x{height})")
    return width, height, frames, mode, orientation


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) the way ``PIL.ImageOps.exif_transpose``
    does, so an upload looks as it does in a viewer and as ``LOAD IMAGE``
    reads it (scikit-image decodes the stored pixels unrotated)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    op = ops.get(orientation)
    return arr if op is None else np.ascontiguousarray(op(arr))


def _mb(n: int) -> str:
    from kql.planner.plan import format_bytes
    return format_bytes(n)


def _mp(n: int) -> str:
    return f"{n / 1e6:.1f} M"


class ImageStore:
    """Uploads by id, the oldest forgotten first beyond ``capacity``. Ids are
    random and made here: a client never names a file on the server."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Upload] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str, pixels: np.ndarray) -> Upload:
        upload = Upload("u" + secrets.token_hex(8), _display_name(name), pixels)
        with self._lock:
            self._items[upload.id] = upload
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return upload

    def get(self, upload_id: str) -> Upload:
        with self._lock:
            upload = self._items.get(upload_id)
            if upload is not None:
                self._items.move_to_end(upload_id)
        if upload is None:
            raise WebError("unknown image: it was never uploaded or has been forgotten; upload it again", 404)
        return upload

    def __len__(self) -> int:
        return len(self._items)


def _display_name(name: str) -> str:
    """The client's file name, only ever shown back: printable, short."""
    name = "".join(ch for ch in str(name or "") if ch.isprintable())[-80:]
    return name or "upload"
