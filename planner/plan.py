"""The plan of a heatmap query: what the binder resolved and, in typed
records, what each optimizer rule decided.

A :class:`Plan` holds the bound query (image, model, traced graph, input
tensor) and one record per decision:

============================  ============================  ======================
record                        decided by                    read by
============================  ============================  ======================
:class:`Grid`                 ``rules/resolve_region.py``   executors, cost, EXPLAIN
:class:`LabelChoice`          ``rules/resolve_label.py``    reference inference
``mode``                      ``rules/choose_mode.py``      ``execute``
:class:`Approximation`        ``rules/approximate.py``      incremental rule, executor
:class:`SsimContract`         ``rules/approximate.py``      refinement executor, EXPLAIN
:class:`IncrementalSchedule`  ``rules/incremental.py``,     incremental executor
                              ``mqo_batches.py``,
                              ``gather_backend.py``
``batch_size``                ``rules/batch_size.py``       executors
:class:`Estimates`            ``rules/estimate_cost.py``    EXPLAIN
``drilldown``                 ``planner/drilldown.py``      drill-down executor
``runtime``                   ``rules/estimate_runtime.py`` EXPLAIN
============================  ============================  ======================

EXPLAIN renders its tree from these records (``planner.explain.plan_tree``);
a :class:`Step` is one node of that rendering. The tree for a naive query
reads bottom-up::

    Heatmap            pick the label's probability, assemble the grid, save
    └─ Infer           run the CNN over batches of occluded images
       └─ Occlude      the grid of patch positions and the patch colour
          └─ Preprocess  resize and normalise to the model's input
             └─ Scan     where the image comes from
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

import numpy as np

if TYPE_CHECKING:  # the types of the records' fields; the plan itself imports none of them
    import torch

    from kql.ast import Color, Label, Region, Select
    from kql.planner.candidates import Candidate
    from kql.planner.cost import SpeedupReport
    from kql.planner.drilldown import DrilldownPlan
    from kql.planner.geometry import Rects
    from kql.planner.graph import CNNGraph
    from kql.planner.refine import RefinePolicy
    from kql.planner.runtime import RuntimeEstimate


@dataclass
class Step:
    """One node of the plan tree.

    Attributes:
        op: the step's name as EXPLAIN prints it (``Scan``, ``Infer`` ...).
        details: ``(key, value)`` pairs printed after the name, in order.
        children: input steps.
        flops: estimated multiply-adds of the step (None when negligible).
        seconds: measured time, filled in by EXPLAIN ANALYZE.
    """
    op: str
    details: list[tuple[str, str]] = field(default_factory=list)
    children: list["Step"] = field(default_factory=list)
    flops: Optional[float] = None
    seconds: Optional[float] = None

    def detail(self, key: str, value: Any) -> "Step":
        """Set (or replace) one detail and return self, for chaining."""
        self.details = [(k, v) for k, v in self.details if k != key] + [(key, str(value))]
        return self

    def find(self, op: str) -> Optional["Step"]:
        """The first step named ``op`` in this subtree (pre-order)."""
        if self.op == op:
            return self
        for child in self.children:
            hit = child.find(op)
            if hit is not None:
                return hit
        return None

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def lines(self) -> list[str]:
        """The step's own context line (without tree decoration)."""
        parts = [f"{k}: {v}" if k else v for k, v in self.details]
        text = self.op + (f"  {' · '.join(parts)}" if parts else "")
        if self.flops is not None:
            text += f" · est. {format_flops(self.flops)} FLOPs"
        if self.seconds is not None:
            text += f" · actual {format_seconds(self.seconds)}"
        return [text]


@dataclass
class Rewrite:
    """A record of one optimizer rule's decision (shown by EXPLAIN)."""
    rule: str
    message: str


class ModelSpecLike(Protocol):
    """What the planner reads of a model and asks of it (``kql.sources.ModelSpec``
    is the front end's implementation; the planner never imports it)."""
    name: str
    module: "torch.nn.Module"
    weights: str
    warning: Optional[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: Optional[list[str]]
    num_classes: Optional[int]

    def preprocess(self, image: np.ndarray) -> tuple["torch.Tensor", np.ndarray]: ...

    def fill_value(self, color: "Color", display_image: np.ndarray) -> "torch.Tensor": ...

    def resolve_label(self, label: "Label") -> tuple[Optional[int], Optional[str]]: ...


class SettingsLike(Protocol):
    """The session settings the rules read (``kql.settings.Settings`` is the
    front end's implementation)."""
    device: str
    mode: str
    batch_size: int
    memory_limit: int
    gather_backend: str
    allocator: str


@dataclass(frozen=True, init=False)
class Grid:
    """The positions of the patch (``rules/resolve_region.py``).

    ``Grid(region, ys, xs)`` on an image, ``Grid(region, zs, ys, xs)`` on a
    volume: one array of starts per spatial axis.

    Attributes:
        region: the occluded crop of the model input.
        starts: per spatial axis, the first index of each grid step along it
            (``(ys, xs)``: top-left row of each grid row and left column of
            each grid column), in model-input pixels (voxels), the last aligned
            to the region's edge.
        bounds: per spatial axis, the region's ``(start, stop)``.
    """
    region: "Region"
    starts: tuple
    bounds: tuple

    def __init__(self, region, *starts, bounds=None):
        object.__setattr__(self, "region", region)
        object.__setattr__(self, "starts", tuple(np.asarray(a, dtype=np.int64) for a in starts))
        if bounds is None:
            bounds = ((region.y0, region.y1), (region.x0, region.x1)) if len(starts) == 2 and region is not None \
                else tuple((int(a[0]), int(a[-1]) + 1) for a in self.starts)
        object.__setattr__(self, "bounds", tuple(bounds))

    @property
    def ndim(self) -> int:
        return len(self.starts)

    @property
    def ys(self) -> np.ndarray:
        return self.starts[-2]

    @property
    def xs(self) -> np.ndarray:
        return self.starts[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Positions along each axis: the heatmap's shape (``(rows, cols)``, or ``(nd, nh, nw)``)."""
        return tuple(len(a) for a in self.starts)

    @property
    def n_positions(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class LabelChoice:
    """The class the heatmap is for (``rules/resolve_label.py``): ``index``
    None is ``LABEL PREDICTED``, resolved by the reference inference.

    Several maps from one run: ``several`` is ``"list"`` (``LABEL a, b,
    ...``: ``listed`` holds each one's choice, ``index``/``name`` the first's),
    ``"top"`` (``LABEL TOP k``, ``top`` = k) or ``"all"``; the classes of TOP
    and PREDICTED are known only once the unoccluded input has run
    (:meth:`classes`).
    """
    index: Optional[int] = None
    name: Optional[str] = None
    several: Optional[str] = None
    listed: tuple["LabelChoice", ...] = ()
    top: Optional[int] = None

    def classes(self, scores) -> Optional[list[int]]:
        """The class of every map, given the unoccluded input's ``scores``
        (a 1-D tensor, one per model output), or None for one label. The
        executor calls it after the reference inference.

        >>> import torch
        >>> LabelChoice(several="top", top=2).classes(torch.tensor([0.1, 0.6, 0.3]))
        [1, 2]
        >>> LabelChoice(3, several="list", listed=(LabelChoice(3), LabelChoice())).classes(torch.tensor([.2, .5, 0, .3]))
        [3, 1]

        Raises:
            kql.ExecutionError: TOP k or a listed class beyond the model's outputs.
        """
        from kql.errors import ExecutionError
        K = scores.shape[0]
        if self.several is None:
            return None
        if self.several == "all":
            return list(range(K))
        if self.several == "top":
            if self.top > K:
                raise ExecutionError(f"LABEL TOP {self.top}: the model has {K} outputs")
            import torch
            return torch.argsort(scores, descending=True, stable=True)[:self.top].tolist()
        out: list[int] = []
        for one in self.listed:
            index = int(scores.argmax()) if one.index is None else one.index
            if index >= K:
                raise ExecutionError(f"label {index} is out of range: the model has {K} outputs (0-{K - 1})")
            if index not in out:
                out.append(index)
        return out


@dataclass(frozen=True)
class Approximation:
    """An approximate plan's projective-field threshold and gates (``rules/approximate.py``).

    Attributes:
        tau: the threshold, in (0, 1), or None (exact regions, approximate gates).
        source: where it came from (``APPROX TAU 0.4``, or the SSIM target
            and the calibration that gave it).
        predicted_ssim: the SSIM vs exact the calibration predicts, if any.
    """
    tau: Optional[float]
    source: str
    predicted_ssim: Optional[float] = None
    gates: str = "exact"  # geometry.GATE_MODES: how global (SE) gates are treated


@dataclass(frozen=True)
class SsimContract:
    """``APPROX SSIM s`` with a calibration: the plans considered and the one
    that runs (``rules/approximate.py``, ``planner/candidates.py``).

    Attributes:
        target: the SSIM ``s`` the query asks for.
        candidates: every plan considered (``planner.candidates.Candidate``),
            with its predicted SSIM and cost; exactly one is ``chosen``.
        refine: when adaptive refinement was chosen, its policy
            (``planner.refine.RefinePolicy``): the executor asks it what to
            compute and when to stop.
    """
    target: float
    candidates: tuple["Candidate", ...]
    refine: Optional["RefinePolicy"] = None

    @property
    def chosen(self) -> "Candidate":
        return next(c for c in self.candidates if c.chosen)


@dataclass(frozen=True)
class IncrementalSchedule:
    """Everything the incremental executor runs by, decided once for the grid.

    Attributes:
        regions: layer -> the changed region of every position
            (``rules/incremental.py``; capped by τ in approximate plans).
        order: the order positions are batched in (MQO).
        full_layers: the layers from the IVM cutoff on, run in full.
        cutoff: the first of them, or None when the cut is at a global layer.
        view_bytes: the materialized views of the unoccluded image.
        bounds: batch starts into ``order``, then ``len(order)``
            (``rules/mqo_batches.py``).
        layer_backends: layer -> its gather kernel (``rules/gather_backend.py``).
        gather_backend: the kernel most layers use, or the forced one.
    """
    regions: dict[str, "Rects"]
    order: np.ndarray
    full_layers: frozenset = frozenset()
    cutoff: Optional[str] = None
    view_bytes: int = 0
    bounds: Optional[np.ndarray] = None
    layer_backends: dict[str, str] = field(default_factory=dict)
    gather_backend: str = "auto"


@dataclass(frozen=True)
class Estimates:
    """What the cost model says of the plan (``rules/estimate_cost.py``).

    Attributes:
        cost: the theoretical speedup report over the grid (regions capped
            by τ in approximate plans).
        infer_flops: multiply-adds of the occlusion stage as planned (naive:
            every position in full; incremental: with its batches and cutoff).
        r_batched: incremental plans: naive FLOPs over ``infer_flops``.
        cost_exact: approximate plans: the report without the threshold.
    """
    cost: "SpeedupReport"
    infer_flops: float
    r_batched: Optional[float] = None
    cost_exact: Optional["SpeedupReport"] = None


@dataclass
class Plan:
    """A bound and optimized heatmap query.

    Bound by ``planner.binder``: ``query``, ``spec`` (the model: a
    ``kql.sources.ModelSpec``), ``graph``, ``image_desc``, ``original_hw``,
    ``input`` (normalised model input, ``(C, H, W)``), ``display`` (the
    resized image), ``fill`` (the patch colour per channel, or the tensor
    API's baseline) and ``fill_text``, ``device``,
    ``allocator`` and ``settings``. Decided by the rules: the records in the
    module docstring's table, ``mode``, ``batch_size`` and
    ``per_position_bytes``; each rule also says why in ``rewrites``.
    """
    query: "Select"
    spec: Optional[ModelSpecLike] = None
    graph: Optional["CNNGraph"] = None
    image_desc: str = ""
    original_hw: tuple[int, int] = (0, 0)
    input: Optional["torch.Tensor"] = None
    display: Optional[np.ndarray] = None
    settings: Optional[SettingsLike] = None
    fill: Union["torch.Tensor", Callable, None] = None
    fill_text: str = ""                   # what the patch holds, for EXPLAIN, when not the query's COLOR
    device: str = "cpu"
    allocator: str = "reuse"              # SET allocator: 'reuse' keeps freed memory while the plan runs
    # decisions of the rules
    grid: Optional[Grid] = None
    label_choice: LabelChoice = LabelChoice()
    mode: str = "naive"
    approximation: Optional[Approximation] = None
    contract: Optional[SsimContract] = None
    schedule: Optional[IncrementalSchedule] = None
    batch_size: int = 1
    per_position_bytes: int = 0
    estimates: Optional[Estimates] = None
    drilldown: Optional["DrilldownPlan"] = None
    runtime: Optional["RuntimeEstimate"] = None
    warnings: list[str] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def incremental(self) -> bool:
        """Whether the incremental executor runs this plan (exact or approximate)."""
        return self.mode in ("exact", "approx")

    @property
    def ndim(self) -> int:
        """Spatial axes of the model input: 2 (an image) or 3 (a volume)."""
        return self.input.dim() - 1 if self.input is not None else 2

    @property
    def input_hw(self) -> tuple[int, ...]:
        """Spatial size of the model input: ``(H, W)``, or ``(D, H, W)`` for a volume."""
        return tuple(self.input.shape[1:])

    @property
    def patch(self) -> tuple[int, ...]:
        """The patch per spatial axis (``(ph, pw)``, or ``(pd, ph, pw)``)."""
        return axes_of(self.query, "patch", self.ndim, self.input)

    @property
    def stride(self) -> tuple[int, ...]:
        return axes_of(self.query, "stride", self.ndim, self.input)

    # -- the records' fields, read where they are used ------------------------
    @property
    def region(self) -> Optional["Region"]:
        return None if self.grid is None else self.grid.region

    @property
    def ys(self) -> Optional[np.ndarray]:
        return None if self.grid is None else self.grid.ys

    @property
    def xs(self) -> Optional[np.ndarray]:
        return None if self.grid is None else self.grid.xs

    @property
    def n_positions(self) -> int:
        return 0 if self.grid is None else self.grid.n_positions

    @property
    def label(self) -> Optional[int]:
        return self.label_choice.index

    @property
    def label_name(self) -> Optional[str]:
        return self.label_choice.name

    @property
    def tau(self) -> Optional[float]:
        """The projective-field threshold of an approximate plan, else None."""
        return None if self.approximation is None else self.approximation.tau

    @property
    def predicted_ssim(self) -> Optional[float]:
        """The SSIM vs exact predicted for the plan that runs: the τ plan's, or
        the contract's chosen approximate plan's (None: exact, or no prediction)."""
        if self.approximation is not None:
            return self.approximation.predicted_ssim
        if self.contract is not None and self.contract.chosen.name != "exact":
            return self.contract.chosen.predicted_ssim
        return None

    @property
    def candidates(self) -> Optional[tuple]:
        """The plans ``APPROX SSIM`` considered, else None."""
        return None if self.contract is None else self.contract.candidates

    @property
    def refine(self) -> Optional["RefinePolicy"]:
        """Adaptive refinement's policy when it runs, else None."""
        return None if self.contract is None else self.contract.refine

    @property
    def gates(self) -> str:
        """How global gates are treated (``geometry.GATE_MODES``)."""
        return "exact" if self.approximation is None else self.approximation.gates

    @property
    def regions(self) -> Optional[dict]:
        return None if self.schedule is None else self.schedule.regions

    @property
    def order(self) -> Optional[np.ndarray]:
        return None if self.schedule is None else self.schedule.order

    @property
    def bounds(self) -> Optional[np.ndarray]:
        return None if self.schedule is None else self.schedule.bounds

    @property
    def full_layers(self) -> frozenset:
        return frozenset() if self.schedule is None else self.schedule.full_layers

    @property
    def cutoff(self) -> Optional[str]:
        return None if self.schedule is None else self.schedule.cutoff

    @property
    def layer_backends(self) -> dict:
        return {} if self.schedule is None else self.schedule.layer_backends

    @property
    def gather_backend(self) -> str:
        return "auto" if self.schedule is None else self.schedule.gather_backend

    @property
    def cost(self) -> Optional["SpeedupReport"]:
        return None if self.estimates is None else self.estimates.cost

    @property
    def r_batched(self) -> Optional[float]:
        return None if self.estimates is None else self.estimates.r_batched

    def positions(self) -> tuple[np.ndarray, ...]:
        """Top-left (y, x) of every position, row-major over the grid
        (``(z, y, x)`` on a volume)."""
        return tuple(a.ravel() for a in np.meshgrid(*self.grid.starts, indexing="ij"))

    def batches(self) -> tuple[np.ndarray, np.ndarray]:
        """``(order, bounds)``: the positions in the order they run and the
        batch bounds into it (starts, then ``len(order)``); row-major batches
        of ``batch_size`` for a plan without an MQO partition."""
        order = self.order if self.order is not None else np.arange(self.n_positions)
        return order, batch_bounds(len(order), self.bounds if self.bounds is not None else self.batch_size)

    def record(self, rule: str, message: str) -> None:
        self.rewrites.append(Rewrite(rule, message))

    def copy(self) -> "Plan":
        """A copy whose lists can be changed freely; the records are
        immutable (rules replace them), and tensors, the model and the graph
        are shared (rules never mutate them)."""
        new = copy.copy(self)
        new.warnings = list(self.warnings)
        new.rewrites = list(self.rewrites)
        return new


def axes_of(query, what: str, ndim: int, x=None) -> tuple[int, ...]:
    """The query's ``patch`` or ``stride`` with one entry per spatial axis:
    ``Select.patch_for(ndim)`` / ``stride_for(ndim)`` (a 1-tuple is a square or
    cube), raising ``PlanError`` on a rank mismatch (naming the input ``x``'s
    shape)."""
    expand = getattr(query, f"{what}_for", None)
    if expand is not None:
        return tuple(expand(ndim, None if x is None else tuple(x.shape)))
    value = tuple(getattr(query, what))
    if len(value) == 1:
        return value * ndim
    if len(value) != ndim:
        from kql.errors import PlanError
        kind = {2: "an image", 3: "a volume"}.get(ndim, f"{ndim} axes")
        raise PlanError(f"{what.upper()} {'x'.join(map(str, value))} has {len(value)} axes; the model takes "
                        f"{kind}")
    return value


def batch_bounds(n: int, batch) -> np.ndarray:
    """Batch bounds as an array: starts, then ``n``. ``batch`` is a size or
    already such an array.

    >>> batch_bounds(5, 2).tolist()
    [0, 2, 4, 5]
    """
    if np.ndim(batch) == 0:
        return np.append(np.arange(0, n, max(1, int(batch))), n).astype(np.int64)
    return np.asarray(batch, dtype=np.int64)


def format_flops(n: float, sep: str = " ", unit: str = "") -> str:
    """Multiply-adds for people, the one FLOP formatter: an SI suffix after
    ``sep``, or always in ``unit`` ('G': EXPLAIN's per-position figures).

    >>> format_flops(1.55e10), format_flops(1150, sep=""), format_flops(0), format_flops(5.49e4, unit="G")
    ('15.5 G', '1.15K', '0', '5.49e-05 GFLOPs')
    """
    if unit:
        return f"{n / _SI[unit]:.3g} {unit}FLOPs"
    for suffix, scale in _SI.items():
        if abs(n) >= scale:
            return f"{n / scale:.3g}{sep}{suffix}"
    return f"{n:.3g}" if n else "0"


_SI = {"T": 1e12, "G": 1e9, "M": 1e6, "K": 1e3}


def format_seconds(s: float) -> str:
    """Seconds for people, the one seconds formatter.

    >>> format_seconds(116.4), format_seconds(12.3), format_seconds(0.25)
    ('1 min 56 s', '12.30 s', '250.0 ms')
    """
    if s >= 60:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
