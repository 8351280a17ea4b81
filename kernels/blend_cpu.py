"""Numba CPU kernel for blending per-window values into a per-pixel map: :func:`blend`.

Same operation and results as :func:`kql.kernels.reference.blend` (read its
doc): every pixel's value for every class is a weighted sum of the values of the
windows covering it -- a sparse ``(pixels, windows)`` matrix in CSR form times
the ``(windows, classes)`` values -- written classes first, ``(classes,
pixels)``, with each pixel's most probable class (``torch.argmax``'s: the first
maximum, a NaN counting as the maximum) computed in the same pass.

Design, for a thousand classes at 224x224 (a 200 MB map, MONAI's
``OcclusionSensitivity`` output) on a few cores:

* ``prange`` over chunks of :data:`CHUNK` pixels. A chunk's ``(pixels, classes)``
  block (256 KB for 1000 classes) is accumulated in a local buffer the way
  ``scipy.sparse``'s CSR times dense product does it -- per pixel, per window in
  CSR order, one ``axpy`` over the classes, contiguous and vectorised, in
  float32 from zero -- so the sums are bit for bit those of ``placed @ values``.
* The most probable class is a scan of the pixel's row while it is in cache;
  then the block is written transposed into the classes-first output, one run
  of the chunk's pixels per class, so the 200 MB are written once and never
  read back. At 224x224, 729 windows, 1000 classes, 2 cores: ~50 ms (the
  sums ~10, the argmax ~15, the transposed writes the rest), where scipy's
  product, torch's argmax and a transposing copy took ~0.25 s
  (``docs/performance.md``, MONAI drop-in).

Arguments are trusted: :mod:`kql.kernels` validates them first. The kernel is
compiled on first use and cached on disk (``cache=True``).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

# Numba's own thread pool rather than OpenMP's, as in gather_cpu (read the note
# there: an OpenMP kernel changes how torch's CPU convolutions split their sums).
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["blend", "blend_into", "CHUNK"]

# Pixels per parallel task: 64 was the fastest of 16-128 at 224x224 with 1000
# classes (a 256 KB block per task stays in L2; fewer, longer output runs than 32).
CHUNK = 64


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def blend_into(values_t, indptr, indices, weights, out, best):
    """Kernel: ``out`` (K, P) float32 and ``best`` (P,) int64, written in place.

    ``values_t`` float32 (W, K), C-contiguous (a window's classes next to each
    other); the CSR matrix (P, W): ``indptr`` int64 (P + 1,), ``indices`` int64
    (nnz,) in [0, W), ``weights`` float32 (nnz,). K >= 1. A pixel with no
    windows gets zeros and class 0.
    """
    K = values_t.shape[1]
    P = out.shape[1]
    for chunk in prange((P + CHUNK - 1) // CHUNK):
        p0 = chunk * CHUNK
        p1 = min(p0 + CHUNK, P)
        n = p1 - p0          # (as min(CHUNK, P - p0) the kernel ran 15 % slower)
        buf = np.zeros((n, K), dtype=np.float32)
        for q in range(n):
            p = p0 + q
            row = buf[q]
            for j in range(indptr[p], indptr[p + 1]):
                w = weights[j]
                src = values_t[indices[j]]
                for k in range(K):
                    row[k] += w * src[k]
            # the first maximum; a NaN is the maximum, the first NaN wins (torch.argmax)
            top = row[0]
            arg = 0
            if top == top:
                for k in range(1, K):
                    v = row[k]
                    if v > top:
                        top = v
                        arg = k
                    elif v != v:
                        arg = k
                        break
            best[p] = arg
        # Indexed in place: slicing a row of out per class (``o = out[k]``) was
        # 2x slower here.
        for k in range(K):
            for q in range(n):
                out[k, p0 + q] = buf[q, k]


def blend(values, indptr, indices, weights, out=None):
    """:func:`kql.kernels.reference.blend` on CPU tensors, by the kernel :func:`blend_into`.

    Returns ``(out, best)``: ``out`` when given (a contiguous float32 CPU
    tensor), else a new tensor sharing the kernel's buffer; ``best`` a new int64
    tensor.
    """
    K = values.shape[0]
    P = indptr.shape[0] - 1
    if out is None:
        out = torch.empty((K, P), dtype=torch.float32)
    best = torch.empty(P, dtype=torch.int64)
    if P == 0:
        return out, best
    values_t = np.ascontiguousarray(values.detach().numpy().T)      # (windows, classes): 3 MB at 1000 x 729
    blend_into(values_t, indptr.detach().contiguous().numpy(), indices.detach().contiguous().numpy(),
               weights.detach().contiguous().numpy(), out.detach().numpy(), best.numpy())
    return out, best
