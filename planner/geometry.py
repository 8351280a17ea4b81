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
    """N half-open rectangles ``[y0, y1) x [x0, x1)``, one per patch position.

    Empty rectangles are stored as all zeros, so two empties compare equal
    whatever produced them.

    >>> r = Rects([0, 4], [0, 4], [3, 4], [3, 9])
    >>> r.h.tolist(), r.area.tolist(), r.is_empty.tolist()
    ([3, 0], [9, 0], [False, True])
    >>> r.union(Rects.full(2, 8, 8)) == Rects.full(2, 8, 8)
    True
    """
    __slots__ = ("y0", "x0", "y1", "x1")
    __hash__ = None  # equality compares the arrays

    def __init__(self, y0, x0, y1, x1):
        vals = [np.atleast_1d(_i64(v)) for v in (y0, x0, y1, x1)]
        if len({v.shape for v in vals}) > 1:
            vals = np.broadcast_arrays(*vals)
        y0, x0, y1, x1 = vals
        if y0.ndim != 1:
            raise ValueError(f"Rects holds 1-D arrays over positions, got shape {y0.shape}")
        empty = (y1 <= y0) | (x1 <= x0)
        if empty.any():
            keep = ~empty
            y0, x0, y1, x1 = (v * keep for v in (y0, x0, y1, x1))
        # Read-only views: a Rects is a value, shared freely between layers
        # (a point layer's region *is* its input's), so nobody may edit it in
        # place. The arrays passed in are not copied: do not edit those either.
        for name, v in zip(self.__slots__, (y0, x0, y1, x1)):
            v = v.view()
            v.flags.writeable = False
            setattr(self, name, v)

    # -- constructors -------------------------------------------------------
    @classmethod
    def full(cls, n: int, h: int, w: int) -> "Rects":
        """N copies of the whole ``h x w`` map."""
        z = np.zeros(n, np.int64)
        return cls(z, z, z + h, z + w)

    @classmethod
    def empty(cls, n: int) -> "Rects":
        z = np.zeros(n, np.int64)
        return cls(z, z, z, z)

    @classmethod
    def from_patches(cls, ys, xs, patch_hw: tuple[int, int]) -> "Rects":
        """Patches of size ``patch_hw`` with top-left corners ``(ys, xs)`` (copied)."""
        ys, xs = np.array(ys, dtype=np.int64), np.array(xs, dtype=np.int64)
        return cls(ys, xs, ys + patch_hw[0], xs + patch_hw[1])

    # -- sizes --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.y0)

    @property
    def h(self) -> np.ndarray:
        return self.y1 - self.y0

    @property
    def w(self) -> np.ndarray:
        return self.x1 - self.x0

    @property
    def area(self) -> np.ndarray:
        return self.h * self.w

    @property
    def is_empty(self) -> np.ndarray:
        return (self.y1 <= self.y0) | (self.x1 <= self.x0)

    # -- set operations -----------------------------------------------------
    def union(self, other: "Rects") -> "Rects":
        """Bounding box of both (Krypton eqs. 35-38); an empty side is ignored."""
        # Empties are stored as zeros on both axes, so the per-axis hull
        # ignores an empty side on both axes at once.
        y0, y1 = _hull(self.y0, self.y1, other.y0, other.y1)
        x0, x1 = _hull(self.x0, self.x1, other.x0, other.x1)
        return Rects(y0, x0, y1, x1)

    def intersect(self, other: "Rects") -> "Rects":
        return Rects(np.maximum(self.y0, other.y0), np.maximum(self.x0, other.x0),
                     np.minimum(self.y1, other.y1), np.minimum(self.x1, other.x1))

    def clip(self, h: int, w: int) -> "Rects":
        """Intersection with the map ``[0, h) x [0, w)``."""
        return Rects(np.maximum(self.y0, 0), np.maximum(self.x0, 0),
                     np.minimum(self.y1, h), np.minimum(self.x1, w))

    def shift(self, dy: int, dx: int) -> "Rects":
        return Rects(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def contains(self, other: "Rects") -> np.ndarray:
        """Per position: ``other`` lies inside ``self`` (an empty one always does)."""
        inside = ((self.y0 <= other.y0) & (other.y1 <= self.y1)
                  & (self.x0 <= other.x0) & (other.x1 <= self.x1))
        return inside | other.is_empty

    # -- indexing / comparison ---------------------------------------------
    def __getitem__(self, idx) -> "Rects":
        return Rects(*(np.atleast_1d(v[idx]) for v in (self.y0, self.x0, self.y1, self.x1)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Rects):
            return NotImplemented
        return len(self) == len(other) and all(
            np.array_equal(u, v) for u, v in zip(self.astuple(), other.astuple()))

    def astuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.y0, self.x0, self.y1, self.x1

    def __repr__(self) -> str:
        n = len(self)
        rows = [f"[{self.y0[i]}:{self.y1[i]}, {self.x0[i]}:{self.x1[i]}]" for i in range(min(n, 4))]
        more = ", ..." if n > 4 else ""
        return f"Rects(n={n}: {', '.join(rows)}{more})"


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

def _pad_mode(layer: Layer) -> str:
    return (layer.extra or {}).get("mode", "constant")


def _input_hw(layer: Layer, i: int) -> tuple[int, int]:
    """Spatial size of input i (in any layout, ``Layer.input_hw``); ``(0, 0)``
    when it is not a feature map."""
    if i < len(layer.in_shapes):
        return layer.input_hw(i) or (0, 0)
    return layer.out_hw if layer.spatial else (0, 0)  # unknown: assume same-shaped


def window_extent(layer: Layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((a_h, b_h), (a_w, b_w))``: a local layer computing ``n > 0`` output
    rows reads a window of ``a_h * n + b_h`` input rows (columns alike), i.e.
    ``(n - 1) * s + d * (k - 1) + 1``, padding included. Other layers read
    what they write: ``(1, 0)``."""
    if layer.kind != Kind.LOCAL:
        return (1, 0), (1, 0)
    return tuple((s, d * (k - 1) + 1 - s) for k, s, d in zip(layer.kernel, layer.stride, layer.dilation))


def window_size(layer: Layer, h, w):
    """Read-in window ``(rows, cols)`` for ``h x w`` output rectangles (ints or
    arrays; 0 where the rectangle is empty)."""
    (ah, bh), (aw, bw) = window_extent(layer)
    h, w = np.asarray(h), np.asarray(w)
    return np.where(h > 0, ah * h + bh, 0), np.where(w > 0, aw * w + bw, 0)


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

    A non-spatial output counts as a 1x1 map, so its region is ``[0, 1) x [0, 1)``
    or empty.
    """
    if not in_rects:
        raise ValueError(f"layer {layer.name!r} ({layer.op}) has no input regions to propagate")
    n = len(in_rects[0])
    ho, wo = layer.out_hw
    changed = np.zeros(n, bool)
    for r in in_rects:
        changed |= ~r.is_empty

    if not layer.spatial or layer.kind == Kind.GLOBAL:
        return Rects(0, 0, np.where(changed, ho, 0), np.where(changed, wo, 0))

    if layer.kind == Kind.LOCAL:
        r = in_rects[0]
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.stride, layer.dilation
        (pt, _), (pl, _) = layer.padding
        if layer.op == "pad":
            hi, wi = _input_hw(layer, 0)
            mode = _pad_mode(layer)
            y0, y1 = pad_changed_out(r.y0, r.y1, before=pt, n_in=hi, n_out=ho, mode=mode)
            x0, x1 = pad_changed_out(r.x0, r.x1, before=pl, n_in=wi, n_out=wo, mode=mode)
        else:
            y0, y1 = changed_out(r.y0, r.y1, k=kh, s=sh, p=pt, d=dh, n_out=ho)
            x0, x1 = changed_out(r.x0, r.x1, k=kw, s=sw, p=pl, d=dw, n_out=wo)
        out = Rects(y0, x0, y1, x1)
        # A second tensor input (a computed weight, say) is not windowed: if it
        # changes, every output does.
        other = np.zeros(n, bool)
        for extra in in_rects[1:]:
            other |= ~extra.is_empty
        if other.any():
            out = _whole_where(out, other, ho, wo)
        return out

    # point, merge, output (and input, if asked): pixel-aligned bounding box.
    if len(in_rects) == 1 and _input_hw(layer, 0) == (ho, wo):
        return in_rects[0]          # the common case: ReLU, BatchNorm, ...
    out = Rects.empty(n)
    whole = np.zeros(n, bool)
    for i, r in enumerate(in_rects):
        hi, wi = _input_hw(layer, i)
        if (hi, wi) == (ho, wo):
            out = out.union(r)
        elif hi in (1, ho) and wi in (1, wo):
            if not broadcast_spans:
                continue
            # broadcast along the axes of size 1: a change there spans the axis
            e = r.is_empty
            out = out.union(Rects(np.where(hi == 1, 0, r.y0), np.where(wi == 1, 0, r.x0),
                                  np.where(e, 0, ho if hi == 1 else r.y1),
                                  np.where(e, 0, wo if wi == 1 else r.x1)))
        else:  # not pixel-aligned: safe answer
            whole |= ~r.is_empty
    if whole.any():
        out = _whole_where(out, whole, ho, wo)
    return out.clip(ho, wo)


def _whole_where(r: Rects, mask: np.ndarray, h: int, w: int) -> Rects:
    """``r``, with the whole ``h x w`` map at the positions in ``mask``."""
    return Rects(np.where(mask, 0, r.y0), np.where(mask, 0, r.x0),
                 np.where(mask, h, r.y1), np.where(mask, w, r.x1))


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
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.stride, layer.dilation
    (pt, _), (pl, _) = layer.padding
    if layer.op == "pad":
        hi, wi = _input_hw(layer, 0)
        ho, wo = layer.out_hw
        mode = _pad_mode(layer)
        y0, y1 = pad_read_range(r.y0, r.y1, before=pt, n_in=hi, n_out=ho, mode=mode)
        x0, x1 = pad_read_range(r.x0, r.x1, before=pl, n_in=wi, n_out=wo, mode=mode)
    else:
        y0, y1 = read_range(r.y0, r.y1, k=kh, s=sh, p=pt, d=dh)
        x0, x1 = read_range(r.x0, r.x1, k=kw, s=sw, p=pl, d=dw)
    return Rects(y0, x0, y1, x1)


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
    ho, wo = layer.out_hw
    ch, cw = threshold_size(ho, tau), threshold_size(wo, tau)
    cut_h = np.maximum(r.h - ch, 0)
    cut_w = np.maximum(r.w - cw, 0)
    y0, x0 = r.y0 + cut_h // 2, r.x0 + cut_w // 2
    return Rects(y0, x0, y0 + r.h - cut_h, x0 + r.w - cut_w)


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
            regions[layer.name] = Rects.empty(n)
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


def grid(image_hw: tuple[int, int], patch_hw: tuple[int, int], stride: Union[int, tuple[int, int]]
         ) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the patches of an occlusion sweep over a whole
    image, row-major, laid out as queries lay them out (:func:`grid_positions`).
    Returns flat ``(ys, xs)`` arrays of length ``rows * cols``.

    >>> ys, xs = grid((224, 224), (16, 16), 1)
    >>> len(ys), int(ys.max()), int(xs.max())
    (43681, 208, 208)
    """
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    (h, w), (ph, pw) = image_hw, patch_hw
    if sy < 1 or sx < 1:
        raise ValueError(f"stride {sy}x{sx} must be at least 1")
    if not (0 < ph <= h and 0 < pw <= w):
        raise ValueError(f"patch {ph}x{pw} does not fit image {h}x{w}")
    yy, xx = np.meshgrid(grid_positions(0, h, ph, sy), grid_positions(0, w, pw, sx), indexing="ij")
    return yy.ravel(), xx.ravel()
