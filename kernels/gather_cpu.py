"""Numba CPU kernels for the input preparation of incremental inference.

Same operations and results as :mod:`kql.kernels.reference` (read its module doc):
:func:`gather` reads ``B`` windows of the shared materialized tensor with each
position's patch superimposed, :func:`paste` makes ``B`` patched full copies.

Design, for a memory-bound copy on a few cores:

* One compiled kernel serves both operations (paste is a gather whose windows
  cover the whole base) and both "no patch" and "patch" (no patch is an empty one),
  so there is a single specialisation to compile and cache.
* One kernel for images and volumes: an image is a volume of depth 1 (zero-copy
  views), so 2-D and 3-D share every line and every measurement.
* ``prange`` over ``(position, channel, depth)`` planes, position-major: each task
  writes one contiguous output plane and consecutive tasks write consecutive planes
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
from numba import int64, njit, prange, uint64

# Numba's OpenMP threading layer shares the OpenMP runtime with torch: once a
# parallel kernel has run there, torch's CPU convolutions split their sums
# differently, so one exact query gave other last bits in a process's first run
# than in its later ones, and than in another process (measured: up to 4e-7 on
# an efficientnet_lite0 heatmap at one torch thread). Numba's own thread pool
# leaves torch alone; an explicit NUMBA_THREADING_LAYER is still obeyed.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["gather", "paste", "gather_nd", "paste_nd", "gather_into", "PARALLEL_MIN_CELLS"]

# Output cells from which the parallel kernel is used (benchmarks/bench_kernels.py --sweep).
PARALLEL_MIN_CELLS = 32768


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def gather_into(base4, win_z0, win_y0, win_x0, patch5, patch_z0, patch_y0, patch_x0, pad, out5):
    """Kernel: write the gathered windows into ``out5`` (B, C, win_d, win_h, win_w).

    All arrays C-contiguous: ``base4`` float32 (C, D, H, W); ``patch5`` float32
    (B, C, pd, ph, pw), possibly with no cells for "no patch"; positions int64
    (B,); ``pad`` a float32 scalar. Images are volumes of depth 1 (every start
    along depth 0), so one kernel serves both.
    """
    C, D, H, W = base4.shape
    B, _, wd, wh, ww = out5.shape
    pd, ph, pw = patch5.shape[2], patch5.shape[3], patch5.shape[4]
    base, patch, out = base4.ravel(), patch5.ravel(), out5.ravel()
    # Everything is written out in the prange body. Moved into inline="always"
    # helpers, it ran up to 1.8x slower on small windows.
    for task in prange(B * C * wd):
        # one (position, channel, depth) slice: a contiguous (wh, ww) plane of out
        bc = int64(task)
        k = 0
        if wd > 1:  # (saves a division per plane on images, whose planes can be 7x7)
            bc = bc // wd
            k = task - bc * wd
        b = bc // C
        c = bc - b * C
        z = win_z0[b] + k
        y0 = win_y0[b]
        x0 = win_x0[b]
        # Rows [ya, yb) and columns [xa, xb) of the window fall inside the base
        # (no rows where the slice's depth z lies outside it).
        ya = min(max(-y0, 0), wh)
        yb = max(min(H - y0, wh), ya)
        if z < 0 or z >= D:
            yb = ya
        xa = min(max(-x0, 0), ww)
        xb = max(min(W - x0, ww), xa)
        # The patch in window coordinates: origin (pi0, pj0), clipped to [pia, pib) x [pja, pjb);
        # none where the slice misses the patch's depth range.
        pk = z - patch_z0[b]
        pi0 = patch_y0[b] - y0
        pj0 = patch_x0[b] - x0
        pia = min(max(pi0, 0), wh)
        pib = max(min(pi0 + ph, wh), pia)
        pja = min(max(pj0, 0), ww)
        pjb = max(min(pj0 + pw, ww), pja)
        if pja == pjb or pk < 0 or pk >= pd:
            pib = pia
        plane = task * wh * ww
        pplane = ((b * C + c) * pd + pk) * ph
        bplane = (c * D + z) * H
        if x0 == 0 and ww == W:
            # Full-width window (always so for paste): its inside rows are one run in
            # both base and out. Copy that run whole, then write the patch over it --
            # far fewer, longer loops than row by row when rows are short (7x7 maps).
            up = uint64(plane)
            for m in range(ya * ww):
                out[up + uint64(m)] = pad
            if yb > ya:
                ub = uint64((bplane + y0 + ya) * W)
                uo = uint64(plane + ya * ww)
                for m in range((yb - ya) * ww):
                    out[uo + uint64(m)] = base[ub + uint64(m)]
            for m in range(yb * ww, wh * ww):
                out[up + uint64(m)] = pad
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
                    bo = (bplane + y0 + i) * W + x0
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
    return gather_nd(base, (win_y0, win_x0), (win_h, win_w), patch,
                     None if patch is None else (patch_y0, patch_x0), pad_value, out,
                     parallel=parallel)


def gather_nd(base, starts, sizes, patch=None, patch_starts=None, pad_value=0.0, out=None, *,
              parallel=None):
    """:func:`kql.kernels.reference.gather_nd` for 2 or 3 spatial axes, by the Numba kernel
    :func:`gather_into` (an image is a volume of depth 1). As :func:`gather`."""
    C = base.shape[0]
    B = len(starts[0])
    if out is None:
        out_np = np.empty((B, C, *sizes), dtype=np.float32)
        result = torch.from_numpy(out_np)
    else:
        if not out.is_contiguous():  # the kernel writes through a flat view
            raise ValueError("out must be contiguous")
        out_np = out.detach().numpy()
        result = out
    if B == 0:
        return result
    base_np = _np(base, np.float32)
    starts = [_np(s, np.int64) for s in starts]
    if patch is None:
        patch_np = np.empty((B, C, 0, 0, 0), dtype=np.float32)
        ps = [np.zeros(B, dtype=np.int64)] * 3
    else:
        patch_np = _np(patch, np.float32)
        ps = [_np(p, np.int64) for p in patch_starts]
    if parallel is None:
        parallel = out_np.size >= PARALLEL_MIN_CELLS
    if len(sizes) == 2:  # an image is a volume of depth 1: zero-copy views, depth starts 0
        zeros = np.zeros(B, dtype=np.int64)
        base_np, starts, out_np = base_np[:, None], [zeros, *starts], out_np[:, :, None]
        if patch is not None:
            patch_np, ps = patch_np[:, :, None], [zeros, *ps]
    args = (base_np, *starts, patch_np, *ps, np.float32(pad_value), out_np)
    kernel = gather_into
    threads = numba.get_num_threads()
    if parallel or threads == 1:
        kernel(*args)
        return result
    # Small output: a team of one thread, so the pool is not woken. (A separate
    # serial @njit kernel was 1.5x slower: Numba compiles a prange body as its own
    # function with non-aliasing arguments, which vectorises better.) The thread
    # count is local to the calling thread.
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)
    return result


def paste(base, patch, patch_y0, patch_x0, out=None, *, parallel=None):
    """:func:`kql.kernels.reference.paste` on torch CPU tensors, by the Numba kernel."""
    return paste_nd(base, patch, (patch_y0, patch_x0), out, parallel=parallel)


def paste_nd(base, patch, patch_starts, out=None, *, parallel=None):
    """:func:`kql.kernels.reference.paste_nd` for 2 or 3 spatial axes, by the Numba kernels."""
    zeros = [np.zeros(len(patch_starts[0]), dtype=np.int64)] * len(patch_starts)
    return gather_nd(base, zeros, tuple(base.shape[1:]), patch, patch_starts, 0.0, out,
                     parallel=parallel)
