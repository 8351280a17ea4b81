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

import math
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
        return r.area * (float(layer.flops) / math.prod(layer.out_hw))
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
            (``(d, h, w)`` on a volume; for several inputs the largest of each
            side over all of them).
        out_hw: largest changed output region, ``(h, w)`` (``(d, h, w)``).
        map_hw: the layer's output size ``(H, W)`` (ones if not spatial).
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
                         f"{_x(r.in_hw)} -> {_x(r.out_hw)}",
                         _x(r.map_hw),
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


def theoretical_speedup(graph, *positions, tau: Optional[float] = None, regions: Optional[Mapping] = None,
                        gates: str = "exact") -> SpeedupReport:
    """Speedup of incremental inference for an occlusion sweep (Krypton Algorithm 1, eq. 20).

    Called ``theoretical_speedup(graph, ys, xs, patch_hw)`` on an image and
    ``theoretical_speedup(graph, zs, ys, xs, (pd, ph, pw))`` on a volume.

    Args:
        graph: a traced ``CNNGraph``.
        positions: the corners of the N patch positions along each spatial
            axis (ints or int arrays of equal length), in input pixels (see
            :func:`kql.planner.geometry.grid`), then the patch size per axis
            (``(h, w)``), or one int for a square patch (a cube).
            Patches reaching past the image are clipped to it.
        tau: projective-field threshold (approximate inference), or None
            for exact regions (see :func:`kql.planner.geometry.threshold`).
        regions: the regions :func:`kql.planner.geometry.propagate` gives for
            these positions and ``tau``, when the caller has them already.
        gates: how global gates are treated (``geometry.GATE_MODES``).

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
    if len(positions) < 3:
        raise PlanError("theoretical_speedup needs the positions along each spatial axis, then the patch size")
    *starts, patch = positions
    starts = [np.atleast_1d(np.asarray(a)) for a in starts]
    nd = len(starts)
    if len({a.shape for a in starts}) > 1 or starts[0].ndim != 1:
        names = ("zs", "ys", "xs")[-nd:]
        raise PlanError(f"patch positions need equal-length 1-D {', '.join(names[:-1])} and {names[-1]}, "
                        f"got shapes {', '.join(str(a.shape) for a in starts[:-1])} and {starts[-1].shape}")
    if len(starts[0]) == 0:
        raise PlanError("no patch positions to estimate the speedup over")
    bad = [str(a.dtype) for a in starts if not np.issubdtype(a.dtype, np.integer)]
    if bad:
        raise PlanError(f"patch positions must be integers, got {' and '.join(str(a.dtype) for a in starts)}")
    patch = (int(patch),) * nd if isinstance(patch, (int, np.integer)) else tuple(patch)
    if len(patch) != nd or any(p < 1 for p in patch):
        raise PlanError(f"patch {_x(patch)} must be at least {_x((1,) * nd)}")

    layers = list(graph.layers())
    if regions is None:
        regions = propagate(graph, Rects.from_patches(*starts, patch), tau, gates)
    inc = incremental_flops(graph, regions)
    n = len(starts[0])

    # the largest changed region of each layer's output, along each axis
    # separately: a batch of regions is one tensor, of the largest size per axis
    largest = {name: tuple(int(m.max()) for m in r.sizes) for name, r in regions.items()}

    rows, full_total, uniform_total = [], 0.0, 0.0
    inc_total = np.zeros(n)
    for layer in layers:
        out_hw = largest[layer.name]
        ins = [largest[i] for i in layer.inputs] or [patch if layer.kind == Kind.INPUT else (0,) * nd]
        in_hw = tuple(max(sizes[a] for sizes in ins) for a in range(nd))
        full = float(layer.flops)
        if _scales_with_area(layer):
            uniform = full * math.prod(out_hw) / math.prod(layer.out_hw)
        else:
            uniform = full if math.prod(out_hw) > 0 else 0.0
        full_total += full
        uniform_total += uniform
        inc_total += inc[layer.name]
        rows.append(LayerCost(layer.name, layer.op, str(layer.kind), in_hw, out_hw, layer.out_hw,
                              full, float(inc[layer.name].mean()), uniform))

    return SpeedupReport(full_flops=full_total, inc_flops=inc_total,
                         r_grid=_ratio(n * full_total, float(inc_total.sum())),
                         r_uniform=_ratio(full_total, uniform_total), uniform_flops=uniform_total,
                         rows=rows, patch_hw=patch)


def _x(sizes) -> str:
    """``(16, 16)`` -> '16x16' (any number of axes)."""
    return "x".join(map(str, sizes))


def _cell(flops: float) -> str:
    """A FLOPs cell of the cost table: '15.5G'."""
    return format_flops(flops, sep="")
