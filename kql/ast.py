"""The KQL abstract syntax tree: frozen dataclasses, one per statement.

The parser (``kql.parser``) builds these from ``grammar/kql.lark``; the planner
reads them. Nothing here knows about models or images: names are resolved by
the planner against the session (``kql.api.Connection``).

Coordinates and sizes are in pixels (voxels) of the *model's input* (after
resizing), and tuples follow the tensor's spatial axes: ``(height, width)`` /
``(y, x)`` for an image, ``(depth, height, width)`` / ``(z, y, x)`` for a
volume (the time axis of a video clip is its depth), unless a name says
otherwise.

PATCH and STRIDE hold what the query wrote: ``PATCH 8`` is ``(8,)`` (a square
on an image, a cube on a volume), ``PATCH 16x8`` is ``(16, 8)`` and
``PATCH 8x8x8`` is ``(8, 8, 8)``. The planner asks :meth:`Select.patch_for`
for the size on the model's number of spatial axes, which also rejects a
3-D patch on an image and a 2-D patch on a volume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from kql.errors import PlanError


@dataclass(frozen=True)
class Source:
    """Where the image comes from.

    kind: ``"path"`` for a quoted file path, ``"name"`` for an identifier (a
    name bound from Python or by ``LOAD IMAGE``, else a bundled sample image).
    """
    kind: str
    value: str


@dataclass(frozen=True)
class Color:
    """The occlusion patch colour.

    kind: ``"black"``, ``"gray"``, ``"mean"`` (the image's per-channel mean),
    ``"value"`` (one intensity for all channels) or ``"rgb"``.
    value: intensities on the 0-255 pixel scale for ``value``/``rgb`` (on a
    volume: in the scan's units, e.g. -1000 HU), else ``None``.
    """
    kind: str = "gray"
    value: Optional[tuple[float, ...]] = None


@dataclass(frozen=True)
class Label:
    """Which class probability the heatmap shows.

    kind: ``"predicted"`` (the top class of the unoccluded image), ``"index"``
    or ``"name"`` (a class name, matched case-insensitively); for several
    maps from one run, ``"list"`` (value: a tuple of single labels),
    ``"top"`` (value: k, the k most probable classes of the unoccluded
    image) or ``"all"`` (every class).
    """
    kind: str = "predicted"
    value: Union[int, str, None] = None


@dataclass(frozen=True)
class Region:
    """A box of the model input: ``x0 <= x < x1``, ``y0 <= y < y1`` and, on a
    volume, ``z0 <= z < z1`` (pixels / voxels).

    x runs along the width (the last axis), y along the height and z along
    the depth (the first spatial axis; time in a video clip). The query writes
    ``REGION (x0, y0, x1, y1)`` on an image and ``REGION (x0, y0, z0, x1, y1,
    z1)`` on a volume: the first corner, then the corner past the last voxel.

    >>> r = Region(1, 2, 5, 6, z0=0, z1=4)
    >>> r.ndim, r.bounds, r.text()
    (3, ((0, 4), (2, 6), (1, 5)), '(1, 2, 0, 5, 6, 4)')
    >>> Region.from_bounds(((2, 6), (1, 5)))
    Region(x0=1, y0=2, x1=5, y1=6, z0=None, z1=None)
    """
    x0: int
    y0: int
    x1: int
    y1: int
    z0: Optional[int] = None
    z1: Optional[int] = None

    @property
    def ndim(self) -> int:
        """2 for an image region, 3 for a volume region."""
        return 2 if self.z0 is None else 3

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` per spatial axis, in tensor order ((z,) y, x)."""
        yx = ((self.y0, self.y1), (self.x0, self.x1))
        return yx if self.z0 is None else ((self.z0, self.z1), *yx)

    @property
    def shape(self) -> tuple[int, ...]:
        """The box's size per axis, in tensor order."""
        return tuple(b - a for a, b in self.bounds)

    @classmethod
    def from_bounds(cls, bounds: Sequence[tuple[int, int]]) -> "Region":
        """The region of ``(start, stop)`` per axis in tensor order (2 or 3 axes)."""
        bounds = [(int(a), int(b)) for a, b in bounds]
        if len(bounds) == 2:
            (y0, y1), (x0, x1) = bounds
            return cls(x0, y0, x1, y1)
        if len(bounds) == 3:
            (z0, z1), (y0, y1), (x0, x1) = bounds
            return cls(x0, y0, x1, y1, z0=z0, z1=z1)
        raise ValueError(f"a region has 2 or 3 axes, got {len(bounds)}")

    def text(self) -> str:
        """The numbers as REGION writes them."""
        if self.z0 is None:
            return f"({self.x0}, {self.y0}, {self.x1}, {self.y1})"
        return f"({self.x0}, {self.y0}, {self.z0}, {self.x1}, {self.y1}, {self.z1})"


def size_text(size: Sequence[int]) -> str:
    """A size as a query writes it: ``16``, ``16x8``, ``8x8x4``."""
    return "x".join(str(int(v)) for v in size)


def _input_text(ndim: int, input_shape) -> str:
    kind = "images" if ndim == 2 else "volumes"
    shape = "" if input_shape is None else f" ({size_text(input_shape)})"
    return f"{ndim}-D {kind}{shape}"


def expand_size(size: Optional[Sequence[int]], ndim: int, clause: str,
                input_shape: Optional[Sequence[int]] = None) -> Optional[tuple[int, ...]]:
    """A size as written (1, 2 or 3 numbers) on ``ndim`` spatial axes.

    One number stands for every axis; otherwise the count must be ``ndim``.
    ``clause`` names the clause for the message, ``input_shape`` (C, *S) the
    model's input.

    >>> expand_size((8,), 3, "PATCH"), expand_size((16, 8), 2, "PATCH")
    ((8, 8, 8), (16, 8))
    >>> expand_size((8, 8, 8), 2, "PATCH", (3, 224, 224))
    Traceback (most recent call last):
    kql.errors.PlanError: PATCH 8x8x8 is a 3-D patch; the model takes 2-D images (3x224x224)
    """
    if size is None:
        return None
    size = tuple(int(v) for v in size)
    if len(size) == 1:
        return size * ndim
    if len(size) == ndim:
        return size
    raise PlanError(f"{clause} {size_text(size)} is a {len(size)}-D {clause.lower()}; "
                    f"the model takes {_input_text(ndim, input_shape)}")


class _Sized:
    """``patch_for`` / ``stride_for`` of the statements that take PATCH and STRIDE."""

    def patch_for(self, ndim: int, input_shape: Optional[Sequence[int]] = None) -> Optional[tuple[int, ...]]:
        """PATCH on ``ndim`` spatial axes (``PATCH 8`` is a square or a cube).

        Raises:
            PlanError: the query wrote a size with another number of axes.
        """
        return expand_size(self.patch, ndim, "PATCH", input_shape)

    def stride_for(self, ndim: int, input_shape: Optional[Sequence[int]] = None) -> Optional[tuple[int, ...]]:
        """STRIDE on ``ndim`` spatial axes, like :meth:`patch_for`."""
        return expand_size(self.stride, ndim, "STRIDE", input_shape)


@dataclass(frozen=True)
class Approx:
    """``APPROX TAU <t>`` or ``APPROX SSIM <s>``: projective-field thresholding.

    kind: ``"tau"`` (the threshold itself, 0 < t <= 1) or ``"ssim"`` (a quality
    target the optimizer turns into a threshold with a ``TUNE`` calibration).
    """
    kind: str
    value: float


@dataclass(frozen=True)
class Drilldown:
    """``DRILLDOWN [FRACTION <r>] [SPEEDUP <t>]``: adaptive drill-down.

    A first pass at a coarser stride, then the fraction ``r`` of the
    positions with the largest probability drop again at the query's stride;
    the coarse stride follows from the target speedup ``t`` (Krypton eq. 47).
    """
    fraction: float = 0.25
    speedup: float = 3.0


@dataclass(frozen=True)
class Select(_Sized):
    """``SELECT HEATMAP FROM ... USING ... PATCH ... STRIDE ...`` and its clauses.

    ``patch`` and ``stride`` are as written (1, 2 or 3 numbers); read them
    through :meth:`patch_for` / :meth:`stride_for`.
    """
    source: Source
    model: str
    patch: tuple[int, ...]
    stride: tuple[int, ...]
    weights: Optional[str] = None
    color: Color = field(default_factory=Color)
    label: Label = field(default_factory=Label)
    region: Optional[Region] = None
    mode: Optional[str] = None          # "naive" | "exact" | "approx" | None (the optimizer picks the best exact mode)
    approx: Optional[Approx] = None     # with mode "approx"
    drilldown: Optional[Drilldown] = None
    gates: Optional[str] = None         # "exact" | "local" | "frozen" (GATES, with APPROX)
    batch: Optional[int] = None         # None: sized from the memory budget
    device: Optional[str] = None        # "cpu" | "cuda" | None (session setting)
    into: Optional[str] = None          # output .png, .npy, .nii or .nii.gz path
    # Volumes: preprocessing the query states (kql.sources.volumes).
    window: Optional[tuple[float, float]] = None    # WINDOW (lo, hi), the scan's units
    normalize: Optional[str] = None                 # "minmax" | "zscore" | "none"
    resample: Optional[tuple[int, ...]] = None      # RESAMPLE as written, like patch


def label_text(label: Label) -> str:
    """A LABEL clause's value as the query writes it.

    >>> label_text(Label("list", (Label("index", 3), Label("name", "cat"))))
    "3, 'cat'"
    """
    if label.kind == "list":
        return ", ".join(label_text(one) for one in label.value)
    if label.kind == "top":
        return f"TOP {label.value}"
    if label.kind in ("all", "predicted"):
        return label.kind.upper()
    return _quote(label.value) if label.kind == "name" else str(label.value)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def select_text(select: Select, *, source: bool = True, into: bool = True) -> str:
    """A SELECT as canonical KQL text: clauses in one order, keywords upper
    case, every clause the query gave and no other. Parsing the text gives
    the same statement back. Multi-image jobs record it in their manifest and
    key their results on it (without FROM and INTO: a result depends on the
    image, not on how the folder was named).

    >>> from kql.parser import parse
    >>> select_text(parse("select heatmap from 'a.png' using m stride 4 patch 16x8 color black"))
    "SELECT HEATMAP FROM 'a.png' USING m PATCH 16x8 STRIDE 4 COLOR BLACK"
    >>> select_text(parse("select heatmap from x using m patch 8 stride 2 drilldown approx ssim .9"))
    'SELECT HEATMAP FROM x USING m PATCH 8 STRIDE 2 APPROX SSIM 0.9 DRILLDOWN FRACTION 0.25 SPEEDUP 3'
    """
    parts = ["SELECT HEATMAP"]
    if source:
        src = select.source
        parts.append("FROM " + (_quote(src.value) if src.kind == "path" else src.value))
    parts.append(f"USING {select.model}")
    if select.weights is not None:
        parts.append(f"WEIGHTS {_quote(select.weights)}")
    parts.append(f"PATCH {size_text(select.patch)} STRIDE {size_text(select.stride)}")
    c = select.color
    if c != Color():
        if c.kind == "value":
            parts.append(f"COLOR {_num(c.value[0])}")
        elif c.kind == "rgb":
            parts.append("COLOR (" + ", ".join(_num(v) for v in c.value) + ")")
        else:
            parts.append(f"COLOR {c.kind.upper()}")
    if select.window is not None:
        parts.append(f"WINDOW ({_num(select.window[0])}, {_num(select.window[1])})")
    if select.normalize is not None:
        parts.append(f"NORMALIZE {select.normalize.upper()}")
    if select.resample is not None:
        parts.append(f"RESAMPLE {size_text(select.resample)}")
    if select.label != Label():
        parts.append(f"LABEL {label_text(select.label)}")
    if select.region is not None:
        parts.append(f"REGION {select.region.text()}")
    if select.mode == "approx" and select.approx is not None:
        parts.append(f"APPROX {select.approx.kind.upper()} {_num(select.approx.value)}")
    elif select.mode is not None:
        parts.append(select.mode.upper())
    if select.drilldown is not None:
        d = select.drilldown
        parts.append(f"DRILLDOWN FRACTION {_num(d.fraction)} SPEEDUP {_num(d.speedup)}")
    if select.gates is not None:
        parts.append(f"GATES {select.gates.upper()}")
    if select.batch is not None:
        parts.append(f"BATCH {select.batch}")
    if select.device is not None:
        parts.append(f"ON {select.device.upper()}")
    if into and select.into is not None:
        parts.append(f"INTO {_quote(select.into)}")
    return " ".join(parts)


@dataclass(frozen=True)
class Explain:
    """``EXPLAIN [ANALYZE] <select>``."""
    select: Select
    analyze: bool = False


@dataclass(frozen=True)
class Describe(_Sized):
    """``DESCRIBE <model> [WEIGHTS '<file>'] [INPUT <h>x<w>] [PATCH <n> STRIDE <s>]``.

    ``input_size``, ``patch`` and ``stride`` are as written (1, 2 or 3
    numbers; ``INPUT 32`` on a volume model is 32x32x32).
    """
    model: str
    weights: Optional[str] = None
    input_size: Optional[tuple[int, ...]] = None
    patch: Optional[tuple[int, ...]] = None
    stride: Optional[tuple[int, ...]] = None

    def input_size_for(self, ndim: int) -> Optional[tuple[int, ...]]:
        """INPUT on ``ndim`` spatial axes, like :meth:`patch_for`."""
        return expand_size(self.input_size, ndim, "INPUT")


@dataclass(frozen=True)
class ShowModels:
    """``SHOW MODELS``."""


@dataclass(frozen=True)
class ShowImages:
    """``SHOW IMAGES``."""


@dataclass(frozen=True)
class ShowSettings:
    """``SHOW SETTINGS``."""


@dataclass(frozen=True)
class ShowCalibrations:
    """``SHOW CALIBRATIONS``."""


@dataclass(frozen=True)
class Tune(_Sized):
    """``TUNE <model> ON <images> PATCH <n> [STRIDE <s>] [TAUS (t, ...)]``.

    images: a :class:`Source` of kind ``"path"`` (a folder or a glob), or a
    tuple of names (bound, loaded or bundled sample images or volumes).
    window, normalize, resample: a volume's preprocessing, as in :class:`Select`.
    """
    model: str
    images: Union[Source, tuple[str, ...]]
    patch: tuple[int, ...]
    stride: Optional[tuple[int, ...]] = None
    weights: Optional[str] = None
    color: Color = field(default_factory=Color)
    taus: Optional[tuple[float, ...]] = None
    window: Optional[tuple[float, float]] = None
    normalize: Optional[str] = None
    resample: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class LoadImage:
    """``LOAD IMAGE '<file>' AS <name>``."""
    path: str
    name: str


@dataclass(frozen=True)
class LoadModel:
    """``LOAD MODEL '<file>' AS <name> [ARCHITECTURE <arch>] [TRUSTED]``.

    With ``ARCHITECTURE`` the file is a state dict for that torchvision
    architecture, loaded with ``weights_only=True``. Without it the file is a
    whole pickled module, which runs pickled code on load and is therefore
    refused unless ``TRUSTED`` is given.
    """
    path: str
    name: str
    architecture: Optional[str] = None
    trusted: bool = False


@dataclass(frozen=True)
class Set:
    """``SET <option> = <value>``; value is an int, float, bool or str."""
    option: str
    value: Union[int, float, bool, str]


@dataclass(frozen=True)
class Help:
    """``HELP [<topic>]``."""
    topic: Optional[str] = None


Statement = Union[Select, Explain, Describe, ShowModels, ShowImages, ShowSettings,
                  ShowCalibrations, Tune, LoadImage, LoadModel, Set, Help]
