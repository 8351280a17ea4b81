"""The logical plan of a heatmap query.

A :class:`Plan` holds what the binder resolved (image, model, traced graph)
and what the optimizer rules decide (grid of positions, label, mode, batch
size). Its :class:`Step` tree is what EXPLAIN prints: every step knows how to
print its own context lines, and the printer only walks the tree.

The tree for a naive query reads bottom-up::

    Heatmap            pick the label's probability, assemble the grid, save
    └─ Infer           run the CNN over batches of occluded images
       └─ Occlude      the grid of patch positions and the patch colour
          └─ Preprocess  resize and normalise to the model's input
             └─ Scan     where the image comes from
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


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


@dataclass
class Plan:
    """A bound and optimized heatmap query.

    Fields filled by the binder (``planner.binder``): ``query``, ``spec``
    (``kql.sources.ModelSpec``), ``graph`` (``planner.graph.CNNGraph``),
    ``image_desc``, ``original_hw``, ``input`` (normalised model input,
    ``(C, H, W)`` tensor), ``display`` (the resized image), ``settings``.
    Fields decided by the rules: ``region``, ``ys``, ``xs``, ``label``,
    ``label_name``, ``fill``, ``mode``, ``batch_size``, ``device``.
    """
    query: Any
    spec: Any = None
    graph: Any = None
    image_desc: str = ""
    original_hw: tuple[int, int] = (0, 0)
    input: Any = None
    display: Optional[np.ndarray] = None
    settings: Any = None
    region: Any = None
    ys: Optional[np.ndarray] = None
    xs: Optional[np.ndarray] = None
    label: Optional[int] = None
    label_name: Optional[str] = None
    labels: Optional[list] = None  # LABEL a, b, ...: (index or None for PREDICTED, name) of each
    fill: Any = None
    mode: str = "naive"
    batch_size: int = 1
    device: str = "cpu"
    per_position_bytes: int = 0
    cost: Any = None
    warnings: list[str] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    root: Optional[Step] = None
    timings: dict = field(default_factory=dict)
    # exact (incremental) plans only, set by rules/incremental.py, mqo_batches.py, gather_backend.py
    regions: Optional[dict] = None
    order: Optional[np.ndarray] = None
    bounds: Optional[np.ndarray] = None  # batch starts into ``order``, then len(order)
    full_layers: frozenset = frozenset()
    cutoff: Optional[str] = None
    view_bytes: int = 0
    gather_backend: str = "auto"
    layer_backends: dict = field(default_factory=dict)  # layer -> gather kernel
    r_batched: Optional[float] = None
    runtime: Any = None  # planner.runtime.RuntimeEstimate (rules/estimate_runtime.py), computed when read
    # approximate plans (rules/approximate.py): the projective-field threshold,
    # where it came from, and the SSIM its calibration predicts
    tau: Optional[float] = None
    tau_source: str = ""
    predicted_ssim: Optional[float] = None
    cost_exact: Any = None  # SpeedupReport without the threshold (rules/estimate_cost.py)
    # DRILLDOWN (rules/drilldown.py): a planner.drilldown.DrilldownPlan
    drilldown: Any = None

    @property
    def incremental(self) -> bool:
        """Whether the incremental executor runs this plan (exact or approximate)."""
        return self.mode in ("exact", "approx")

    @property
    def input_hw(self) -> tuple[int, int]:
        return tuple(self.input.shape[-2:])

    @property
    def patch(self) -> tuple[int, int]:
        return self.query.patch

    @property
    def stride(self) -> tuple[int, int]:
        return self.query.stride

    @property
    def n_positions(self) -> int:
        return 0 if self.ys is None else len(self.ys) * len(self.xs)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Top-left (y, x) of every position, row-major over the grid."""
        yy, xx = np.meshgrid(self.ys, self.xs, indexing="ij")
        return yy.ravel(), xx.ravel()

    def record(self, rule: str, message: str) -> None:
        self.rewrites.append(Rewrite(rule, message))

    def copy(self) -> "Plan":
        """A copy whose lists and step tree can be changed freely; tensors,
        the model and the graph are shared (rules never mutate them)."""
        new = copy.copy(self)
        new.warnings = list(self.warnings)
        new.rewrites = list(self.rewrites)
        new.root = copy.deepcopy(self.root) if self.root is not None else None
        return new


def format_flops(n: float) -> str:
    """1.55e10 -> '15.5 G' (multiply-adds)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def format_seconds(s: float) -> str:
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
