"""Volumes: CT / MRI scans and video clips, read from ``.npy`` and NIfTI
(``.nii``, ``.nii.gz``) files or bound from numpy / torch, and how a volume
becomes a 3-D model's input.

A volume is ``(C, D, H, W)`` float32 in the scan's own units (Hounsfield
units, MRI signal, 0-255 video pixels), channels first like torch's Conv3d.
A NIfTI file's axes (i, j, k) become (D, H, W) as nibabel loads them (as
MONAI's ``LoadImage`` does, channel first); a video clip is ``(C, T, H, W)``.

The model sees, in this order (EXPLAIN lists each step):

1. ``RESAMPLE <d>x<h>x<w>`` (or the model's fixed input size): trilinear
   resampling of the voxel grid (``torch.nn.functional.interpolate``,
   ``align_corners=False``);
2. the intensity transform: ``WINDOW (lo, hi)`` clips to ``[lo, hi]`` and
   scales to ``[0, 1]``; ``NORMALIZE MINMAX`` scales the scan's range to
   ``[0, 1]``, ``ZSCORE`` to mean 0 and standard deviation 1 (per channel),
   ``NONE`` keeps the values. Without either clause a ``uint8`` volume is
   divided by 255 (video frames) and any other is ``MINMAX``;
3. the model's own normalisation ``(x - mean) / std`` (0 and 1 for MONAI's
   networks, Kinetics-400's statistics for torchvision's video networks).

Every step is "clip, then scale and shift", so a patch colour given in the
scan's units (``COLOR -1000``: air in HU) goes through the very same steps.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from kql.ast import size_text
from kql.errors import PlanError

__all__ = ["Volume", "ScanView", "Intensity", "VOLUME_EXTENSIONS", "SAMPLE_VOLUMES", "is_volume_path",
           "looks_like_volume", "load_volume", "load_sample_volume", "preprocess_volume", "volume_fill",
           "resample_to"]

SAMPLE_VOLUMES = {"phantom": "synthetic CT-like phantom, 64x64x64 in HU, 1.5 mm voxels (kql.datasets.phantom)"}
"""Sample volumes usable by name (``FROM phantom``): name -> description."""

VOLUME_EXTENSIONS = (".npy", ".nii", ".nii.gz")


@dataclass
class Volume:
    """A volume: what KQL reads from files, and what a user binds to say
    "this array is a volume" and give it an affine:
    ``con.execute(q, ct=kql.Volume(array, affine))`` (``data`` then may be
    ``DxHxW`` or ``CxDxHxW`` of any real dtype; it is checked and converted).

    Attributes:
        data: float32 ``(C, D, H, W)`` in the scan's units.
        affine: the 4x4 voxel-to-world matrix of a NIfTI file (voxel
            ``(d, h, w, 1)`` to millimetres), or ``None`` when the source has
            none (``.npy``, arrays): outputs then use the identity.
        description: what it is, for messages (``file 'ct.nii.gz'``).
        integer_pixels: the source held ``uint8`` (0-255 video frames).
    """
    data: np.ndarray
    affine: Optional[np.ndarray] = None
    description: str = "volume"
    integer_pixels: bool = False

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size per axis (mm) from the affine; 1 without one."""
        return voxel_spacing(self.affine)

    def __repr__(self) -> str:
        return f"<Volume {self.description} {size_text(self.data.shape)}>"


def voxel_spacing(affine: Optional[np.ndarray]) -> tuple[float, float, float]:
    """Voxel size per axis (mm) of a 4x4 voxel-to-world matrix: the lengths
    of its first three columns (a voxel step along each axis, in the world);
    1 without an affine.

    >>> voxel_spacing(np.diag([1.5, 2.0, 3.0, 1.0]))
    (1.5, 2.0, 3.0)
    """
    if affine is None:
        return (1.0, 1.0, 1.0)
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def is_volume_path(path: Union[str, os.PathLike]) -> bool:
    """Whether a file name is a volume's (``.npy``, ``.nii``, ``.nii.gz``).

    >>> is_volume_path("ct.NII.gz"), is_volume_path("cat.png")
    (True, False)
    """
    return os.fspath(path).lower().endswith(VOLUME_EXTENSIONS)


def looks_like_volume(obj: Any) -> bool:
    """Whether a bound object is a volume rather than an image.

    A :class:`Volume` is; a numpy array of 4 axes ``(C, D, H, W)``; a tensor
    ``(1, C, D, H, W)``, or ``(C, D, H, W)`` unless it is an image batch
    ``1xCxHxW`` with C = 1, 3 or 4; an array or tensor ``(D, H, W)`` when
    neither its first nor its last axis could be an image's channels (1, 3
    or 4). Wrap an array that reads the other way in :class:`Volume`
    (``Volume(array[None].astype("float32"))``).
    """
    if isinstance(obj, Volume):
        return True
    if not isinstance(obj, (np.ndarray, torch.Tensor)):
        return False
    s = tuple(obj.shape)
    if len(s) == 3:
        return s[0] not in (1, 3, 4) and s[2] not in (1, 3, 4)
    if isinstance(obj, np.ndarray):
        return len(s) == 4
    return len(s) == 5 or (len(s) == 4 and not (s[0] == 1 and s[1] in (1, 3, 4)))


# ---------------------------------------------------------------- loading

def load_sample_volume(name: str) -> Volume:
    """A bundled sample volume by name: ``phantom``, synthetic (:func:`kql.datasets.phantom`).

    >>> load_sample_volume("phantom").data.shape
    (1, 64, 64, 64)
    """
    from kql.datasets import phantom, phantom_affine
    key = str(name).lower()
    if key not in SAMPLE_VOLUMES:
        raise PlanError(f"unknown sample volume '{name}' (SHOW IMAGES lists them)")
    return Volume(phantom()[None], phantom_affine(), f"sample volume '{key}' (synthetic)")

def load_volume(obj: Any, what: Optional[str] = None) -> Volume:
    """A volume from a path (``.npy``, ``.nii``, ``.nii.gz``), an array, a
    tensor or a :class:`Volume`.

    A ``.npy`` file or array of 3 axes is one channel ``(D, H, W)``; of 4 it is
    channels first ``(C, D, H, W)``; a tensor may carry a batch axis of 1.
    A NIfTI file must hold one 3-D scan (a 4th axis of length 1 is dropped).

    Raises:
        PlanError: a missing or corrupt file, a NIfTI with 4 dimensions, an
            affine that is not invertible, a shape, dtype or value (NaN, inf)
            a volume cannot have.

    >>> load_volume(np.zeros((4, 5, 6), np.int16)).data.shape
    (1, 4, 5, 6)
    """
    if isinstance(obj, Volume):
        # one the user made: kql.Volume(array, affine) with any layout load_volume reads
        vol = _from_array(obj.data, what or obj.description)
        if obj.affine is not None:
            affine = np.asarray(obj.affine, dtype=np.float64)
            _check_affine(affine, what or obj.description)
            vol.affine = affine
        vol.integer_pixels = vol.integer_pixels or obj.integer_pixels
        return vol
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.exists(path):
            raise PlanError(f"volume file not found: '{path}'")
        if os.path.isdir(path):
            raise PlanError(f"cannot read volume '{path}': it is a directory, not a file")
        lower = path.lower()
        if lower.endswith(".npy"):
            return _read_npy(path)
        if lower.endswith((".nii", ".nii.gz")):
            return _read_nifti(path)
        raise PlanError(f"cannot read volume '{path}': volumes are .npy, .nii or .nii.gz files")
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.ndim == 5 and t.shape[0] == 1:
            t = t[0]
        return _from_array(t.numpy(), what or "tensor")
    if isinstance(obj, np.ndarray):
        return _from_array(obj, what or "array")
    raise PlanError(f"cannot use a {type(obj).__name__} as a volume: pass a .npy or NIfTI path, "
                    f"a numpy array or a torch tensor")


def _read_npy(path: str) -> Volume:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise PlanError(f"cannot read volume '{path}': {e} (object arrays are refused: they "
                        f"would run pickled code)") from None
    except (OSError, EOFError) as e:
        raise PlanError(f"cannot read volume '{path}': not a valid .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise PlanError(f"cannot read volume '{path}': it holds a {type(arr).__name__}, not one array")
    return _from_array(arr, f"file '{path}'")


def _read_nifti(path: str) -> Volume:
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - a dependency
        raise PlanError("reading NIfTI files needs nibabel: pip install nibabel") from None
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error...
        raise PlanError(f"cannot read volume '{path}': not a valid NIfTI file "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise PlanError(f"NIfTI '{path}' has {len(shape)} dimensions ({size_text(shape)}); KQL reads one 3-D "
                        f"scan per file: pick one volume of a series first (e.g. with nibabel, "
                        f"img.slicer[..., 0]) and save or bind it")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, f"NIfTI '{path}'")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as e:
        raise PlanError(f"cannot read volume '{path}': its voxel data is damaged or truncated "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    dtype = img.get_data_dtype()
    vol = _from_array(data, f"file '{path}'")
    vol.affine = affine
    vol.integer_pixels = dtype == np.uint8
    return vol


def _check_affine(affine: np.ndarray, what: str) -> None:
    """An affine must map voxels to distinct points: finite, 4x4, invertible."""
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise PlanError(f"{what} has an affine that is not a finite 4x4 matrix; fix the header "
                        f"(sform / qform)")
    with np.errstate(all="ignore"):
        det = float(np.linalg.det(affine[:3, :3]))
    scale = float(np.abs(affine[:3, :3]).max()) or 1.0
    if not math.isfinite(det) or abs(det) <= 1e-9 * scale ** 3:
        raise PlanError(f"{what} has an affine that is not invertible (determinant {det:g}): its voxels "
                        f"have no place in space; fix the header (sform / qform, pixdim)")


def _from_array(arr: np.ndarray, what: str) -> Volume:
    arr = np.asarray(arr)
    shape = arr.shape
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise PlanError(f"{what} has shape {size_text(shape) or 'scalar'}: a volume is DxHxW (one channel) or "
                        f"CxDxHxW (channels first)")
    if arr.size == 0:
        raise PlanError(f"{what} is empty: shape {size_text(shape)} has no voxels")
    if not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise PlanError(f"unsupported volume dtype {arr.dtype} for {what}: use integers, floats or bool")
    data = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(data).all():
        raise PlanError(f"{what} contains NaN or infinite values")
    return Volume(data, None, what, integer_pixels=arr.dtype == np.uint8)


# ---------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Intensity:
    """Clip to ``[lo, hi]`` (either may be None), then ``(v - offset) * scale``
    per channel: every intensity step composed, in the scan's units in and
    the model's input out."""
    lo: Optional[float]
    hi: Optional[float]
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``data`` ``(C, ...)`` (or ``(C,)``) in scan units -> model input."""
        data = np.asarray(data, dtype=np.float32)
        if self.lo is not None or self.hi is not None:
            data = np.clip(data, self.lo, self.hi)
        shape = (-1,) + (1,) * (data.ndim - 1)
        offset = np.asarray(self.offset, np.float32).reshape(shape)
        scale = np.asarray(self.scale, np.float32).reshape(shape)
        return (data - offset) * scale


@dataclass
class ScanView:
    """What a volume query shows and writes besides the heatmap (the 3-D
    counterpart of a 2-D query's display image).

    Attributes:
        image: float32 ``(D, H, W)`` in ``[0, 1]`` on the model's grid: the
            scan as windowed for people (its first channel, or the channels'
            mean for a clip).
        original_shape: the volume's own grid ``(D, H, W)`` before RESAMPLE.
        affine: the source's 4x4 voxel-to-world matrix, or ``None``.
        intensity: the intensity steps and the model's normalisation
            composed (:class:`Intensity`), for patch colours in scan units.
        display_range: the scan values shown black and white.
        input_mean: per channel, the mean of the model input (``COLOR MEAN``).
        steps: ``(name, text)`` per preprocessing step, for EXPLAIN.
        description: the source, for people.
    """
    image: np.ndarray
    original_shape: tuple[int, int, int]
    affine: Optional[np.ndarray]
    intensity: Intensity
    display_range: tuple[float, float]
    input_mean: tuple[float, ...]
    steps: list = field(default_factory=list)
    description: str = ""

    ndim = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)

    @property
    def resampled(self) -> bool:
        return self.shape != tuple(self.original_shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) per axis on the model's grid (the source's,
        stretched by RESAMPLE); 1 without an affine."""
        if self.affine is None:   # no size in the world: the model's voxels are shown square
            return (1.0, 1.0, 1.0)
        return tuple(s * o / n for s, o, n in zip(voxel_spacing(self.affine), self.original_shape, self.shape))


def _stats(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = data.reshape(data.shape[0], -1).astype(np.float64)
    return flat.min(axis=1), flat.max(axis=1)


def resample_to(data: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``data`` ``(C, D, H, W)`` resampled to ``size`` (trilinear, torch's
    ``interpolate`` with ``align_corners=False``); NaN (outside a region)
    stays NaN where the nearest values are NaN."""
    size = tuple(int(s) for s in size)
    if tuple(data.shape[1:]) == size:
        return np.asarray(data, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    valid = torch.isfinite(t)
    if bool(valid.all()):
        out = torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=False)
        return out[0].numpy()
    w = torch.nn.functional.interpolate(valid.float(), size=size, mode="trilinear", align_corners=False)
    v = torch.nn.functional.interpolate(torch.where(valid, t, 0.0), size=size, mode="trilinear",
                                        align_corners=False)
    out = torch.where(w >= 0.5, v / w.clamp_min(1e-12), torch.tensor(float("nan")))
    return out[0].numpy()


def preprocess_volume(vol: Volume, spec, *, window: Optional[tuple[float, float]] = None,
                      normalize: Optional[str] = None,
                      resample: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, ScanView]:
    """A volume as ``spec``'s input: ``(x (C, D, H, W) float32, ScanView)``.

    ``resample`` is the size as the query wrote it (one number: a cube);
    without it the model's fixed input size, if it has one.

    Raises:
        PlanError: a bad WINDOW, RESAMPLE or NORMALIZE, or channels the model
            cannot take.
    """
    steps = []
    C = vol.channels
    want = int(spec.channels)
    if C != want:
        if C != 1:
            raise PlanError(f"{vol.description} has {C} channels ({size_text(vol.data.shape)}); model "
                            f"'{spec.name}' takes {want}")
    data = vol.data
    shape = vol.spatial_shape
    if resample is not None:
        from kql.ast import expand_size
        size = expand_size(resample, 3, "RESAMPLE")
        if min(size) < 1:
            raise PlanError(f"RESAMPLE {size_text(resample)}: every size must be at least 1")
    elif spec.input_size is not None and len(spec.input_size) == 3:
        size = tuple(int(s) for s in spec.input_size)
    else:
        size = shape
    if tuple(size) != shape:
        data = resample_to(data, size)
        why = "RESAMPLE" if resample is not None else f"the model's input size"
        steps.append(("resample", f"{size_text(shape)} -> {size_text(size)} (trilinear, {why})"))
    else:
        steps.append(("grid", f"{size_text(shape)}, no resampling"))

    lo_c, hi_c = _stats(data)
    clip_lo = clip_hi = None
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise PlanError(f"WINDOW ({lo:g}, {hi:g}) is empty: WINDOW takes (lo, hi) with lo < hi, in "
                            f"the scan's units")
        clip_lo, clip_hi = lo, hi
        offset = np.full(C, lo)
        scale = np.full(C, 1.0 / (hi - lo))
        steps.append(("window", f"({lo:g}, {hi:g}) -> [0, 1]"))
        display = (lo, hi)
    elif normalize is None and vol.integer_pixels:
        offset, scale = np.zeros(C), np.full(C, 1 / 255)
        steps.append(("intensity", "uint8 / 255 -> [0, 1]"))
        display = (0.0, 255.0)
    else:
        offset, scale = np.zeros(C), np.ones(C)
        display = (float(lo_c.min()), float(hi_c.max()))
    how = normalize if normalize is not None else (None if window is not None or vol.integer_pixels else "minmax")
    if how == "minmax":
        # any earlier step is a scale and shift, so MINMAX after it is the
        # scan's (clipped) range mapped to [0, 1] directly
        lo_v = np.clip(lo_c, clip_lo, clip_hi) if window is not None else lo_c
        hi_v = np.clip(hi_c, clip_lo, clip_hi) if window is not None else hi_c
        offset, scale = lo_v, 1.0 / np.maximum(hi_v - lo_v, 1e-12)
        steps.append(("normalize", "MINMAX: the scan's range -> [0, 1]"
                      + (" (default)" if normalize is None else "")))
    elif how == "zscore":
        u = Intensity(clip_lo, clip_hi, tuple(offset), tuple(scale)).apply(data)
        flat = u.reshape(C, -1).astype(np.float64)
        mean, std = flat.mean(axis=1), flat.std(axis=1)
        std = np.where(std > 1e-12, std, 1.0)
        offset = offset + mean / scale
        scale = scale / std
        steps.append(("normalize", "ZSCORE: mean 0, standard deviation 1 per channel"))
    elif how == "none":
        steps.append(("normalize", "NONE: the values as they are"))
    mean = np.asarray(spec.mean, np.float64)
    std = np.asarray(spec.std, np.float64)
    if C != want:
        offset, scale = np.repeat(offset[:1], want), np.repeat(scale[:1], want)
        data = np.repeat(data, want, axis=0)
        steps.append(("channels", f"1 -> {want} (repeated)"))
    # the model's own normalisation, composed: ((v - o) * s - m) / d = (v - (o + m / s)) * (s / d)
    intensity = Intensity(clip_lo, clip_hi, tuple(offset + mean / scale), tuple(scale / std))
    if not (np.allclose(mean, 0) and np.allclose(std, 1)):
        steps.append(("model normalize", f"mean {tuple(round(v, 4) for v in mean)} "
                                         f"std {tuple(round(v, 4) for v in std)}"))
    x = intensity.apply(data)
    lo_d, hi_d = display
    shown = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    image = np.clip((shown - lo_d) / max(hi_d - lo_d, 1e-12), 0.0, 1.0).astype(np.float32)
    view = ScanView(image=image, original_shape=shape, affine=vol.affine, intensity=intensity,
                    display_range=(float(lo_d), float(hi_d)),
                    input_mean=tuple(float(v) for v in x.reshape(want, -1).mean(axis=1)),
                    steps=steps, description=vol.description)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), view


def volume_fill(color, view: ScanView, spec) -> torch.Tensor:
    """The patch colour of a volume query, as the model sees it: ``(C,)``.

    ``COLOR <v>`` is in the scan's units (``-1000``: air in HU) and goes
    through the scan's own intensity steps; ``MEAN`` is the mean of the model
    input per channel; ``BLACK`` and ``GRAY`` are the darkest and the middle
    value of the displayed range (the window, else the scan's range);
    ``(r, g, b)`` takes three values in the clip's units for 3 channels.

    Raises:
        PlanError: a value that is not a finite number, or (r, g, b) on a scan
            of another channel count.
    """
    C = int(spec.channels)
    lo, hi = view.display_range
    kind = color.kind
    if kind == "mean":
        return torch.tensor(view.input_mean, dtype=torch.float32)
    if kind == "black":
        raw = np.full(C, lo)
    elif kind == "gray":
        raw = np.full(C, (lo + hi) / 2)
    elif kind in ("value", "rgb"):
        vals = tuple(color.value or ())
        if kind == "rgb" and C != 3:
            raise PlanError(f"COLOR ({', '.join(f'{v:g}' for v in vals)}) gives 3 channels; the model takes "
                            f"{C}: give one number in the scan's units (e.g. COLOR -1000) or MEAN")
        if not all(isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in vals):
            raise PlanError(f"COLOR takes finite numbers in the scan's units, got {vals!r}")
        raw = np.full(C, vals[0]) if kind == "value" else np.asarray(vals, np.float64)
    else:
        raise PlanError(f"unknown colour {kind!r}: use a number in the scan's units, MEAN, BLACK or GRAY")
    return torch.from_numpy(view.intensity.apply(raw.astype(np.float32)).astype(np.float32))
