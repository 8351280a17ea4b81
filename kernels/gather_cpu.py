"""Numba CPU kernels for the input preparation of incremental inference.

Same operations and results as :mod:`kql.kernels.reference` (read its module doc):
:func:`gather` reads ``B`` windows of the shared materialized tensor with each
position's patch superimposed, :func:`paste` makes ``B`` patched full copies.

Design, for a memory-bound copy on a few cores:

* One compiled kernel serves both operations (paste is a gather whose windows
  cover the whole base) and both "no patch" and "patch" (no patch is an empty one),
  so there is a single specialisation to compile and cache.
* ``prange`` over ``(position, channel)`` planes, position-major: each task writes
  one contiguous output plane and consecutive tasks write consecutive planes
  (channel-major was up to 2x slower for small windows, where scattered writes
  of short planes dominate; equal for large ones).
* Each output row is at most five runs -- pad, base, patch, base, pad -- computed
  once per row; each run is a branch-free, contiguous loop over ``x`` on flat
  views with unsigned indices, which LLVM vectorises. No output cell is written
  twice, except for full-width windows (paste), copied as one run then patched.

The wrappers take torch CPU tensors, run the kernel on their numpy views (zero
copy) and return a torch tensor sharing the kernel's output buffer. The kernels
are compiled on first use and cached on disk (``cache=True``), so later processes
pay only a load. Arguments are trusted: :mod:`kql.kernels` validates them first.
Non-contiguous inputs are copied to contiguous ones here (a full copy of the base
each call: keep the materialized tensor contiguous).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange, uint64

# Numba's OpenMP threading layer shares the OpenMP runtime with torch: once a
# parallel kernel has run there, torch's CPU convolutions split their sums
# differently, so one exact query gave other last bits in a process's first run
# than in its later ones, and than in another process (measured: up to 4e-7 on
# an efficientnet_lite0 heatmap at one torch thread). Numba's own thread pool
# leaves torch alone; an explicit NUMBA_THREADING_LAYER is still obeyed.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["gather", "paste", "gather_into", "PARALLEL_MIN_CELLS"]

# Output cells from which the parallel kernel is used (benchmarks/bench_kernels.py --sweep).
PARALLEL_MIN_CELLS = 32768


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def gather_into(base3, win_y0, win_x0, patch4, patch_y0, patch_x0, pad, out4):
    """Kernel: write the gathered windows into ``out4`` (B, C, win_h, win_w).

    All arrays C-contiguous: ``base3`` float32 (C, H, W); ``patch4`` float32
    (B, C, ph, pw), possibly with ``ph * pw == 0`` for "no patch"; positions int64
    (B,); ``pad`` a float32 scalar.
    """
    C, H, W = base3.shape
    B, _, wh, ww = out4.shape
    ph, pw = patch4.shape[2], patch4.shape[3]
    base, patch, out = base3.ravel(), patch4.ravel(), out4.ravel()
    # Everything is written out in the prange body. Moved into inline="always"
    # helpers, it ran up to 1.8x slower on small windows.
    for task in prange(B * C):
        b = task // C
        c = task - b * C
        y0 = win_y0[b]
        x0 = win_x0[b]
        # Rows [ya, yb) and columns [xa, xb) of the window fall inside the base.
        ya = min(max(-y0, 0), wh)
        yb = max(min(H - y0, wh), ya)
        xa = min(max(-x0, 0), ww)
        xb = max(min(W - x0, ww), xa)
        # The patch in window coordinates: origin (pi0, pj0), clipped to [pia, pib) x [pja, pjb).
        pi0 = patch_y0[b] - y0
        pj0 = patch_x0[b] - x0
        pia = min(max(pi0, 0), wh)
        pib = max(min(pi0 + ph, wh), pia)
        pja = min(max(pj0, 0), ww)
        pjb = max(min(pj0 + pw, ww), pja)
        if pja == pjb:
            pib = pia
        plane = (b * C + c) * wh * ww
        pplane = (b * C + c) * ph
        if x0 == 0 and ww == W:
            # Full-width window (always so for paste): its inside rows are one run in
            # both base and out. Copy that run whole, then write the patch over it --
            # far fewer, longer loops than row by row when rows are short (7x7 maps).
            up = uint64(plane)
            for k in range(ya * ww):
                out[up + uint64(k)] = pad
            ub = uint64((c * H + y0 + ya) * W)
            uo = uint64(plane + ya * ww)
            for k in range((yb - ya) * ww):
                out[uo + uint64(k)] = base[ub + uint64(k)]
            for k in range(yb * ww, wh * ww):
                out[up + uint64(k)] = pad
            for i in range(pia, pib):
                o = uint64(plane + i * ww)
                po = (pplane + i - pi0) * pw - pj0
                for j in range(pja, pjb):
                    out[o + uint64(j)] = patch[uint64(po + j)]
        else:
            # Row by row, each row as up to five runs -- pad, base, patch, base, pad --
            # so that no cell is written twice: [0, left_end) and [right_start, ww)
            # around the patch columns, each split at the base's edges [xa, xb).
            for i in range(wh):
                o = uint64(plane + i * ww)
                if i >= pia and i < pib:
                    left_end, right_start = pja, pjb
                    po = (pplane + i - pi0) * pw - pj0
                    for j in range(pja, pjb):
                        out[o + uint64(j)] = patch[uint64(po + j)]
                else:
                    left_end, right_start = ww, ww
                if i >= ya and i < yb:
                    # base index of window column 0; >= 0 wherever it is read
                    bo = (c * H + y0 + i) * W + x0
                    for j in range(min(left_end, xa)):
                        out[o + uint64(j)] = pad
                    for j in range(xa, min(left_end, xb)):
                        out[o + uint64(j)] = base[uint64(bo + j)]
                    for j in range(xb, left_end):
                        out[o + uint64(j)] = pad
                    for j in range(right_start, xa):
                        out[o + uint64(j)] = pad
                    for j in range(max(right_start, xa), xb):
                        out[o + uint64(j)] = base[uint64(bo + j)]
                    for j in range(max(right_start, xb), ww):
                        out[o + uint64(j)] = pad
                else:
                    for j in range(left_end):
                        out[o + uint64(j)] = pad
                    for j in range(right_start, ww):
                        out[o + uint64(j)] = pad


def _np(t, dtype):
    """Contiguous numpy view of a CPU tensor (a copy only if it is not contiguous)."""
    if isinstance(t, torch.Tensor):
        return t.detach().contiguous().numpy().astype(dtype, copy=False)
    return np.ascontiguousarray(t, dtype=dtype)


def gather(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None, patch_x0=None,
           pad_value=0.0, out=None, *, parallel=None):
    """:func:`kql.kernels.reference.gather` on torch CPU tensors, by the Numba kernel.

    Returns ``out`` when given (a contiguous float32 CPU tensor), else a new tensor
    that shares memory with the kernel's numpy output. ``parallel``: use all of
    Numba's threads (True), only the calling thread (False), or all from
    :data:`PARALLEL_MIN_CELLS` output cells on (None).
    """
    C = base.shape[0]
    B = len(win_y0)
    if out is None:
        out_np = np.empty((B, C, win_h, win_w), dtype=np.float32)
        result = torch.from_numpy(out_np)
    else:
        if not out.is_contiguous():  # the kernel writes through a flat view
            raise ValueError("out must be contiguous")
        out_np = out.detach().numpy()
        result = out
    if B == 0:
        return result
    wy, wx = _np(win_y0, np.int64), _np(win_x0, np.int64)
    if patch is None:
        patch_np = np.empty((B, C, 0, 0), dtype=np.float32)
        py = px = np.zeros(B, dtype=np.int64)
    else:
        patch_np = _np(patch, np.float32)
        py, px = _np(patch_y0, np.int64), _np(patch_x0, np.int64)
    if parallel is None:
        parallel = out_np.size >= PARALLEL_MIN_CELLS
    args = (_np(base, np.float32), wy, wx, patch_np, py, px, np.float32(pad_value), out_np)
    threads = numba.get_num_threads()
    if parallel or threads == 1:
        gather_into(*args)
        return result
    # Small output: a team of one thread, so the pool is not woken. (A separate
    # serial @njit kernel was 1.5x slower: Numba compiles a prange body as its own
    # function with non-aliasing arguments, which vectorises better.) The thread
    # count is local to the calling thread.
    numba.set_num_threads(1)
    try:
        gather_into(*args)
    finally:
        numba.set_num_threads(threads)
    return result


def paste(base, patch, patch_y0, patch_x0, out=None, *, parallel=None):
    """:func:`kql.kernels.reference.paste` on torch CPU tensors, by the Numba kernel."""
    _, H, W = base.shape
    zeros = np.zeros(len(patch_y0), dtype=np.int64)
    return gather(base, zeros, zeros, H, W, patch, patch_y0, patch_x0, 0.0, out,
                  parallel=parallel)
