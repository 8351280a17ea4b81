"""Patch geometry: which outputs an occlusion patch changes, and what they read.

(Just over 600 lines on purpose: the per-axis formulas, ``Rects`` and
``propagate`` are one body of rules, checked together against brute force in
``tests/test_geometry.py``; the gate rules live in ``planner/gates.py``.)

Every function here is pure and vectorised with numpy: a coordinate argument
is an ``int`` or an ``int64`` array over N patch positions, and the layer
parameters are scalars. Ranges and rectangles are half-open, ``[a, b)``, in
the coordinates of the tensor they describe (pixel 0 is the first real pixel,
padding sits at negative indices and at ``>= n``).

Krypton (Nakandala & Kumar, SIGMOD 2019, eqs. 21-34) gives the output patch of
a conv/pool as an *upper bound*: eq. 23 over-counts by one when stride equals
kernel (their Fig. 4 a/b) and at the image border (Fig. 4 c/d), and the
equations ignore dilation, ceil_mode and asymmetric padding. Here the ranges
are derived exactly from the definition of a window and checked against brute
force in ``tests/test_geometry.py``:

- output ``o`` of a window layer reads input taps ``o*s - p + d*j`` for
  ``j = 0 .. k-1`` (``p`` = padding *before*);
- it changes when some tap lands in the changed input range ``[a, b)``.

With ``d == 1`` the taps are contiguous and the returned range is exactly the
set of outputs that read the change. With dilation that set may have holes;
the returned range is its bounding range (still exact at both ends).

>>> changed_out(5, 9, k=3, s=1, p=1, d=1, n_out=16)   # 3x3/s1/p1: grows by 1 each side
(4, 10)
>>> changed_out(3, 6, k=3, s=3, p=0, d=1, n_out=5)    # Krypton Fig. 4 (a): 1 output, eq. 23 says 2
(1, 2)
>>> read_range(4, 10, k=3, s=1, p=1, d=1)
(3, 11)
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from kql.planner.gates import GATE_MODES, gate_sources
from kql.planner.ir import Kind, Layer

IntOrArray = Union[int, np.ndarray]

__all__ = [
    "changed_out", "read_range", "pad_changed_out", "pad_read_range",
    "Rects", "out_region", "read_region", "propagate", "threshold", "threshold_size", "grid",
]


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def _ret(*arrays: np.ndarray):
    """Plain ints for scalar arguments (readable doctests), arrays otherwise."""
    return tuple(int(a) if a.ndim == 0 else a for a in arrays)


def _ceil_div(a: np.ndarray, s: int) -> np.ndarray:
    return -((-a) // s)


# ---------------------------------------------------------------------------
# 1-D maps
# ---------------------------------------------------------------------------

def changed_out(a: IntOrArray, b: IntOrArray, *, k: int, s: int, p: int, d: int = 1,
                n_out: int) -> tuple[IntOrArray, IntOrArray]:
    """Outputs of a window layer that read a changed input range.

    Args:
        a, b: the changed input range ``[a, b)`` (ints or int64 arrays).
        k, s, p, d: kernel, stride, padding before the first pixel, dilation.
        n_out: output length (take it from the layer's output shape, so
            ceil_mode and asymmetric padding need no special case).

    Returns:
        ``(o0, o1)``: the output range ``[o0, o1)`` clipped to ``[0, n_out)``;
        ``(0, 0)`` where nothing changes (``a >= b`` or the change is only
        read by windows that do not exist).
    """
    a, b = _i64(a), _i64(b)
    if d == 1:
        # Replaces Krypton eqs. 21-24. Output o's window is [o*s-p, o*s-p+k):
        # it reaches a when o >= ceil((a+p-k+1)/s) (eq. 21, exact) and starts at
        # or before b-1 when o <= floor((b-1+p)/s). The window starts o*s lie in
        # an interval of length W_p + k - 1, which holds ceil((W_p+k-1)/s) or one
        # fewer multiples of s depending on where the patch sits; eq. 23 always
        # takes the ceil (their Fig. 4 a/b), and clipping to n_out replaces the
        # border shift of eqs. 29-34 (Fig. 4 c/d).
        o0 = np.maximum(_ceil_div(a + p - k + 1, s), 0)
        o1 = np.minimum((b - 1 + p) // s + 1, n_out)
        empty = (o1 <= o0) | (b <= a)
    else:
        # Dilated: tap j alone changes outputs [ceil((a+p-d*j)/s), floor((b-1+p-d*j)/s)];
        # the bounding range is the min/max over the taps that hit any output.
        o0 = np.full(np.broadcast(a, b).shape, np.iinfo(np.int64).max, dtype=np.int64)
        o1 = np.full_like(o0, np.iinfo(np.int64).min)
        for j in range(k):
            lo = np.maximum(_ceil_div(a + p - d * j, s), 0)
            hi = np.minimum((b - 1 + p - d * j) // s, n_out - 1)
            hit = lo <= hi
            o0 = np.where(hit, np.minimum(o0, lo), o0)
            o1 = np.where(hit, np.maximum(o1, hi + 1), o1)
        empty = o1 <= o0
    zero = np.zeros_like(o0)
    return _ret(np.where(empty, zero, o0), np.where(empty, zero, o1))


def read_range(o0: IntOrArray, o1: IntOrArray, *, k: int, s: int, p: int,
               d: int = 1) -> tuple[IntOrArray, IntOrArray]:
    """Input range a window layer reads to recompute outputs ``[o0, o1)``.

    Exact form of Krypton eqs. 25-28 with dilation: ``[o0*s - p,
    (o1-1)*s - p + d*(k-1) + 1)``. Not clipped: the range may reach into the
    padding (negative, or past the input with ceil_mode). ``(0, 0)`` for an
    empty output range.
    """
    o0, o1 = _i64(o0), _i64(o1)
    r0 = o0 * s - p
    r1 = (o1 - 1) * s - p + d * (k - 1) + 1
    empty = o1 <= o0
    zero = np.zeros_like(r0)
    return _ret(np.where(empty, zero, r0), np.where(empty, zero, r1))


# Explicit padding (F.pad) maps output index o to input index i piecewise:
# a left segment [0, before), the copy [before, before + n_in) and a right
# segment [before + n_in, n_out). Each piece is affine, i = alpha*o + beta with
# alpha in {-1, 0, 1}, or reads nothing (constant padding).

def _pad_pieces(before: int, n_in: int, n_out: int, mode: str):
    mid = (before, before + n_in, 1, -before)
    if mode == "constant":
        return [mid]
    right0 = before + n_in
    if mode == "replicate":
        left, right = (0, before, 0, 0), (right0, n_out, 0, n_in - 1)
    elif mode == "reflect":
        # left: i = before - o; right: i = 2(n-1) - (o - before)
        left, right = (0, before, -1, before), (right0, n_out, -1, 2 * (n_in - 1) + before)
    elif mode == "circular":
        left, right = (0, before, 1, n_in - before), (right0, n_out, 1, -before - n_in)
    else:
        raise ValueError(f"unknown padding mode {mode!r}: expected constant, reflect, replicate or circular")
    return [left, mid, right]


def _hull(r0, r1, c0, c1):
    """Bounding range of two ranges, an empty one ignored."""
    e, f = r1 <= r0, c1 <= c0
    lo, hi = np.minimum(r0, c0), np.maximum(r1, c1)
    if e.any() or f.any():
        lo = np.where(e, c0, np.where(f, r0, lo))
        hi = np.where(e, c1, np.where(f, r1, hi))
    return lo, hi


def pad_changed_out(a: IntOrArray, b: IntOrArray, *, before: int, n_in: int, n_out: int,
                    mode: str = "constant") -> tuple[IntOrArray, IntOrArray]:
    """Outputs of an explicit pad (``F.pad``) that copy a changed input range.

    Constant padding shifts the range by ``before`` (negative pads crop);
    reflect/replicate/circular padding also copy border pixels into the
    padding, and the result is the bounding range of all copies. Clipped to
    ``[0, n_out)``; ``(0, 0)`` when nothing changes.

    >>> pad_changed_out(0, 2, before=2, n_in=8, n_out=12, mode="reflect")
    (1, 4)
    """
    a, b = _i64(a), _i64(b)
    shape = np.broadcast(a, b).shape
    o0, o1 = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for lo, hi, alpha, beta in _pad_pieces(before, n_in, n_out, mode):
        lo, hi = max(lo, 0), min(hi, n_out)
        if alpha == 1:
            c0, c1 = a - beta, b - beta
        elif alpha == -1:          # i = beta - o in [a, b)  <=>  o in [beta-b+1, beta-a+1)
            c0, c1 = beta - b + 1, beta - a + 1
        else:                      # every o in the piece copies pixel beta
            hit = (a <= beta) & (beta < b)
            c0, c1 = np.where(hit, lo, 0), np.where(hit, hi, 0)
        c0, c1 = np.maximum(c0, lo), np.minimum(c1, hi)
        o0, o1 = _hull(o0, o1, c0, c1)
    empty = (o1 <= o0) | (b <= a)
    zero = np.zeros_like(o0)
    return _ret(np.where(empty, zero, o0), np.where(empty, zero, o1))


def pad_read_range(o0: IntOrArray, o1: IntOrArray, *, before: int, n_in: int, n_out: int,
                   mode: str = "constant") -> tuple[IntOrArray, IntOrArray]:
    """Input range an explicit pad reads to produce outputs ``[o0, o1)``.

    Constant mode: the outputs shifted back by ``before``, not clipped (the
    part outside the input is padding), like :func:`read_range`. Other modes:
    the bounding range of the pixels copied, inside ``[0, n_in)``.
    """
    o0, o1 = _i64(o0), _i64(o1)
    if mode == "constant":
        empty = o1 <= o0
        zero = np.zeros_like(o0)
        return _ret(np.where(empty, zero, o0 - before), np.where(empty, zero, o1 - before))
    r0, r1 = np.zeros_like(o0), np.zeros_like(o0)
    for lo, hi, alpha, beta in _pad_pieces(before, n_in, n_out, mode):
        q0, q1 = np.maximum(o0, lo), np.minimum(o1, hi)
        if alpha == 1:
            c0, c1 = q0 + beta, q1 + beta
        elif alpha == -1:
            c0, c1 = beta - q1 + 1, beta - q0 + 1
        else:
            c0, c1 = np.full_like(q0, beta), np.full_like(q0, beta + 1)
        keep = q0 < q1
        r0, r1 = _hull(r0, r1, np.where(keep, c0, 0), np.where(keep, c1, 0))
    empty = r1 <= r0
    zero = np.zeros_like(r0)
    return _ret(np.where(empty, zero, r0), np.where(empty, zero, r1))


# ---------------------------------------------------------------------------
# Rectangles over N positions
# ---------------------------------------------------------------------------

class Rects:
    """N half-open boxes, one per patch position: rectangles ``[y0, y1) x [x0, x1)``
    on images, boxes ``[z0, z1) x [y0, y1) x [x0, x1)`` on volumes.

    Built from the starts of every axis, then the stops: ``Rects(y0, x0, y1,
    x1)``, ``Rects(z0, y0, x0, z1, y1, x1)``. ``lo`` and ``hi`` hold them per
    axis (``ndim`` of each); ``y0``/``x0``/``y1``/``x1`` (``h``, ``w``) are the
    last two axes (rows and columns) whatever the rank, ``z0``/``z1`` (``d``)
    the depth of a volume. Every per-axis formula of this module applies to
    each axis alone, so nothing else depends on the rank.

    Empty boxes are stored as all zeros, so two empties compare equal
    whatever produced them.

    >>> r = Rects([0, 4], [0, 4], [3, 4], [3, 9])
    >>> r.h.tolist(), r.area.tolist(), r.is_empty.tolist()
    ([3, 0], [9, 0], [False, True])
    >>> r.union(Rects.full(2, 8, 8)) == Rects.full(2, 8, 8)
    True
    >>> v = Rects(0, 1, 2, 4, 3, 5)        # a 4x2x3 box in a volume
    >>> v.ndim, v.sizes, v.area.tolist()
    (3, (array([4]), array([2]), array([3])), [24])
    """
    __slots__ = ("lo", "hi")
    __hash__ = None  # equality compares the arrays

    def __init__(self, *coords):
        if len(coords) < 2 or len(coords) % 2:
            raise ValueError(f"Rects takes the starts of every axis, then the stops: an even number "
                             f"of arrays, got {len(coords)}")
        vals = [np.atleast_1d(_i64(v)) for v in coords]
        if len({v.shape for v in vals}) > 1:
            vals = np.broadcast_arrays(*vals)
        if vals[0].ndim != 1:
            raise ValueError(f"Rects holds 1-D arrays over positions, got shape {vals[0].shape}")
        k = len(vals) // 2
        empty = vals[k] <= vals[0]
        for a in range(1, k):
            empty = empty | (vals[k + a] <= vals[a])
        if empty.any():
            keep = ~empty
            vals = [v * keep for v in vals]
        # Read-only views: a Rects is a value, shared freely between layers
        # (a point layer's region *is* its input's), so nobody may edit it in
        # place. The arrays passed in are not copied: do not edit those either.
        out = []
        for v in vals:
            v = v.view()
            v.flags.writeable = False
            out.append(v)
        self.lo = tuple(out[:k])
        self.hi = tuple(out[k:])

    @classmethod
    def box(cls, lo, hi) -> "Rects":
        """From per-axis sequences of starts and stops."""
        return cls(*lo, *hi)

    # -- constructors -------------------------------------------------------
    @classmethod
    def full(cls, n: int, *shape: int) -> "Rects":
        """N copies of the whole map of ``shape`` (``h, w`` or ``d, h, w``)."""
        z = np.zeros(n, np.int64)
        return cls(*(z,) * len(shape), *(z + s for s in shape))

    @classmethod
    def empty(cls, n: int, ndim: int = 2) -> "Rects":
        z = np.zeros(n, np.int64)
        return cls(*(z,) * (2 * ndim))

    @classmethod
    def from_patches(cls, *args) -> "Rects":
        """Patches of size ``patch`` with corners ``starts`` (copied):
        ``from_patches(ys, xs, (ph, pw))`` or ``from_patches(zs, ys, xs, (pd, ph, pw))``."""
        *starts, patch = args
        if len(patch) != len(starts):
            raise ValueError(f"patch {tuple(patch)} has {len(patch)} axes, the positions {len(starts)}")
        starts = [np.array(v, dtype=np.int64) for v in starts]
        return cls(*starts, *(v + p for v, p in zip(starts, patch)))

    # -- sizes --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lo[0])

    @property
    def ndim(self) -> int:
        return len(self.lo)

    @property
    def y0(self) -> np.ndarray:
        return self.lo[-2]

    @property
    def x0(self) -> np.ndarray:
        return self.lo[-1]

    @property
    def y1(self) -> np.ndarray:
        return self.hi[-2]

    @property
    def x1(self) -> np.ndarray:
        return self.hi[-1]

    @property
    def z0(self) -> np.ndarray:
        return self.lo[-3]

    @property
    def z1(self) -> np.ndarray:
        return self.hi[-3]

    @property
    def sizes(self) -> tuple[np.ndarray, ...]:
        """Extent along every axis."""
        return tuple(b - a for a, b in zip(self.lo, self.hi))

    def size(self, axis: int) -> np.ndarray:
        return self.hi[axis] - self.lo[axis]

    @property
    def d(self) -> np.ndarray:
        return self.hi[-3] - self.lo[-3]

    @property
    def h(self) -> np.ndarray:
        return self.hi[-2] - self.lo[-2]

    @property
    def w(self) -> np.ndarray:
        return self.hi[-1] - self.lo[-1]

    @property
    def area(self) -> np.ndarray:
        """Cells in each box (the area of a rectangle, the volume of a box)."""
        out = self.hi[0] - self.lo[0]
        for a in range(1, len(self.lo)):
            out = out * (self.hi[a] - self.lo[a])
        return out

    @property
    def is_empty(self) -> np.ndarray:
        empty = self.hi[0] <= self.lo[0]
        for a in range(1, len(self.lo)):
            empty = empty | (self.hi[a] <= self.lo[a])
        return empty

    # -- set operations -----------------------------------------------------
    def union(self, other: "Rects") -> "Rects":
        """Bounding box of both (Krypton eqs. 35-38); an empty side is ignored."""
        # Empties are stored as zeros on every axis, so the per-axis hull
        # ignores an empty side on all axes at once.
        hulls = [_hull(a0, a1, b0, b1) for a0, a1, b0, b1 in zip(self.lo, self.hi, other.lo, other.hi)]
        return Rects(*(lo for lo, _ in hulls), *(hi for _, hi in hulls))

    def intersect(self, other: "Rects") -> "Rects":
        return Rects(*(np.maximum(a, b) for a, b in zip(self.lo, other.lo)),
                     *(np.minimum(a, b) for a, b in zip(self.hi, other.hi)))

    def clip(self, *shape: int) -> "Rects":
        """Intersection with the map ``[0, h) x [0, w)`` (``d, h, w`` for a volume)."""
        return Rects(*(np.maximum(a, 0) for a in self.lo), *(np.minimum(b, n) for b, n in zip(self.hi, shape)))

    def shift(self, *delta: int) -> "Rects":
        return Rects(*(a + t for a, t in zip(self.lo, delta)), *(b + t for b, t in zip(self.hi, delta)))

    def contains(self, other: "Rects") -> np.ndarray:
        """Per position: ``other`` lies inside ``self`` (an empty one always does)."""
        inside = np.ones(len(self), bool)
        for a0, a1, b0, b1 in zip(self.lo, self.hi, other.lo, other.hi):
            inside &= (a0 <= b0) & (b1 <= a1)
        return inside | other.is_empty

    # -- indexing / comparison ---------------------------------------------
    def __getitem__(self, idx) -> "Rects":
        return Rects(*(np.atleast_1d(v[idx]) for v in self.astuple()))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Rects):
            return NotImplemented
        return len(self) == len(other) and self.ndim == other.ndim and all(
            np.array_equal(u, v) for u, v in zip(self.astuple(), other.astuple()))

    def astuple(self) -> tuple[np.ndarray, ...]:
        """The starts of every axis, then the stops (``y0, x0, y1, x1`` on images)."""
        return self.lo + self.hi

    def __repr__(self) -> str:
        n = len(self)
        rows = ["[" + ", ".join(f"{a[i]}:{b[i]}" for a, b in zip(self.lo, self.hi)) + "]"
                for i in range(min(n, 4))]
        more = ", ..." if n > 4 else ""
        return f"Rects(n={n}: {', '.join(rows)}{more})"


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

def _pad_mode(layer: Layer) -> str:
    return (layer.extra or {}).get("mode", "constant")


def _input_hw(layer: Layer, i: int) -> tuple[int, ...]:
    """Spatial size of input i (in any layout, ``Layer.input_hw``); all zeros
    when it is not a feature map."""
    if i < len(layer.in_shapes):
        return layer.input_hw(i) or (0,) * layer.ndim
    return layer.out_hw if layer.spatial else (0,) * layer.ndim  # unknown: assume same-shaped


def window_extent(layer: Layer) -> tuple[tuple[int, int], ...]:
    """``((a_h, b_h), (a_w, b_w))`` (one pair per spatial axis): a local layer
    computing ``n > 0`` output rows reads a window of ``a_h * n + b_h`` input
    rows (columns alike), i.e. ``(n - 1) * s + d * (k - 1) + 1``, padding
    included. Other layers read what they write: ``(1, 0)``."""
    if layer.kind != Kind.LOCAL:
        return ((1, 0),) * layer.ndim
    return tuple((s, d * (k - 1) + 1 - s) for k, s, d in zip(layer.kernel, layer.stride, layer.dilation))


def window_size(layer: Layer, *sizes):
    """Read-in window per axis (``(rows, cols)``, or ``(depth, rows, cols)``)
    for output boxes of these sizes (ints or arrays; 0 where the box is empty)."""
    out = []
    for (a, b), n in zip(window_extent(layer), sizes):
        n = np.asarray(n)
        out.append(np.where(n > 0, a * n + b, 0))
    return tuple(out)


def out_region(layer: Layer, in_rects: Sequence[Rects], broadcast_spans: bool = True) -> Rects:
    """Changed region of ``layer``'s output, given the changed region of each input.

    By kind:

    - ``point`` / ``merge`` / ``output``: the bounding box of the inputs'
      regions (Krypton eqs. 35-38). An input of size 1 along an axis the output
      is larger in is broadcast (the 1x1 squeeze-and-excitation gate): when it
      changes at all, the change spans that whole axis. An input that lines up
      with the output in neither way changes the whole output when it changes;
      an input that does not change contributes nothing. With
      ``broadcast_spans=False`` (approximate gates, :data:`GATE_MODES`
      ``local``) a broadcast input's change is applied only inside the
      region the other inputs changed, so it contributes nothing itself.
    - ``local``: conv and pooling by :func:`changed_out` per axis (output size
      from ``layer.out_shape``, so ceil_mode needs nothing special); explicit
      padding (``op == "pad"``, mode in ``layer.extra["mode"]``, default
      constant) by :func:`pad_changed_out`.
    - ``global``, and any layer whose output is not a feature map: the whole
      output wherever some input changed.

    A non-spatial output counts as a map of size 1 on every axis, so its region
    is ``[0, 1)`` on each or empty. Every axis is independent: a volume's
    layers (``layer.ndim`` 3) take the same formulas along depth.
    """
    if not in_rects:
        raise ValueError(f"layer {layer.name!r} ({layer.op}) has no input regions to propagate")
    n = len(in_rects[0])
    out_size = layer.out_hw
    nd = len(out_size)
    changed = np.zeros(n, bool)
    for r in in_rects:
        changed |= ~r.is_empty

    if not layer.spatial or layer.kind == Kind.GLOBAL:
        return Rects(*(0,) * nd, *(np.where(changed, m, 0) for m in out_size))

    if layer.kind == Kind.LOCAL:
        r = in_rects[0]
        spans = []
        if layer.op == "pad":
            in_size = _input_hw(layer, 0)
            mode = _pad_mode(layer)
            for a in range(nd):
                spans.append(pad_changed_out(r.lo[a], r.hi[a], before=layer.padding[a][0], n_in=in_size[a],
                                             n_out=out_size[a], mode=mode))
        else:
            for a in range(nd):
                spans.append(changed_out(r.lo[a], r.hi[a], k=layer.kernel[a], s=layer.stride[a],
                                         p=layer.padding[a][0], d=layer.dilation[a], n_out=out_size[a]))
        out = Rects(*(lo for lo, _ in spans), *(hi for _, hi in spans))
        # A second tensor input (a computed weight, say) is not windowed: if it
        # changes, every output does.
        other = np.zeros(n, bool)
        for extra in in_rects[1:]:
            other |= ~extra.is_empty
        if other.any():
            out = _whole_where(out, other, out_size)
        return out

    # point, merge, output (and input, if asked): pixel-aligned bounding box.
    if len(in_rects) == 1 and _input_hw(layer, 0) == out_size:
        return in_rects[0]          # the common case: ReLU, BatchNorm, ...
    out = Rects.empty(n, nd)
    whole = np.zeros(n, bool)
    for i, r in enumerate(in_rects):
        in_size = _input_hw(layer, i)
        if in_size == out_size:
            out = out.union(r)
        elif all(m in (1, o) for m, o in zip(in_size, out_size)):
            if not broadcast_spans:
                continue
            # broadcast along the axes of size 1: a change there spans the axis
            e = r.is_empty
            out = out.union(Rects(*(np.where(m == 1, 0, lo) for m, lo in zip(in_size, r.lo)),
                                  *(np.where(e, 0, o if m == 1 else hi)
                                    for m, o, hi in zip(in_size, out_size, r.hi))))
        else:  # not pixel-aligned: safe answer
            whole |= ~r.is_empty
    if whole.any():
        out = _whole_where(out, whole, out_size)
    return out.clip(*out_size)


def _whole_where(r: Rects, mask: np.ndarray, shape) -> Rects:
    """``r``, with the whole map of ``shape`` at the positions in ``mask``."""
    return Rects(*(np.where(mask, 0, a) for a in r.lo), *(np.where(mask, m, b) for m, b in zip(shape, r.hi)))


def read_region(layer: Layer, out_rects: Rects) -> Rects:
    """Input region a ``local`` layer reads to recompute ``out_rects``.

    Unclipped input coordinates (Krypton eqs. 25-28, exact): the rectangle
    may reach into the padding, or past the input with ceil_mode. For
    reflect/replicate/circular ``pad`` layers it is the bounding box of the
    pixels copied, inside the input.
    """
    if layer.kind != Kind.LOCAL:
        raise ValueError(f"read_region needs a local layer, {layer.name!r} is {layer.kind} ({layer.op})")
    r = out_rects
    spans = []
    if layer.op == "pad":
        in_size, out_size = _input_hw(layer, 0), layer.out_hw
        mode = _pad_mode(layer)
        for a in range(r.ndim):
            spans.append(pad_read_range(r.lo[a], r.hi[a], before=layer.padding[a][0], n_in=in_size[a],
                                        n_out=out_size[a], mode=mode))
    else:
        for a in range(r.ndim):
            spans.append(read_range(r.lo[a], r.hi[a], k=layer.kernel[a], s=layer.stride[a],
                                    p=layer.padding[a][0], d=layer.dilation[a]))
    return Rects(*(lo for lo, _ in spans), *(hi for _, hi in spans))


def _name(x) -> str:
    return x if isinstance(x, str) else x.name


def threshold_size(n: int, tau: float) -> int:
    """Largest region side a layer with ``n`` outputs along an axis keeps
    under projective-field threshold ``tau``: ``round(tau * n)`` (halves
    round up), at least 1 (Krypton eqs. 40-41).

    >>> threshold_size(14, 0.5), threshold_size(7, 0.5), threshold_size(3, 0.1)
    (7, 4, 1)
    """
    return max(1, int(np.floor(tau * n + 0.5)))


def threshold(layer: Layer, r: Rects, tau: float) -> Rects:
    """``r`` capped to :func:`threshold_size` per axis, keeping the centre.

    Projective-field thresholding (Krypton eqs. 39-45): a region wider than
    the cap keeps its central ``cap`` columns (the cut is split in half, an
    odd one more from the end), which is the same as shrinking the input
    patch to what produces the capped output and moving its origin by half
    the cut. Everything outside the capped region is then taken from the
    materialized view, as if the occlusion had not reached it.

    Only the region shrinks, so everything downstream (the cost model, MQO
    batching and the executor) follows from it. A region that is narrower
    than the cap is the exact changed region of the (approximated) input, so
    recomputing any larger rectangle around it, as a batch does, reproduces
    the view there: the result does not depend on how positions are batched.

    >>> from kql.planner.ir import Layer, Kind
    >>> conv = Layer("c", "conv2d", Kind.LOCAL, out_shape=(1, 10, 10))
    >>> threshold(conv, Rects(2, 0, 9, 4), 0.4)   # cap 4: 7 rows -> rows 3..6
    Rects(n=1: [3:7, 0:4])
    """
    starts, stops = [], []
    for m, a, b in zip(layer.out_hw, r.lo, r.hi):  # each axis alone (depth too, on a volume)
        cut = np.maximum(b - a - threshold_size(m, tau), 0)
        starts.append(a + cut // 2)
        stops.append(a + cut // 2 + (b - a) - cut)
    return Rects(*starts, *stops)


def thresholded(layer: Layer) -> bool:
    """Layers whose regions projective-field thresholding caps: the windowed
    ones that make the region grow (conv and pooling, not explicit padding)."""
    return layer.kind == Kind.LOCAL and layer.spatial and layer.op != "pad"


def propagate(graph, patch_rects: Rects, tau: Optional[float] = None,
              gates: str = "exact") -> dict[str, Rects]:
    """Changed region of every layer's output, for each of N patch positions.

    Args:
        graph: a ``CNNGraph`` (``graph.layers()`` in execution order,
            ``graph.input`` the input layer or its name).
        patch_rects: the occlusion patches in image pixels; they are clipped
            to the image, so a patch hanging over the border is fine.
        tau: projective-field threshold in (0, 1]: every conv and pooling
            layer's region is capped at ``round(tau * size)`` per axis
            (:func:`threshold`). ``None`` (or 1) gives the exact regions.
        gates: how global gates are treated (:data:`GATE_MODES`): ``exact``,
            or, approximately, ``local`` (a gate's change stays inside the
            region the patch changed) or ``frozen`` (a gate never changes).

    Returns:
        ``{layer name: Rects}`` in ``graph.layers()`` order. A layer that
        reads no changed tensor (a constant) gets empty regions.
    """
    if gates not in GATE_MODES:
        raise ValueError(f"gates must be one of {', '.join(GATE_MODES)}, got {gates!r}")
    input_name = _name(graph.input)
    n = len(patch_rects)
    frozen = gate_sources(graph) if gates == "frozen" else frozenset()
    regions: dict[str, Rects] = {}
    for layer in graph.layers():
        if layer.name == input_name or layer.kind == Kind.INPUT:
            regions[layer.name] = patch_rects.clip(*layer.out_hw)
        elif not layer.inputs or layer.name in frozen:
            regions[layer.name] = Rects.empty(n, patch_rects.ndim)
        else:
            missing = [i for i in layer.inputs if i not in regions]
            if missing:
                raise ValueError(f"layer {layer.name!r} reads {', '.join(map(repr, missing))}, "
                                 f"which graph.layers() does not list before it")
            r = out_region(layer, [regions[i] for i in layer.inputs], broadcast_spans=gates == "exact")
            if tau is not None and tau < 1 and thresholded(layer):
                r = threshold(layer, r, tau)
            regions[layer.name] = r
    return regions


def grid_positions(start: int, stop: int, patch: int, stride: int) -> np.ndarray:
    """Top-left coordinates along one axis of a region ``[start, stop)``.

    Positions step by ``stride`` from ``start``; when the last step does not
    land exactly on ``stop - patch`` one more position is added there, so the
    last rows and columns of the region are never left unexplained (the
    paper's eq. 1 floors them away). That last step is then shorter than the
    stride.

    >>> grid_positions(0, 10, 4, 3).tolist()
    [0, 3, 6]
    >>> grid_positions(0, 11, 4, 3).tolist()
    [0, 3, 6, 7]
    """
    ps = list(range(start, stop - patch + 1, stride))
    if ps[-1] != stop - patch:
        ps.append(stop - patch)
    return np.asarray(ps, dtype=np.int64)


def grid(image_hw: tuple[int, ...], patch_hw: tuple[int, ...], stride: Union[int, tuple[int, ...]]
         ) -> tuple[np.ndarray, ...]:
    """Corners of the patches of an occlusion sweep over a whole image (or
    volume: ``(d, h, w)`` sizes), row-major, laid out as queries lay them out
    (:func:`grid_positions`). Returns one flat array per axis (``(ys, xs)``
    on an image), each of length the number of positions.

    >>> ys, xs = grid((224, 224), (16, 16), 1)
    >>> len(ys), int(ys.max()), int(xs.max())
    (43681, 208, 208)
    >>> [a.tolist() for a in grid((4, 6, 6), (2, 3, 3), (2, 3, 3))]
    [[0, 0, 0, 0, 2, 2, 2, 2], [0, 0, 3, 3, 0, 0, 3, 3], [0, 3, 0, 3, 0, 3, 0, 3]]
    """
    n = len(image_hw)
    strides = (stride,) * n if np.isscalar(stride) else tuple(stride)
    if len(patch_hw) != n or len(strides) != n:
        raise ValueError(f"patch {tuple(patch_hw)} and stride {strides} need {n} axes like {tuple(image_hw)}")
    if any(s < 1 for s in strides):
        raise ValueError(f"stride {'x'.join(map(str, strides))} must be at least 1")
    if not all(0 < p <= m for p, m in zip(patch_hw, image_hw)):
        raise ValueError(f"patch {'x'.join(map(str, patch_hw))} does not fit image {'x'.join(map(str, image_hw))}")
    axes = [grid_positions(0, m, p, s) for m, p, s in zip(image_hw, patch_hw, strides)]
    return tuple(a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
