"""The cost model: FLOPs of full vs incremental inference, and the speedup R.

Krypton (Nakandala & Kumar, SIGMOD 2019) counts a conv layer's multiply-adds
as ``C_in x K_h x K_w x C_out x H_out x W_out`` (eq. 16) and the incremental
cost as the same product over the changed output patch only (eq. 18); the
theoretical speedup is ``R = Q / Q_inc`` summed over layers (eqs. 17, 19, 20).
The workshop version's Algorithm 1 evaluates R over every patch position of
an occlusion sweep for a chain of conv/pool/fc layers. Here it runs over the
DAG traced by :mod:`kql.planner.graph`:

- ``Layer.flops`` (computed once by the tracer, multiply-adds for a full image)
  is spread evenly over the output pixels, so a ``point``/``local``/``merge``
  layer whose changed output region is ``h x w`` of ``H x W`` costs
  ``flops * h*w / (H*W)`` (eq. 18 divided by eq. 16, valid for any layer whose
  work per output pixel is constant, which holds for conv, pooling and
  element-wise ops);
- a ``global`` layer, and any layer whose output is not a feature map, costs
  its full ``flops`` whenever anything before it changed (Algorithm 1 line 39
  for fully-connected layers), and nothing when nothing did.

Two speedups are reported. ``r_grid`` uses each position's exact changed
regions, so positions near the border, whose regions are cut by the image edge,
cost less. ``r_uniform`` is what Krypton's batched executor pays: every position
recomputes, at each layer, the largest region any position needs (eqs. 23-24
with the border shift of eqs. 29-34), because one batch tensor has one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import numpy as np

from kql.errors import PlanError
from kql.planner.geometry import Rects, propagate
from kql.planner.ir import Kind, Layer
from kql.planner.plan import format_flops

__all__ = ["incremental_flops", "LayerCost", "SpeedupReport", "theoretical_speedup"]

# Kinds whose work is proportional to the changed output area.
_AREA_KINDS = (Kind.POINT, Kind.LOCAL, Kind.MERGE, Kind.OUTPUT)


def _scales_with_area(layer: Layer) -> bool:
    return layer.spatial and layer.kind in _AREA_KINDS


def _layer_inc(layer: Layer, r: Rects) -> np.ndarray:
    if layer.flops == 0:
        return np.zeros(len(r))
    if _scales_with_area(layer):
        h, w = layer.out_hw
        return r.area * (float(layer.flops) / (h * w))
    return np.where(r.is_empty, 0.0, float(layer.flops))


def incremental_flops(graph, regions: Mapping[str, Rects]) -> dict[str, np.ndarray]:
    """Multiply-adds each layer needs to recompute its changed region.

    Args:
        graph: a ``CNNGraph``.
        regions: ``{layer name: Rects}`` over N positions, as from
            :func:`kql.planner.geometry.propagate`.

    Returns:
        ``{layer name: float64 array (N,)}`` in ``graph.layers()`` order:
        ``flops * h*w / (H*W)`` for spatial point/local/merge layers (Krypton
        eq. 18), the full ``flops`` for global and non-spatial layers that
        changed, 0 where nothing changed.
    """
    return {layer.name: _layer_inc(layer, regions[layer.name]) for layer in graph.layers()}


@dataclass
class LayerCost:
    """One row of the cost table.

    Attributes:
        name, op, kind: from the layer.
        in_hw: largest changed input region over the positions, ``(h, w)``
            (for several inputs the largest of each side over all of them).
        out_hw: largest changed output region, ``(h, w)``.
        map_hw: the layer's output size ``(H, W)`` (``(1, 1)`` if not spatial).
        full_flops: multiply-adds for a full image.
        inc_flops: mean over positions of the incremental multiply-adds.
        uniform_flops: multiply-adds per position when every position
            recomputes ``out_hw`` (Krypton's uniform batching).
    """
    name: str
    op: str
    kind: str
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    map_hw: tuple[int, int]
    full_flops: float
    inc_flops: float
    uniform_flops: float


@dataclass
class SpeedupReport:
    """Theoretical speedup of incremental over full inference on a grid of patches.

    Attributes:
        full_flops: multiply-adds of one full inference (one image).
        inc_flops: float64 array (N,): incremental multiply-adds per position.
        r_grid: ``N * full_flops / inc_flops.sum()``, exact regions per position.
        r_uniform: ``full_flops / uniform_flops``, every position recomputing the
            largest region of each layer (Krypton eqs. 23-24, 29-34).
        uniform_flops: multiply-adds per position under uniform batching.
        rows: one :class:`LayerCost` per layer, in execution order.
        patch_hw: the patch size.
    """
    full_flops: float
    inc_flops: np.ndarray
    r_grid: float
    r_uniform: float
    uniform_flops: float
    rows: list[LayerCost] = field(default_factory=list)
    patch_hw: tuple[int, int] = (0, 0)

    @property
    def n_positions(self) -> int:
        return len(self.inc_flops)

    @property
    def r_positions(self) -> np.ndarray:
        """Speedup at each position alone (Algorithm 1's ``speedup[i][j]``)."""
        with np.errstate(divide="ignore"):
            return self.full_flops / self.inc_flops

    def table(self, skip_zero: bool = False) -> str:
        """The per-layer cost as aligned text columns.

        Args:
            skip_zero: leave out layers with no FLOPs (input, flatten, ...).
        """
        head = ("layer", "op", "kind", "patch in -> out", "map", "FLOPs full", "inc (mean)", "inc (uniform)")
        body = []
        for r in self.rows:
            if skip_zero and r.full_flops == 0:
                continue
            body.append((r.name, r.op, r.kind,
                         f"{r.in_hw[0]}x{r.in_hw[1]} -> {r.out_hw[0]}x{r.out_hw[1]}",
                         f"{r.map_hw[0]}x{r.map_hw[1]}",
                         _cell(r.full_flops), _cell(r.inc_flops), _cell(r.uniform_flops)))
        mean_inc = float(self.inc_flops.mean()) if self.n_positions else 0.0
        foot = ("total", "", "", "", "", _cell(self.full_flops), _cell(mean_inc),
                _cell(self.uniform_flops))
        ratio = ("speedup R", "", "", "", "", "", f"{self.r_grid:.2f}x", f"{self.r_uniform:.2f}x")
        table = [head] + body + [foot, ratio]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        right = {3, 4, 5, 6, 7}  # numbers align right

        def fmt(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), rule] + [fmt(r) for r in body] + [rule, fmt(foot), fmt(ratio)])

    def __str__(self) -> str:
        return self.table()


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return float("inf") if num > 0 else 1.0


def theoretical_speedup(graph, ys, xs, patch_hw: Union[int, tuple[int, int]],
                        tau: Optional[float] = None, regions: Optional[Mapping] = None) -> SpeedupReport:
    """Speedup of incremental inference for an occlusion sweep (Krypton Algorithm 1, eq. 20).

    Args:
        graph: a traced ``CNNGraph``.
        ys, xs: top-left corners of the N patch positions (ints or int arrays of
            equal length), in input pixels; see :func:`kql.planner.geometry.grid`.
        patch_hw: the patch size ``(h, w)``, or one int for a square patch.
            Patches reaching past the image are clipped to it.
        tau: projective-field threshold (approximate inference), or None
            for exact regions (see :func:`kql.planner.geometry.threshold`).
        regions: the regions :func:`kql.planner.geometry.propagate` gives for
            these positions and ``tau``, when the caller has them already.

    Returns:
        a :class:`SpeedupReport`.

    Example (a 3x3 conv on an 8x8 image, one 2x2 patch in the middle)::

        >>> from kql.planner.ir import Layer, Kind
        >>> class G:  # the two things the cost model reads from a CNNGraph
        ...     input = "x"
        ...     def layers(self):
        ...         return [Layer("x", "input", Kind.INPUT, out_shape=(1, 8, 8)),
        ...                 Layer("c", "conv2d", Kind.LOCAL, inputs=("x",), kernel=(3, 3),
        ...                       padding=((1, 1), (1, 1)), in_shapes=((1, 8, 8),),
        ...                       out_shape=(1, 8, 8), flops=9 * 64)]
        >>> rep = theoretical_speedup(G(), [3], [3], (2, 2))
        >>> rep.inc_flops.tolist(), rep.r_grid    # 4x4 of 8x8 outputs recomputed
        ([144.0], 4.0)
    """
    ys, xs = np.atleast_1d(np.asarray(ys)), np.atleast_1d(np.asarray(xs))
    if ys.shape != xs.shape or ys.ndim != 1:
        raise PlanError(f"patch positions need equal-length 1-D ys and xs, got shapes {ys.shape} and {xs.shape}")
    if len(ys) == 0:
        raise PlanError("no patch positions to estimate the speedup over")
    if not np.issubdtype(ys.dtype, np.integer) or not np.issubdtype(xs.dtype, np.integer):
        raise PlanError(f"patch positions must be integers, got {ys.dtype} and {xs.dtype}")
    ph, pw = (patch_hw, patch_hw) if isinstance(patch_hw, (int, np.integer)) else patch_hw
    if ph < 1 or pw < 1:
        raise PlanError(f"patch {ph}x{pw} must be at least 1x1")

    layers = list(graph.layers())
    if regions is None:
        regions = propagate(graph, Rects.from_patches(ys, xs, (ph, pw)), tau)
    inc = incremental_flops(graph, regions)
    n = len(ys)

    # the largest changed region of each layer's output, in h and w separately:
    # a batch of regions is one tensor, of the largest height and width
    largest = {name: (int(r.h.max()), int(r.w.max())) for name, r in regions.items()}

    rows, full_total, uniform_total = [], 0.0, 0.0
    inc_total = np.zeros(n)
    for layer in layers:
        out_hw = largest[layer.name]
        ins = [largest[i] for i in layer.inputs] or [(ph, pw) if layer.kind == Kind.INPUT else (0, 0)]
        in_hw = (max(h for h, _ in ins), max(w for _, w in ins))
        full = float(layer.flops)
        if _scales_with_area(layer):
            H, W = layer.out_hw
            uniform = full * out_hw[0] * out_hw[1] / (H * W)
        else:
            uniform = full if out_hw[0] * out_hw[1] > 0 else 0.0
        full_total += full
        uniform_total += uniform
        inc_total += inc[layer.name]
        rows.append(LayerCost(layer.name, layer.op, str(layer.kind), in_hw, out_hw, layer.out_hw,
                              full, float(inc[layer.name].mean()), uniform))

    return SpeedupReport(full_flops=full_total, inc_flops=inc_total,
                         r_grid=_ratio(n * full_total, float(inc_total.sum())),
                         r_uniform=_ratio(full_total, uniform_total), uniform_flops=uniform_total,
                         rows=rows, patch_hw=(ph, pw))


def _cell(flops: float) -> str:
    """A FLOPs cell of the cost table: '15.5G'."""
    return format_flops(flops, sep="")
