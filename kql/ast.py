"""The KQL abstract syntax tree: frozen dataclasses, one per statement.

The parser (``kql.parser``) builds these from ``grammar/kql.lark``; the planner
reads them. Nothing here knows about models or images: names are resolved by
the planner against the session (``kql.api.Connection``).

Coordinates and sizes are in pixels of the *model's input* (after resizing),
and pairs are ``(height, width)`` / ``(y, x)`` unless a name says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


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
    value: intensities on the 0-255 pixel scale for ``value``/``rgb``, else ``None``.
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
    """A crop of the model input, ``x0 <= x < x1``, ``y0 <= y < y1`` (pixels)."""
    x0: int
    y0: int
    x1: int
    y1: int


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
class Select:
    """``SELECT HEATMAP FROM ... USING ... PATCH ... STRIDE ...`` and its clauses."""
    source: Source
    model: str
    patch: tuple[int, int]
    stride: tuple[int, int]
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
    into: Optional[str] = None          # output .png or .npy path


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


def _size(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


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
    parts.append(f"PATCH {_size(select.patch)} STRIDE {_size(select.stride)}")
    c = select.color
    if c != Color():
        if c.kind == "value":
            parts.append(f"COLOR {_num(c.value[0])}")
        elif c.kind == "rgb":
            parts.append("COLOR (" + ", ".join(_num(v) for v in c.value) + ")")
        else:
            parts.append(f"COLOR {c.kind.upper()}")
    if select.label != Label():
        parts.append(f"LABEL {label_text(select.label)}")
    if select.region is not None:
        r = select.region
        parts.append(f"REGION ({r.x0}, {r.y0}, {r.x1}, {r.y1})")
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
class Describe:
    """``DESCRIBE <model> [WEIGHTS '<file>'] [INPUT <h>x<w>] [PATCH <n> STRIDE <s>]``."""
    model: str
    weights: Optional[str] = None
    input_size: Optional[tuple[int, int]] = None
    patch: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None


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
class Tune:
    """``TUNE <model> ON <images> PATCH <n> [STRIDE <s>] [TAUS (t, ...)]``.

    images: a :class:`Source` of kind ``"path"`` (a folder or a glob), or a
    tuple of names (bound, loaded or bundled sample images).
    """
    model: str
    images: Union[Source, tuple[str, ...]]
    patch: tuple[int, int]
    stride: Optional[tuple[int, int]] = None
    weights: Optional[str] = None
    color: Color = field(default_factory=Color)
    taus: Optional[tuple[float, ...]] = None


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
