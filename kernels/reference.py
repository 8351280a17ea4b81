"""Torch implementations of the kernels (the oracle and fallback): the two input-preparation
kernels and the blend of per-window values into a per-pixel map.

Incremental inference (Krypton, Algorithm 1 and INCREMENTALTOFULLPROJECTION) reads,
for each occlusion position of a batch, a window of the layer's materialized input
with that position's changed patch written over it. Two operations cover it:

* :func:`gather` -- ``(B, C, win_h, win_w)`` windows of the shared ``(C, H, W)`` base,
  each with its own patch superimposed, cells outside the base set to ``pad_value``.
* :func:`paste` -- ``(B, C, H, W)`` full copies of the base, each with its patch
  written in (clipped to the bounds), for a global layer (flatten / linear).

Everything here is plain torch and device agnostic (CPU and CUDA tensors). Two
strategies produce identical results:

* :func:`gather_vectorised` -- a fixed number of torch ops whatever ``B``: pad the
  base once (only as far as the windows reach out), view every window of the
  padded base at once with ``as_strided`` (zero copy), pick the ``B`` windows with
  one ``index_select``, and overlay the patches with one indexed assignment.
  This is the one for CUDA, where a Python loop would launch ``2 B`` tiny kernels
  and leave the GPU idle -- the bottleneck the Krypton paper (section "CPU versus
  GPU implementation concerns") fixed with a custom memory-copy kernel.
* :func:`gather_looped` -- one sliced ``copy_`` per position. On the CPU it is
  faster than the vectorised form for the large windows of early layers
  (about 2x at VGG16 conv1 scale: no padded copy of the whole base and no index
  arithmetic per element, see ``benchmarks/bench_kernels.py``), so :func:`gather`
  uses it for CPU tensors.

:func:`gather_nd` / :func:`paste_nd` (and their two strategies) do the same for a
base with any number of spatial axes, e.g. a volume ``(C, D, H, W)``.

:func:`blend` is post-processing, not input preparation: every pixel's value per
class as a weighted sum of the windows covering it (a sparse product), classes
first, with the most probable class per pixel -- MONAI's occlusion map.

Arguments are trusted: :mod:`kql.kernels` validates them before calling in.
Positions are int64 tensors of shape ``(B,)`` on any device; the result is a new
contiguous float32 tensor, or ``out`` when given. Being torch ops, these are
differentiable with respect to ``base`` and ``patch`` (the Numba kernels are not).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gather", "paste", "gather_vectorised", "gather_looped", "gather_nd", "paste_nd",
           "gather_vectorised_nd", "gather_looped_nd", "blend"]


def gather(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None, patch_x0=None,
           pad_value=0.0, out=None):
    """Windows of ``base`` with per-position patches superimposed (see module doc).

    ``out[b, c, i, j]``, with ``y = win_y0[b] + i`` and ``x = win_x0[b] + j``, is
    ``patch[b, c, y - patch_y0[b], x - patch_x0[b]]`` where ``(y, x)`` lies in
    position ``b``'s patch rectangle, else ``base[c, y, x]`` where it lies in the
    base, else ``pad_value``.

    Uses :func:`gather_looped` for CPU tensors and :func:`gather_vectorised` for
    everything else (the faster of the two on each device).

    >>> base = torch.arange(9.).view(1, 3, 3)
    >>> gather(base, torch.tensor([-1]), torch.tensor([1]), 2, 3,
    ...        torch.full((1, 1, 1, 1), 7.), torch.tensor([0]), torch.tensor([2]))
    tensor([[[[0., 0., 0.],
              [1., 7., 0.]]]])
    """
    impl = gather_looped if base.device.type == "cpu" else gather_vectorised
    return impl(base, win_y0, win_x0, win_h, win_w, patch, patch_y0, patch_x0, pad_value, out)


def paste(base, patch, patch_y0, patch_x0, out=None):
    """``(B, C, H, W)`` copies of ``base``, each with its patch written in, clipped.

    The same operation as :func:`gather` with every window covering the whole base.

    >>> paste(torch.zeros(1, 2, 3), torch.ones(2, 1, 2, 2), torch.tensor([-1, 1]),
    ...       torch.tensor([0, 2]))
    tensor([[[[1., 1., 0.],
              [0., 0., 0.]]],
    <BLANKLINE>
    <BLANKLINE>
            [[[0., 0., 0.],
              [0., 0., 1.]]]])
    """
    zeros = torch.zeros_like(patch_y0)
    _, H, W = base.shape
    return gather(base, zeros, zeros, H, W, patch, patch_y0, patch_x0, 0.0, out)


def gather_vectorised(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None,
                      patch_x0=None, pad_value=0.0, out=None):
    """:func:`gather` in a fixed number of torch ops, whatever the batch size."""
    C, H, W = base.shape
    B = win_y0.shape[0]
    if out is None:
        out = base.new_empty((B, C, win_h, win_w))
    if B == 0:
        return out
    device = base.device
    win_y0 = win_y0.to(device)
    win_x0 = win_x0.to(device)
    # One device->host transfer for the padding extents (a sync on CUDA).
    y_min, y_max, x_min, x_max = torch.stack(
        [win_y0.min(), win_y0.max(), win_x0.min(), win_x0.max()]).tolist()
    top, bottom = max(0, -y_min), max(0, y_max + win_h - H)
    left, right = max(0, -x_min), max(0, x_max + win_w - W)
    src = base.contiguous()
    if top or bottom or left or right:
        src = F.pad(src, (left, right, top, bottom), value=float(pad_value))
    Hp, Wp = src.shape[1:]
    # Window (y, x) of src starts at flat offset y * Wp + x; as one strided dimension
    # those offsets make a single index for index_select (unfold would need two).
    n_starts = (Hp - win_h) * Wp + (Wp - win_w) + 1
    windows = src.as_strided((n_starts, C, win_h, win_w), (1, Hp * Wp, Wp, 1),
                             src.storage_offset())
    starts = (win_y0 + top) * Wp + (win_x0 + left)
    torch.index_select(windows, 0, starts, out=out)
    if patch is not None and patch.shape[2] * patch.shape[3] > 0:
        _overlay_vectorised(out, win_y0, win_x0, patch, patch_y0.to(device), patch_x0.to(device))
    return out


def _overlay_vectorised(out, win_y0, win_x0, patch, patch_y0, patch_x0):
    """Write each position's patch into its window of ``out`` (in place), clipped."""
    B, C, wh, ww = out.shape
    ph, pw = patch.shape[2:]
    oy = patch_y0 - win_y0  # patch origin in window coordinates
    ox = patch_x0 - win_x0
    inside = bool(((oy >= 0) & (oy + ph <= wh) & (ox >= 0) & (ox + pw <= ww)).all())
    if inside:
        # The usual case (the window is the patch plus its context): every patch fits.
        # One indexed assignment with broadcast (b, c, row, column) indices. (Not through
        # an unfold view of out: writing into overlapping views is unsafe, e.g. under
        # torch.use_deterministic_algorithms on CUDA.)
        dev = out.device
        rows = (oy[:, None] + torch.arange(ph, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(pw, device=dev))[:, None, None, :]
        out[torch.arange(B, device=dev)[:, None, None, None],
            torch.arange(C, device=dev)[None, :, None, None], rows, cols] = patch
        return
    # General case: for every window cell, the patch cell that would cover it (clamped
    # into the patch) and whether it really does; then one masked select.
    pi = torch.arange(wh, device=out.device) - oy[:, None]  # (B, wh)
    pj = torch.arange(ww, device=out.device) - ox[:, None]  # (B, ww)
    covered = (((pi >= 0) & (pi < ph))[:, :, None] & ((pj >= 0) & (pj < pw))[:, None, :])
    flat = (pi.clamp(0, ph - 1) * pw)[:, :, None] + pj.clamp(0, pw - 1)[:, None, :]
    from_patch = patch.reshape(B, C, ph * pw).gather(
        2, flat.reshape(B, 1, wh * ww).expand(B, C, wh * ww)).view(B, C, wh, ww)
    torch.where(covered[:, None], from_patch, out, out=out)


def gather_looped(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None,
                  patch_x0=None, pad_value=0.0, out=None):
    """:func:`gather` with one sliced copy per position (fastest torch form on CPU)."""
    C, H, W = base.shape
    B = win_y0.shape[0]
    if out is None:
        out = base.new_empty((B, C, win_h, win_w))
    wy, wx = win_y0.tolist(), win_x0.tolist()
    if patch is not None and patch.shape[2] * patch.shape[3] > 0:
        ph, pw = patch.shape[2:]
        py, px = patch_y0.tolist(), patch_x0.tolist()
    else:
        patch = None
    for b in range(B):
        y0, x0 = wy[b], wx[b]
        dst = out[b]
        ya, yb = max(y0, 0), min(y0 + win_h, H)
        xa, xb = max(x0, 0), min(x0 + win_w, W)
        if ya > y0 or yb < y0 + win_h or xa > x0 or xb < x0 + win_w:
            dst.fill_(pad_value)  # the window reaches into the padding
        if ya < yb and xa < xb:
            dst[:, ya - y0:yb - y0, xa - x0:xb - x0].copy_(base[:, ya:yb, xa:xb])
        if patch is not None:
            qa, qb = max(py[b], y0), min(py[b] + ph, y0 + win_h)
            ra, rb = max(px[b], x0), min(px[b] + pw, x0 + win_w)
            if qa < qb and ra < rb:
                dst[:, qa - y0:qb - y0, ra - x0:rb - x0].copy_(
                    patch[b, :, qa - py[b]:qb - py[b], ra - px[b]:rb - px[b]])
    return out


# --------------------------------------------------------------- N spatial axes
# The same two strategies for a base with any number of spatial axes (volumes:
# ``(C, D, H, W)``). Positions and sizes come as one entry per axis, in the
# base's axis order. The 2-D functions above stay as they are: written for two
# axes they do less Python work per position, which the small windows of late
# layers notice; these serve volumes and are checked against the 2-D ones.

def gather_nd(base, starts, sizes, patch=None, patch_starts=None, pad_value=0.0, out=None):
    """:func:`gather` for ``base`` ``(C, *S)`` with any number of spatial axes.

    ``starts`` / ``patch_starts``: one int64 tensor ``(B,)`` per spatial axis;
    ``sizes``: the window size per axis; ``patch`` ``(B, C, *P)``.
    ``out[b, c, *i]`` with ``s = starts[:, b] + i`` is ``patch[b, c, *(s - patch_starts[:, b])]``
    inside the patch box, else ``base[c, *s]`` inside the base, else ``pad_value``.

    >>> base = torch.arange(8.).view(1, 2, 2, 2)
    >>> gather_nd(base, [torch.tensor([1])] * 3, (2, 1, 1))
    tensor([[[[[7.]],
    <BLANKLINE>
              [[0.]]]]])
    """
    impl = gather_looped_nd if base.device.type == "cpu" else gather_vectorised_nd
    return impl(base, starts, sizes, patch, patch_starts, pad_value, out)


def paste_nd(base, patch, patch_starts, out=None):
    """:func:`paste` for ``base`` ``(C, *S)`` with any number of spatial axes."""
    zeros = [torch.zeros_like(patch_starts[0])] * len(patch_starts)
    return gather_nd(base, zeros, tuple(base.shape[1:]), patch, patch_starts, 0.0, out)


def _has_cells(patch):
    return patch is not None and all(n > 0 for n in patch.shape[2:])


def gather_looped_nd(base, starts, sizes, patch=None, patch_starts=None, pad_value=0.0, out=None):
    """:func:`gather_nd` with one sliced copy per position (fastest torch form on CPU)."""
    C, *S = base.shape
    B = starts[0].shape[0]
    sizes = tuple(sizes)
    if out is None:
        out = base.new_empty((B, C, *sizes))
    lows = list(zip(*(s.tolist() for s in starts)))  # per position, per axis
    if _has_cells(patch):
        P = patch.shape[2:]
        patch_lows = list(zip(*(p.tolist() for p in patch_starts)))
    else:
        patch = None
    every = slice(None)
    for b in range(B):
        lo = lows[b]
        dst = out[b]
        # the part of the window inside the base, per axis: [a, z) in base coordinates
        a = [max(l, 0) for l in lo]
        z = [min(l + n, s) for l, n, s in zip(lo, sizes, S)]
        if any(ak > lk for ak, lk in zip(a, lo)) or any(zk < lk + n for zk, lk, n in zip(z, lo, sizes)):
            dst.fill_(pad_value)  # the window reaches into the padding
        if all(ak < zk for ak, zk in zip(a, z)):
            dst[(every, *(slice(ak - lk, zk - lk) for ak, zk, lk in zip(a, z, lo)))].copy_(
                base[(every, *(slice(ak, zk) for ak, zk in zip(a, z)))])
        if patch is not None:
            q = patch_lows[b]
            pa = [max(qk, lk) for qk, lk in zip(q, lo)]
            pz = [min(qk + m, lk + n) for qk, m, lk, n in zip(q, P, lo, sizes)]
            if all(ak < zk for ak, zk in zip(pa, pz)):
                dst[(every, *(slice(ak - lk, zk - lk) for ak, zk, lk in zip(pa, pz, lo)))].copy_(
                    patch[(b, every, *(slice(ak - qk, zk - qk) for ak, zk, qk in zip(pa, pz, q)))])
    return out


def gather_vectorised_nd(base, starts, sizes, patch=None, patch_starts=None, pad_value=0.0,
                         out=None):
    """:func:`gather_nd` in a fixed number of torch ops, whatever the batch size.

    As :func:`gather_vectorised`: pad the base as far as the windows reach out, view
    every window of the padded base as one strided dimension of flat start offsets
    (zero copy), pick the ``B`` windows with one ``index_select``.
    """
    C, *S = base.shape
    n = len(S)
    B = starts[0].shape[0]
    sizes = tuple(sizes)
    if out is None:
        out = base.new_empty((B, C, *sizes))
    if B == 0:
        return out
    device = base.device
    starts = [s.to(device) for s in starts]
    # One device->host transfer for the padding extents (a sync on CUDA).
    ext = torch.stack([f(s) for s in starts for f in (torch.min, torch.max)]).tolist()
    before = [max(0, -ext[2 * k]) for k in range(n)]
    after = [max(0, ext[2 * k + 1] + sizes[k] - S[k]) for k in range(n)]
    src = base.contiguous()
    if any(before) or any(after):
        pads = [p for k in reversed(range(n)) for p in (before[k], after[k])]  # last axis first
        src = F.pad(src, pads, value=float(pad_value))
    Sp = src.shape[1:]
    strides = src.stride()[1:]
    n_starts = sum((Sp[k] - sizes[k]) * strides[k] for k in range(n)) + 1
    windows = src.as_strided((n_starts, C, *sizes), (1, src.stride(0), *strides),
                             src.storage_offset())
    flat = sum((starts[k] + before[k]) * strides[k] for k in range(n))
    torch.index_select(windows, 0, flat, out=out)
    if _has_cells(patch):
        _overlay_vectorised_nd(out, starts, patch, [p.to(device) for p in patch_starts])
    return out


def _overlay_vectorised_nd(out, starts, patch, patch_starts):
    """Write each position's patch into its window of ``out`` (in place), clipped."""
    B, C, *Wn = out.shape
    P = patch.shape[2:]
    n = len(P)
    dev = out.device
    origin = [q - s for q, s in zip(patch_starts, starts)]  # patch origin in window coordinates
    inside = torch.ones(B, dtype=torch.bool, device=dev)
    for o, m, w in zip(origin, P, Wn):
        inside &= (o >= 0) & (o + m <= w)

    def along(k, v):  # v (B, L) as a broadcastable index on spatial axis k of (B, C, *axes)
        shape = [B, 1] + [1] * n
        shape[2 + k] = v.shape[1]
        return v.view(shape)

    if bool(inside.all()):
        # The usual case: every patch fits its window. One indexed assignment.
        index = [torch.arange(B, device=dev).view([B, 1] + [1] * n),
                 torch.arange(C, device=dev).view([1, C] + [1] * n)]
        index += [along(k, origin[k][:, None] + torch.arange(P[k], device=dev)) for k in range(n)]
        out[tuple(index)] = patch
        return
    # General case: per window cell, the patch cell that would cover it (clamped into
    # the patch) and whether it really does; then one masked select.
    covered = torch.ones([B, 1] + [1] * n, dtype=torch.bool, device=dev)
    flat = torch.zeros([B, 1] + [1] * n, dtype=torch.int64, device=dev)
    step = 1
    for k in reversed(range(n)):
        p = torch.arange(Wn[k], device=dev) - origin[k][:, None]  # (B, W_k)
        covered = covered & along(k, (p >= 0) & (p < P[k]))
        flat = flat + along(k, p.clamp(0, P[k] - 1) * step)
        step *= P[k]
    cells = math.prod(Wn)
    flat = flat.expand([B, 1, *Wn]).reshape(B, 1, cells)
    from_patch = patch.reshape(B, C, -1).gather(2, flat.expand(B, C, cells)).view(out.shape)
    torch.where(covered, from_patch, out, out=out)


def blend(values, indptr, indices, weights, out=None):
    """Per-window values blended per pixel, classes first, and each pixel's most probable class.

    ``values`` is float32 ``(K, W)`` (classes x windows); ``indptr`` ``(P + 1,)``,
    ``indices`` and ``weights`` ``(nnz,)`` a CSR matrix ``A`` of ``(P, W)``
    (pixels x windows). Returns ``(out, best)``: ``out[k, p] = sum_j A[p, j] *
    values[k, j]`` ``(K, P)`` (``out`` when given) and ``best = out.argmax(0)``
    ``(P,)`` int64: the first maximum, a NaN counting as the maximum.

    >>> blend(torch.tensor([[1., 3.], [2., 2.]]), torch.tensor([0, 1, 3]),
    ...       torch.tensor([0, 0, 1]), torch.tensor([1., .5, .5]))
    (tensor([[1., 2.],
            [2., 2.]]), tensor([1, 0]))
    """
    P = indptr.shape[0] - 1
    rows = torch.repeat_interleave(torch.arange(P, device=indptr.device), indptr.diff())
    matrix = torch.sparse_coo_tensor(torch.stack([rows, indices]), weights, (P, values.shape[1]),
                                     check_invariants=True)
    blended = torch.sparse.mm(matrix, values.T).T
    if out is None:
        out = torch.empty_like(blended)
    out.copy_(blended)
    return out, out.argmax(0)
