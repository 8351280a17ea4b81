"""Numba CUDA kernels for the input preparation of incremental inference.

Same operations and results as :mod:`kql.kernels.reference` (read its module doc).
This is the "custom GPU kernel which performs the input preparation more
efficiently by parallelly executing the memory copying" of the Krypton paper
(section "CPU versus GPU implementation concerns"; revision letter, Appendix B):
one launch prepares the inputs of a whole batch of occlusion positions, instead
of a sequential slice-and-stitch loop that leaves the GPU idle.

Kernel layout: a 2-D grid. ``blockIdx.y`` walks the ``(position, channel, depth)``
planes (an image is a volume of depth 1: one kernel for both, reshaped views, no
copies) and the x dimension walks the cells of one output plane (both grid-stride, so any
size fits the grid limits). Consecutive threads write consecutive cells of an
output row and read consecutive cells of a base row or patch row: coalesced
accesses, and only one integer division per cell. Each thread picks its source
with the rule of :func:`kql.kernels.reference.gather`: patch, else base, else pad.

Inputs may be

* torch CUDA tensors -- wrapped zero copy with ``numba.cuda.as_cuda_array`` (the
  ``__cuda_array_interface__``), launched on torch's current stream of the
  tensor's device, result returned as a torch tensor. No host copy and no
  host-side synchronisation (``sync=False``: the launch is ordered after earlier
  torch work by the stream itself);
* numba device arrays -- launched on ``stream`` (default stream if None), result
  returned as a device array;
* numpy arrays -- copied to the device and the result back to a numpy array; this
  is what runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) in tests.

Importing this module never touches the GPU (importing ``numba.cuda`` does not
initialise the driver, and the kernel is built and compiled on first launch), so it
imports on machines without CUDA. ``cuda`` must stay a module global: the simulator
swaps the module globals that name ``numba.cuda`` while a kernel runs. Arguments are trusted: :mod:`kql.kernels`
validates them first.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numba import cuda

__all__ = ["gather", "paste", "gather_nd", "paste_nd", "is_available"]

THREADS_PER_BLOCK = 256
_MAX_GRID = 65535  # grid-stride loops keep every grid dimension within this


def is_available() -> bool:
    """True when Numba can launch CUDA kernels here (a GPU, or the simulator)."""
    try:
        return bool(cuda.is_available())
    except Exception:  # no numba, or a broken driver: not available, not an error
        return False


@functools.cache
def _gather_kernel():
    @cuda.jit
    def gather_kernel(base, win_z0, win_y0, win_x0, patch, patch_z0, patch_y0, patch_x0, pad,
                      out):
        # base (C, D, H, W), patch (B, C, pd, ph, pw), out (B, C, wd, wh, ww); an image is
        # a volume of depth 1. blockIdx.y walks the (position, channel, depth) planes.
        C = base.shape[0]
        D = base.shape[1]
        H = base.shape[2]
        W = base.shape[3]
        wd = out.shape[2]
        wh = out.shape[3]
        ww = out.shape[4]
        n_planes = out.shape[0] * C * wd
        pd = patch.shape[2]
        ph = patch.shape[3]
        pw = patch.shape[4]
        n_cells = wh * ww
        first = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        step = cuda.gridDim.x * cuda.blockDim.x
        plane = cuda.blockIdx.y
        while plane < n_planes:
            bc = plane // wd
            k = plane - bc * wd
            b = bc // C
            c = bc - b * C
            z = win_z0[b] + k
            y0 = win_y0[b]
            x0 = win_x0[b]
            pk = z - patch_z0[b]
            py0 = patch_y0[b]
            px0 = patch_x0[b]
            # whether this plane's depth lies in the base / in the patch: once per plane
            z_in = z >= 0 and z < D
            pk_in = pk >= 0 and pk < pd
            m = first
            while m < n_cells:
                i = m // ww
                j = m - i * ww
                y = y0 + i
                x = x0 + j
                pi = y - py0
                pj = x - px0
                if pk_in and pi >= 0 and pi < ph and pj >= 0 and pj < pw:
                    out[b, c, k, i, j] = patch[b, c, pk, pi, pj]
                elif z_in and y >= 0 and y < H and x >= 0 and x < W:
                    out[b, c, k, i, j] = base[c, z, y, x]
                else:
                    out[b, c, k, i, j] = pad
                m += step
            plane += cuda.gridDim.y

    return gather_kernel


def _grid(n_planes, n_cells, threads_per_block):
    return (min(math.ceil(n_cells / threads_per_block), _MAX_GRID), min(n_planes, _MAX_GRID))


def gather(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None, patch_x0=None,
           pad_value=0.0, out=None, *, stream=None, threads_per_block=THREADS_PER_BLOCK):
    """:func:`kql.kernels.reference.gather` in one CUDA launch.

    ``base`` decides the mode (see module doc): a torch CUDA tensor, a numba device
    array or a numpy array. ``out``, when given, must be of the same kind and
    contiguous. ``stream`` applies to the device-array and numpy modes; torch
    tensors always use torch's current stream. ``threads_per_block`` is there for
    the simulator, which runs one Python thread per CUDA thread.
    """
    return gather_nd(base, (win_y0, win_x0), (win_h, win_w), patch,
                     None if patch is None else (patch_y0, patch_x0), pad_value, out,
                     stream=stream, threads_per_block=threads_per_block)


def gather_nd(base, starts, sizes, patch=None, patch_starts=None, pad_value=0.0, out=None, *,
              stream=None, threads_per_block=THREADS_PER_BLOCK):
    """:func:`kql.kernels.reference.gather_nd` for 2 or 3 spatial axes in one CUDA launch
    (``starts`` / ``patch_starts`` one ``(B,)`` per axis); modes as :func:`gather`."""
    if _is_torch(base):
        return _gather_torch(base, starts, sizes, patch, patch_starts, pad_value, out,
                             threads_per_block)
    return _gather_numba(base, starts, sizes, patch, patch_starts, pad_value, out, stream,
                         threads_per_block)


def paste(base, patch, patch_y0, patch_x0, out=None, *, stream=None,
          threads_per_block=THREADS_PER_BLOCK):
    """:func:`kql.kernels.reference.paste` in one CUDA launch (a gather of whole-base windows)."""
    return paste_nd(base, patch, (patch_y0, patch_x0), out, stream=stream,
                    threads_per_block=threads_per_block)


def paste_nd(base, patch, patch_starts, out=None, *, stream=None,
             threads_per_block=THREADS_PER_BLOCK):
    """:func:`kql.kernels.reference.paste_nd` for 2 or 3 spatial axes in one CUDA launch."""
    zeros = _zeros(len(patch_starts[0]), _torch_device(base) if _is_torch(base) else None)
    return gather_nd(base, [zeros] * len(patch_starts), tuple(base.shape[1:]), patch,
                     patch_starts, 0.0, out, stream=stream, threads_per_block=threads_per_block)


def _is_torch(x) -> bool:
    # Without importing torch: this module also serves plain numba callers.
    return type(x).__module__.partition(".")[0] == "torch"


def _torch_device(t):
    """The CUDA device of a torch tensor, with its index; ValueError off CUDA."""
    import torch

    device = t.device
    if device.type != "cuda":
        raise ValueError(f"the cuda kernels need CUDA tensors, got base on {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


_ZEROS: dict = {}  # device key -> int64 zeros: the starts of an image's depth axis, of a paste's
_ZEROS_LOCK = threading.Lock()  # window, of an absent patch; only read, so one buffer per device


def _zeros(n, device=None):
    """``n`` int64 zeros on ``device`` (a torch CUDA device with its index) or, without one,
    a numba device array in the current context: a view of one buffer per device, grown by
    doubling, instead of a fresh array (an allocation and a fill or copy) per launch.

    The kernel only reads its start arrays, so any stream may read the buffer. A new
    buffer is made under a device-wide synchronisation: its fill is complete before a
    launch on another stream reads it, and no launch still reads the buffer it replaces
    when that is freed (the caching allocator could otherwise hand that memory on).
    """
    key = device if device is not None else ("numba", getattr(cuda.current_context().device, "id", None))
    z = _ZEROS.get(key)
    if z is None or len(z) < n:
        with _ZEROS_LOCK:
            z = _ZEROS.get(key)
            if z is None or len(z) < n:
                size = max(n, 2 * len(z) if z is not None else 64)
                if device is not None:
                    import torch
                    z = torch.zeros(size, dtype=torch.int64, device=device)
                    torch.cuda.synchronize(device)
                else:
                    cuda.synchronize()
                    z = cuda.to_device(np.zeros(size, dtype=np.int64))
                _ZEROS[key] = z
    return z[:n]


def _launch(base, starts, patch, patch_starts, pad_value, out, stream, threads_per_block):
    B, C, wd, wh, ww = out.shape
    kernel = _gather_kernel()
    grid = _grid(B * C * wd, wh * ww, threads_per_block)
    args = (base, *starts, patch, *patch_starts, np.float32(pad_value), out)
    if stream is None:
        kernel[grid, threads_per_block](*args)
    else:
        kernel[grid, threads_per_block, stream](*args)


def _as_volume(base, starts, patch, patch_starts, out, zeros):
    """Images as volumes of depth 1 (views, no copies); volumes unchanged."""
    if len(starts) == 3:
        return base, starts, patch, patch_starts, out
    B, C = out.shape[:2]
    return (base.reshape(base.shape[0], 1, *base.shape[1:]), [zeros, *starts],
            patch.reshape(B, C, 1, *patch.shape[2:]), [zeros, *patch_starts],
            out.reshape(B, C, 1, *out.shape[2:]))


def _gather_torch(base, starts, sizes, patch, patch_starts, pad_value, out, threads_per_block):
    import torch

    device = _torch_device(base)
    B, C = len(starts[0]), base.shape[0]
    if out is None:
        out = torch.empty((B, C, *sizes), dtype=torch.float32, device=device)
    if B == 0 or C == 0 or math.prod(sizes) == 0:
        return out

    def on_device(t, dtype):
        return torch.as_tensor(t).to(device=device, dtype=dtype).detach().contiguous()

    starts = [on_device(t, torch.int64) for t in starts]
    zeros = _zeros(B, device)
    if patch is None:
        patch = torch.empty((B, C) + (0,) * len(sizes), dtype=torch.float32, device=device)
        patch_starts = [zeros] * len(sizes)
    else:
        patch = on_device(patch, torch.float32)
        patch_starts = [on_device(t, torch.int64) for t in patch_starts]
    base = base.detach().contiguous()
    with cuda.gpus[device.index]:
        # Launch on torch's stream: ordered after the producers of base and patch and
        # before later consumers of out, with no host-side wait (hence sync=False).
        stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
        wrap = lambda t: cuda.as_cuda_array(t, sync=False)  # noqa: E731
        vb, vs, vp, vps, vo = _as_volume(base, starts, patch, patch_starts, out, zeros)
        _launch(wrap(vb), [wrap(t) for t in vs], wrap(vp), [wrap(t) for t in vps], pad_value,
                wrap(vo), stream, threads_per_block)
    return out


def _gather_numba(base, starts, sizes, patch, patch_starts, pad_value, out, stream,
                  threads_per_block):
    on_host = isinstance(base, np.ndarray)

    def dev(x, dtype):
        if hasattr(x, "copy_to_host"):  # already a (real or simulated) device array
            return x
        return cuda.to_device(np.ascontiguousarray(x, dtype=dtype), stream=stream or 0)

    B, C = len(starts[0]), base.shape[0]
    if out is None or isinstance(out, np.ndarray):
        out_dev = cuda.device_array((B, C, *sizes), dtype=np.float32, stream=stream or 0)
    else:
        out_dev = out
    if B and C and math.prod(sizes):
        zeros = _zeros(B)
        if patch is None:
            patch_dev = cuda.to_device(np.empty((B, C) + (0,) * len(sizes), dtype=np.float32))
            ps = [zeros] * len(sizes)
        else:
            patch_dev = dev(patch, np.float32)
            ps = [dev(t, np.int64) for t in patch_starts]
        vb, vs, vp, vps, vo = _as_volume(dev(base, np.float32), [dev(t, np.int64) for t in starts],
                                         patch_dev, ps, out_dev, zeros)
        _launch(vb, vs, vp, vps, pad_value, vo, stream, threads_per_block)
    if isinstance(out, np.ndarray) or (on_host and out is None):
        host = out_dev.copy_to_host(out, stream=stream or 0)
        if stream is not None:
            stream.synchronize()  # the caller gets a numpy array: it must be filled
        return host
    return out_dev
