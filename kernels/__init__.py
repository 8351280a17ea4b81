"""Input-preparation kernels of incremental inference (:func:`gather`, :func:`paste`), and a blend.

Krypton (Nakandala & Kumar, SIGMOD 2019) materializes every layer's output for the
original image once; for each occlusion position it recomputes only the changed
region of each layer, from a slightly larger window of the layer's input with the
changed patch superimposed. Preparing those windows for a batch of positions is a
pure memory copy, and it is what these kernels do:

* :func:`gather` -- ``(B, C, win_h, win_w)``: position ``b``'s window of the shared
  ``(C, H, W)`` base, its patch written over it, cells past the borders set to
  ``pad_value`` (0 before a convolution, ``-inf`` before a max pooling).
* :func:`paste` -- ``(B, C, H, W)``: full patched copies, where a global layer
  (flatten / linear) needs the whole tensor (Krypton's INCREMENTALTOFULLPROJECTION).
* :func:`gather_nd` / :func:`paste_nd` -- the same for 2 or 3 spatial axes: images
  ``(C, H, W)`` and volumes ``(C, D, H, W)`` (3-D CNNs: CT / MRI, video clips), with
  positions and sizes given per axis. Two axes run the 2-D kernels unchanged.

Backends, all giving identical results (float32 copies, no arithmetic):

=========  ==============================================  ======================
``torch``  :mod:`kql.kernels.reference`, any device          the oracle, fallback
``numba``  :mod:`kql.kernels.gather_cpu`, CPU tensors        parallel ``prange``
``cuda``   :mod:`kql.kernels.gather_cuda`, CUDA tensors      one launch per batch
``auto``   CUDA tensors: ``cuda`` if Numba sees the GPU, else ``torch``;
           CPU tensors: :func:`choose_backend`'s size rule
=========  ==============================================  ======================

And one post-processing kernel, :func:`blend`: per-window values (classes x windows)
blended into a classes-first per-pixel map by a sparse weight matrix, with each
pixel's most probable class (MONAI's occlusion map, ``kql.compat.monai``). Backends
``torch`` and ``numba`` (:mod:`kql.kernels.blend_cpu`); CPU tensors only.

Every argument is validated up front and a bad one raises ``ValueError`` naming
it with both values. (Not a :class:`kql.errors.KqlError`: the planner computes
these arguments, so a bad one is a bug in KQL, not a user mistake.)
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from . import reference

__all__ = ["gather", "paste", "gather_nd", "paste_nd", "blend", "available_backends", "auto_backend",
           "choose_backend", "numba_min_cells", "BACKENDS"]

BACKENDS = ("auto", "torch", "numba", "cuda")

# Output cells (B * C * win_h * win_w) from which Numba beats torch on the CPU.
# Below it the fixed cost of a parallel Numba launch (~20-40 us: argument typing,
# waking the thread pool) dominates; above it Numba wins 2-5x
# (benchmarks/bench_kernels.py). See auto_backend.
NUMBA_MIN_CELLS = 4096
# The same for volumes: none. Torch's per-position copy of a 3-D window (three
# clipped slices, a fill where it reaches into the padding) costs more than a
# Numba launch even for one 3x3x3 window of one channel: in ``bench_kernels.py
# --volumes --sweep`` Numba was 1.1-3.4x faster from 27 to 128k cells (wall
# time, 2 threads; 1.2-3.5x in CPU time with one thread) on a loaded machine.
NUMBA_MIN_CELLS_VOLUME = 0


def gather(base, win_y0, win_x0, win_h, win_w, patch=None, patch_y0=None, patch_x0=None,
           pad_value=0.0, *, backend="auto", out=None):
    """Windows of the materialized ``base``, one per position, patches superimposed.

    Args:
        base: float32 tensor ``(C, H, W)``, the layer input materialized for the
            original image, shared by all positions. Contiguous is best: the Numba
            and CUDA backends copy a non-contiguous one first.
        win_y0, win_x0: integer tensors or arrays ``(B,)``: each window's top-left
            corner in base coordinates; may be negative or past the base (windows
            reach into the layer's padding).
        win_h, win_w: window size, positive ints, the same for all positions.
        patch: float32 tensor ``(B, C, ph, pw)`` on base's device, or None: the
            updated values of each position's changed region. It wins over base and
            padding wherever it lies in the window; the rest of it is ignored.
        patch_y0, patch_x0: integer ``(B,)``: each patch's top-left corner in base
            coordinates. Required with ``patch``, forbidden without.
        pad_value: value of window cells outside the base (0.0, or ``-inf`` for
            max pooling).
        backend: ``"auto"``, ``"torch"``, ``"numba"`` (CPU) or ``"cuda"``.
        out: optional contiguous float32 tensor ``(B, C, win_h, win_w)`` on base's
            device to write into (saves an allocation per call).

    Returns:
        ``out[b, c, i, j]`` with ``y = win_y0[b] + i``, ``x = win_x0[b] + j``:
        ``patch[b, c, y - patch_y0[b], x - patch_x0[b]]`` inside the patch, else
        ``base[c, y, x]`` inside the base, else ``pad_value``. A new tensor (or
        ``out``), never a view of ``base``. Only the ``torch`` backend is
        differentiable; the others read ``.detach()``-ed inputs.

    Raises:
        ValueError: an argument of the wrong shape, dtype, device or batch size, or
            a backend that is unknown, unavailable or wrong for the device.

    >>> base = torch.arange(16.).view(1, 4, 4)
    >>> gather(base, torch.tensor([-1, 2]), torch.tensor([0, 2]), 3, 3,
    ...        torch.full((2, 1, 1, 1), -1.), torch.tensor([0, 3]), torch.tensor([1, 3]))
    tensor([[[[ 0.,  0.,  0.],
              [ 0., -1.,  2.],
              [ 4.,  5.,  6.]]],
    <BLANKLINE>
    <BLANKLINE>
            [[[10., 11.,  0.],
              [14., -1.,  0.],
              [ 0.,  0.,  0.]]]])
    """
    C, H, W = _check_base(base)
    wy = _positions("win_y0", win_y0)
    B = wy.shape[0]
    wx = _positions("win_x0", win_x0, B, "win_y0")
    win_h = _positive_int("win_h", win_h)
    win_w = _positive_int("win_w", win_w)
    if patch is None:
        if patch_y0 is not None or patch_x0 is not None:
            raise ValueError("patch_y0 / patch_x0 given without a patch: pass the patch too, "
                             "or neither")
        patch_starts = None
    else:
        _check_patch(patch, base, B)
        if patch_y0 is None or patch_x0 is None:
            raise ValueError("a patch needs patch_y0 and patch_x0 (its top-left corner per "
                             "position)")
        patch_starts = (_positions("patch_y0", patch_y0, B, "win_y0"),
                        _positions("patch_x0", patch_x0, B, "win_y0"))
    pad_value = _pad_value(pad_value)
    _check_out(out, (B, C, win_h, win_w), base)
    name = _resolve_backend(backend, base, B * C * win_h * win_w)
    return _gather(name, base, (wy, wx), (win_h, win_w), patch, patch_starts, pad_value, out)


def gather_nd(base, starts, sizes, patch=None, patch_starts=None, *, pad_value=0.0,
              backend="auto", out=None):
    """:func:`gather` for 2 or 3 spatial axes: images ``(C, H, W)`` and volumes ``(C, D, H, W)``.

    Args:
        base: float32 tensor ``(C, *S)``, ``S`` the 2 or 3 spatial sizes (``(H, W)``
            or ``(D, H, W)``), shared by all positions.
        starts: one integer tensor or array ``(B,)`` per spatial axis, in the base's
            axis order: each window's first corner in base coordinates (may be
            negative or past the base).
        sizes: the window size per spatial axis, positive ints.
        patch: float32 tensor ``(B, C, *P)`` on base's device, or None: each
            position's changed box, winning over base and padding where it lies
            in the window.
        patch_starts: one integer ``(B,)`` per spatial axis: each patch's first
            corner. Required with ``patch``, forbidden without.
        pad_value, backend, out: as for :func:`gather` (``out`` is ``(B, C, *sizes)``).

    Returns:
        ``out[b, c, *i]`` with ``s = (starts[k][b] + i[k])_k``: the patch cell
        ``s - patch_starts[:][b]`` inside the patch box, else ``base[c, *s]``
        inside the base, else ``pad_value``. With two axes this is exactly
        :func:`gather` (same kernels, same speed).

    Raises:
        ValueError: as :func:`gather`, naming the argument (``starts[1]``, ``sizes``, ...).

    >>> base = torch.arange(8.).view(1, 2, 2, 2)
    >>> gather_nd(base, [torch.tensor([1]), torch.tensor([0]), torch.tensor([1])], (1, 2, 2),
    ...           torch.full((1, 1, 1, 1, 1), -1.), [[1], [1], [1]])
    tensor([[[[[ 5.,  0.],
               [-1.,  0.]]]]])
    """
    shape = _check_base(base, _ND_BASE)
    C, n = shape[0], len(shape) - 1
    starts = _axis_positions("starts", starts, n)
    B = starts[0].shape[0]
    sizes = _sizes(sizes, n)
    if patch is None:
        if patch_starts is not None:
            raise ValueError("patch_starts given without a patch: pass the patch too, or neither")
    else:
        _check_patch(patch, base, B, "starts[0]")
        if patch_starts is None:
            raise ValueError("a patch needs patch_starts (its first corner per position, one "
                             "(B,) per spatial axis)")
        patch_starts = _axis_positions("patch_starts", patch_starts, n, B, "starts[0]")
    pad_value = _pad_value(pad_value)
    _check_out(out, (B, C, *sizes), base)
    name = _resolve_backend(backend, base, B * C * math.prod(sizes))
    return _gather(name, base, starts, sizes, patch, patch_starts, pad_value, out)


def _gather(name, base, starts, sizes, patch, patch_starts, pad_value, out):
    """Run the validated gather on backend ``name``; 2 axes through the 2-D kernels."""
    if name == "torch":
        dev = base.device
        starts = [t.to(dev) for t in starts]
        patch_starts = None if patch_starts is None else [t.to(dev) for t in patch_starts]
        if len(starts) == 2:
            return reference.gather(base, *starts, *sizes, patch,
                                    *(patch_starts or (None, None)), pad_value, out)
        return reference.gather_nd(base, starts, sizes, patch, patch_starts, pad_value, out)
    if name == "numba":
        from . import gather_cpu
        return gather_cpu.gather_nd(base, [t.cpu() for t in starts], sizes, patch,
                                    None if patch_starts is None else [t.cpu() for t in patch_starts],
                                    pad_value, out)
    from . import gather_cuda
    return gather_cuda.gather_nd(base, starts, sizes, patch, patch_starts, pad_value, out)


def paste(base, patch, patch_y0, patch_x0, *, backend="auto", out=None):
    """Full copies of ``base``, one per position, each with its patch written in.

    Args:
        base: float32 tensor ``(C, H, W)`` shared by all positions.
        patch: float32 tensor ``(B, C, ph, pw)`` on base's device.
        patch_y0, patch_x0: integer ``(B,)``: each patch's top-left corner in base
            coordinates; the part of a patch outside the base is dropped.
        backend, out: as for :func:`gather` (``out`` is ``(B, C, H, W)``).

    Returns:
        A new float32 tensor ``(B, C, H, W)`` (or ``out``); the same as
        ``gather(base, 0, 0, H, W, patch, patch_y0, patch_x0)`` for every position.

    >>> paste(torch.zeros(1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([-1, 1]),
    ...       torch.tensor([0, 1]))
    tensor([[[[1., 1.],
              [0., 0.]]],
    <BLANKLINE>
    <BLANKLINE>
            [[[0., 0.],
              [0., 1.]]]])
    """
    C, H, W = _check_base(base)
    if patch is None:
        raise ValueError("paste needs a patch (B, C, ph, pw); for plain copies use "
                         "base.expand(B, C, H, W)")
    py = _positions("patch_y0", patch_y0)
    B = py.shape[0]
    px = _positions("patch_x0", patch_x0, B, "patch_y0")
    _check_patch(patch, base, B, "patch_y0")
    _check_out(out, (B, C, H, W), base)
    name = _resolve_backend(backend, base, B * C * H * W)
    return _paste(name, base, patch, (py, px), out)


def paste_nd(base, patch, patch_starts, *, backend="auto", out=None):
    """:func:`paste` for 2 or 3 spatial axes: full patched copies of ``base`` ``(C, *S)``.

    Args:
        base: float32 tensor ``(C, H, W)`` or ``(C, D, H, W)`` shared by all positions.
        patch: float32 tensor ``(B, C, *P)`` on base's device.
        patch_starts: one integer ``(B,)`` per spatial axis: each patch's first
            corner; the part of a patch outside the base is dropped.
        backend, out: as for :func:`gather` (``out`` is ``(B, C, *S)``).

    Returns:
        A new float32 tensor ``(B, C, *S)`` (or ``out``), the same as
        ``gather_nd(base, zeros, S, patch, patch_starts)``; with two axes exactly
        :func:`paste`.

    >>> paste_nd(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 1, 1, 1), [[0], [1], [-1]])
    tensor([[[[[0., 0.],
               [0., 0.]]]]])
    """
    shape = _check_base(base, _ND_BASE)
    n = len(shape) - 1
    if patch is None:
        raise ValueError(f"paste needs a patch {_patch_shape(n)}; for plain copies use "
                         f"base.expand(B, *base.shape)")
    patch_starts = _axis_positions("patch_starts", patch_starts, n)
    B = patch_starts[0].shape[0]
    _check_patch(patch, base, B, "patch_starts[0]")
    _check_out(out, (B, *shape), base)
    name = _resolve_backend(backend, base, B * math.prod(shape))
    return _paste(name, base, patch, patch_starts, out)


def _paste(name, base, patch, patch_starts, out):
    """Run the validated paste on backend ``name``; 2 axes through the 2-D kernels."""
    if name == "torch":
        starts = [t.to(base.device) for t in patch_starts]
        if len(starts) == 2:
            return reference.paste(base, patch, *starts, out)
        return reference.paste_nd(base, patch, starts, out)
    if name == "numba":
        from . import gather_cpu
        return gather_cpu.paste_nd(base, patch, [t.cpu() for t in patch_starts], out)
    from . import gather_cuda
    return gather_cuda.paste_nd(base, patch, patch_starts, out)


def blend(values, indptr, indices, weights, *, backend="auto", out=None):
    """Per-window values blended per pixel, classes first, and each pixel's most probable class.

    Args:
        values: float32 CPU tensor ``(K, W)``, ``K >= 1`` classes by ``W`` windows
            (any strides).
        indptr, indices, weights: the CSR form of the ``(P, W)`` blend matrix ``A``
            (pixels x windows): integer ``(P + 1,)`` starting at 0, non-decreasing,
            ending at ``nnz``; integer ``(nnz,)`` in ``[0, W)``; float32 ``(nnz,)``.
            Tensors or numpy arrays (e.g. a ``scipy.sparse.csr_matrix``'s).
        backend: ``"auto"`` (``"numba"`` when available), ``"torch"`` or ``"numba"``.
        out: optional contiguous float32 CPU tensor ``(K, P)`` to write into.

    Returns:
        ``(out, best)``: ``out[k, p] = sum_j A[p, j] * values[k, j]`` (float32,
        summed from zero in CSR order on ``numba``, as ``scipy.sparse`` does) and
        ``best[p] = out[:, p].argmax()`` (int64 ``(P,)``, as ``torch.argmax``: the
        first maximum, a NaN counting as the maximum). A pixel without windows
        gets zeros and class 0.

    Raises:
        ValueError: an argument of the wrong type, shape, dtype or device, a CSR
            matrix that is not one, or a backend that is unknown or unavailable.

    >>> blend(torch.tensor([[1., 3.], [2., 2.]]), [0, 1, 3], [0, 0, 1],
    ...       torch.tensor([1., .5, .5]), backend="torch")
    (tensor([[1., 2.],
            [2., 2.]]), tensor([1, 0]))
    """
    values = _as_cpu_tensor("values", values)
    if values.dim() != 2 or values.shape[0] < 1 or values.dtype != torch.float32:
        raise ValueError(f"values must be float32 (K, W) with K >= 1 classes, got "
                         f"{values.dtype} {tuple(values.shape)}")
    indptr = _positions("indptr", indptr).cpu()
    if indptr.shape[0] < 1:
        raise ValueError("indptr must have P + 1 >= 1 entries")
    indices = _positions("indices", indices).cpu()
    weights = _as_cpu_tensor("weights", weights)
    nnz = indices.shape[0]
    if weights.dtype != torch.float32 or tuple(weights.shape) != (nnz,):
        raise ValueError(f"weights must be float32 ({nnz},) like indices, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if indptr[0] != 0 or indptr[-1] != nnz or bool((indptr.diff() < 0).any()):
        raise ValueError(f"indptr must start at 0, never decrease and end at nnz = {nnz}, got "
                         f"{indptr[0].item()} ... {indptr[-1].item()}")
    if nnz and (indices.min() < 0 or indices.max() >= values.shape[1]):
        raise ValueError(f"indices must lie in [0, {values.shape[1]}) (values' windows), got "
                         f"[{indices.min().item()}, {indices.max().item()}]")
    _check_out(out, (values.shape[0], indptr.shape[0] - 1), values)
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"unknown backend {backend!r} for blend: choose auto, torch or numba")
    if backend == "auto":
        backend = "numba" if "numba" in available_backends() else "torch"
    if backend == "torch":
        return reference.blend(values, indptr, indices, weights, out)
    if "numba" not in available_backends():
        raise ValueError("backend 'numba' is not available here (available: torch)")
    from . import blend_cpu
    return blend_cpu.blend(values, indptr, indices, weights, out)


@functools.cache
def available_backends() -> list[str]:
    """Backends usable in this process, ``"torch"`` first (``"auto"`` not listed).

    >>> available_backends()[0]
    'torch'
    """
    names = ["torch"]
    try:
        import numba  # noqa: F401
        names.append("numba")
    except ImportError:
        return names
    from . import gather_cuda
    # The simulator (NUMBA_ENABLE_CUDASIM) makes Numba report CUDA, but cannot run
    # on torch CUDA tensors: ask torch too.
    if torch.cuda.is_available() and gather_cuda.is_available():
        names.append("cuda")
    return names


def auto_backend(base: torch.Tensor, n_cells: int) -> str:
    """The backend ``backend="auto"`` picks for ``base`` and an output of ``n_cells``:
    :func:`choose_backend` for base's device and number of spatial axes.

    >>> auto_backend(torch.zeros(1, 2, 2), 4)
    'torch'
    >>> auto_backend(torch.zeros(1, 2, 2, 2), 8) in ("numba", "torch")
    True
    """
    return choose_backend(base.device.type, n_cells, base.dim() - 1)


def choose_backend(device: str, n_cells: int, n_axes: int = 2) -> str:
    """The gather/paste backend for an output of ``n_cells`` on ``device`` (``"cpu"``,
    ``"cuda"``, ...) with ``n_axes`` spatial axes (2 images, 3 volumes). The rule of
    ``backend="auto"``, and of the planner's per-layer choice.

    CUDA: ``"cuda"`` when Numba can launch on the GPU, else ``"torch"``. CPU:
    ``"numba"`` from :func:`numba_min_cells` output cells on, where its parallel
    copy loops beat torch's per-position slice copies, else ``"torch"``.

    >>> choose_backend("cpu", NUMBA_MIN_CELLS)
    'numba'
    >>> choose_backend("cpu", 100), choose_backend("cpu", 100, n_axes=3)
    ('torch', 'numba')
    """
    available = available_backends()
    if device == "cuda":
        return "cuda" if "cuda" in available else "torch"
    if device == "cpu" and "numba" in available and n_cells >= numba_min_cells(n_axes):
        return "numba"
    return "torch"


def numba_min_cells(n_axes: int) -> int:
    """Output cells from which Numba beats torch on the CPU, for ``n_axes`` spatial axes:
    :data:`NUMBA_MIN_CELLS` for images, :data:`NUMBA_MIN_CELLS_VOLUME` for volumes."""
    return NUMBA_MIN_CELLS if n_axes == 2 else NUMBA_MIN_CELLS_VOLUME


# --------------------------------------------------------------------------- checks

def _resolve_backend(backend, base, n_cells):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return auto_backend(base, n_cells)
    available = available_backends()
    if backend not in available:
        raise ValueError(f"backend {backend!r} is not available here "
                         f"(available: {', '.join(available)})")
    if backend == "numba" and base.device.type != "cpu":
        raise ValueError(f"backend 'numba' runs on the CPU but base is on {base.device}: "
                         "use backend='cuda' or 'torch'")
    if backend == "cuda" and base.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors but base is on {base.device}: "
                         "use backend='numba' or 'torch'")
    return backend


# base shapes accepted by the 2-D functions and by the N-D ones, by number of dimensions
_2D_BASE = {3: "(C, H, W)"}
_ND_BASE = {3: "(C, H, W)", 4: "(C, D, H, W)"}


def _check_base(base, shapes=_2D_BASE):
    if not isinstance(base, torch.Tensor):
        raise ValueError(f"base must be a torch tensor, got {type(base).__name__}")
    if base.dim() not in shapes:
        raise ValueError(f"base must have shape {' or '.join(shapes.values())}, got "
                         f"{tuple(base.shape)}: it is the materialized tensor shared by all "
                         "positions, without a batch dimension")
    if base.dtype != torch.float32:
        raise ValueError(f"base must be float32, got {base.dtype}")
    return tuple(base.shape)


def _check_patch(patch, base, B, batch_from="win_y0"):
    if not isinstance(patch, torch.Tensor):
        raise ValueError(f"patch must be a torch tensor, got {type(patch).__name__}")
    if patch.dim() != base.dim() + 1:
        raise ValueError(f"patch must have shape {_patch_shape(base.dim() - 1)}, got "
                         f"{tuple(patch.shape)}")
    if patch.dtype != torch.float32:
        raise ValueError(f"patch must be float32, got {patch.dtype}")
    if patch.device != base.device:
        raise ValueError(f"patch is on {patch.device} but base is on {base.device}: "
                         "put both on one device")
    if patch.shape[0] != B:
        raise ValueError(f"patch has {patch.shape[0]} positions but {batch_from} has {B}")
    if patch.shape[1] != base.shape[0]:
        raise ValueError(f"patch has {patch.shape[1]} channels but base has {base.shape[0]}")


def _patch_shape(n_axes):
    return "(B, C, ph, pw)" if n_axes == 2 else "(B, C, pd, ph, pw)"


def _check_out(out, shape, base):
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    if out.device != base.device:
        raise ValueError(f"out is on {out.device} but base is on {base.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous: the kernels write it in place")


def _as_cpu_tensor(name, value):
    """A CPU tensor from a tensor or numpy array (zero copy), for :func:`blend`."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device}: blend runs on the CPU")
    return value.detach()


def _positions(name, value, B=None, batch_from=None):
    """An int64 tensor ``(B,)`` from a tensor, numpy array or sequence of ints."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be integers of shape (B,), got {value!r}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name} has {t.shape[0]} positions but {batch_from} has {B}")
    return t.to(torch.int64)


def _axis_positions(name, value, n_axes, B=None, batch_from=None):
    """One int64 ``(B,)`` tensor per spatial axis, all of one length (``B`` when given)."""
    if isinstance(value, (torch.Tensor, np.ndarray)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a sequence of {n_axes} position tensors, one per "
                         f"spatial axis, got {type(value).__name__}")
    if len(value) != n_axes:
        raise ValueError(f"{name} has {len(value)} axes but base has {n_axes} spatial axes")
    if B is None:
        first = _positions(f"{name}[0]", value[0])
        B, batch_from = first.shape[0], f"{name}[0]"
    else:
        first = _positions(f"{name}[0]", value[0], B, batch_from)
    return (first, *(_positions(f"{name}[{k}]", v, B, batch_from)
                     for k, v in enumerate(value[1:], 1)))


def _sizes(value, n_axes):
    if isinstance(value, (torch.Tensor, np.ndarray)) or not hasattr(value, "__len__"):
        raise ValueError(f"sizes must be a sequence of {n_axes} positive ints, one per spatial "
                         f"axis, got {value!r}")
    if len(value) != n_axes:
        raise ValueError(f"sizes has {len(value)} axes but base has {n_axes} spatial axes")
    return tuple(_positive_int(f"sizes[{k}]", v) for k, v in enumerate(value))


def _pad_value(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"pad_value must be a number, got {value!r}") from None


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
