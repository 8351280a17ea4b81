"""``monai.visualize.OcclusionSensitivity``, computed incrementally: change one import.

>>> from kql.compat.monai import OcclusionSensitivity   # was: from monai.visualize import ...
>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
>>> occ_map, most_probable = OcclusionSensitivity(net, mask_size=8, verbose=False)(torch.rand(1, 1, 24, 32))
>>> tuple(occ_map.shape), tuple(most_probable.shape)
((1, 3, 24, 32), (1, 1, 24, 32))

Same constructor, same call, same tensors as MONAI (1.3 to 1.6), for images
``(1, C, H, W)`` and volumes ``(1, C, D, H, W)``: the map is ``(1, N, H, W)``
(``(1, N, D, H, W)``) with the N classes on axis 1 -- what MONAI returns,
whatever its docstring's ``BCHW(D)N`` says -- and the most probable class
``(1, 1, H, W)`` (``(1, 1, D, H, W)``). MONAI slides the mask over the image as
``sliding_window_inference`` slides a window: the step is ``int(mask_size *
(1 - overlap))`` (at least 1), the last window ends at the image's edge, and
every pixel gets the (Gaussian-weighted, for ``mode='gaussian'``) mean of the
outputs of the windows covering it. Here every window position is one
position of one incremental plan whose output is every class
(``kql.occlusion(..., target='all')``); the windows' outputs are then blended
as MONAI blends them, by one kernel (:func:`kql.kernels.blend`) that writes the
map and the most probable class in one pass. ``n_batch`` is a memory hint
only: the planner sizes batches itself.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = ["OcclusionSensitivity"]


class OcclusionSensitivity:
    """A drop-in for ``monai.visualize.OcclusionSensitivity``.

    Args:
        nn_module: the classifier.
        mask_size: the occluded box, one int for every spatial axis or one per axis.
        n_batch: images per batch in MONAI; a memory hint here.
        verbose: a progress bar.
        mode: what the occluded box holds: a float; ``'gaussian'`` (the image
            times 1 - a Gaussian, 0 at the centre; windows blended with
            Gaussian weights); ``'mean_patch'`` (the box times its mean: what
            MONAI computes, see :func:`_mean_patch`);
            ``'mean_img'`` (the image's mean); or a callable ``f(x,
            box)`` returning the occluded box (MONAI 1.6 accepts one but
            fails on it; here it works).
        overlap: overlap of neighbouring windows, ``0 <= overlap < 1``.
        activate: ``True``: softmax over the classes (sigmoid when the
            *input* has one channel, as MONAI does); ``False``: the raw
            output; a callable: applied to the output.
    """

    def __init__(self, nn_module: nn.Module, mask_size: Union[int, Sequence[int]] = 16, n_batch: int = 16,
                 verbose: bool = True, mode: Union[str, float, Callable] = "gaussian", overlap: float = 0.6,
                 activate: Union[bool, Callable] = True) -> None:
        if not isinstance(nn_module, nn.Module) and not callable(nn_module):
            raise TypeError(f"nn_module must be a torch.nn.Module, got {type(nn_module).__name__}")
        if isinstance(mode, str) and mode not in ("gaussian", "mean_patch", "mean_img"):
            raise NotImplementedError(f"mode must be 'gaussian', 'mean_patch', 'mean_img', a float or a "
                                      f"callable, got {mode!r}")
        self.nn_module = nn_module
        self.mask_size = mask_size
        self.n_batch = n_batch
        self.verbose = verbose
        self.overlap = overlap
        self.activate = activate
        self.mode = mode

    def __call__(self, x: torch.Tensor, b_box: Optional[Sequence[int]] = None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The occlusion map ``(1, N, *S)`` and the most probable class
        ``(1, 1, *S)``, both cropped to ``b_box`` when given.

        Args:
            x: one image ``(1, C, H, W)`` or volume ``(1, C, D, H, W)``.
            b_box: ``[min_1, max_1, min_2, max_2, ...]``, two per spatial
                axis; negative values mean the whole axis (as in MONAI).
            kwargs: further arguments of the module's forward.

        Raises:
            ValueError: a batch of more than one, a mask larger than the
                (boxed) image, a bad overlap or bounding box.
        """
        from kql.executor.allocator import reuse_freed_memory
        from kql.tensor_api import as_module, occlusion
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[0] > 1:
            raise ValueError("Expected batch size of 1.")
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be an image (1, C, H, W) or a volume (1, C, D, H, W), got shape "
                             f"{tuple(x.shape)}")
        if not isinstance(self.overlap, numbers.Real) or not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        shape = tuple(x.shape[2:])
        mask = _mask_size(self.mask_size, len(shape))
        box = [(0, n) for n in shape]
        if b_box is not None:
            box, mask = _crop(b_box, mask, shape)
        size = tuple(hi - lo for lo, hi in box)
        if any(m > g for g, m in zip(size, mask)):
            raise ValueError(f"Image (spatial shape) {size} should be bigger than mask {tuple(mask)}.")
        step = tuple(_scan_interval(g, m, self.overlap) for g, m in zip(size, mask))
        module = self.nn_module
        if kwargs:
            inner = module
            module = lambda inp: inner(inp, **kwargs)  # noqa: E731
        module, _ = as_module(module)
        activate = self.activate
        if callable(activate):
            score: Union[str, Callable] = activate
        elif activate:
            score = "sigmoid" if x.shape[1] == 1 else "softmax"
        else:
            score = "logits"
        # What is returned: the b_box itself (the windows' box is wider by half a
        # mask), where it lies in the image; the whole image without one.
        region = box
        if b_box is not None:
            lo = [max(int(b), 0) for b in b_box[0::2]]
            hi = [min(int(b) if b > 0 else s, s) for b, s in zip(b_box[1::2], shape)]
            region = [(a, max(a, b)) for a, b in zip(lo, hi)]
        # The blend's map (classes x pixels: 200 MB for 1000 classes at 224x224)
        # reuses the memory the query freed rather than faulting in fresh pages
        # (0.3-0.5 s of a 5.8 s call, measured): one allocator block for both.
        with reuse_freed_memory():
            was_training = self.nn_module.training if isinstance(self.nn_module, nn.Module) else None
            try:
                result = occlusion(module, x, tuple(mask), step, target="all", baseline=self._fill(x, mask),
                                   score=score, region=tuple(box),
                                   progress="on" if self.verbose else "off")[0]
            finally:
                if was_training:
                    self.nn_module.train()
            weights = _importance(mask, self.mode == "gaussian")
            out, most = _blend(result.maps, result.starts, weights, region)
        return out.to(x.device), most.to(x.device)

    def _fill(self, x: torch.Tensor, mask: Sequence[int]):
        """What a window holds, as the tensor API's baseline."""
        mode = self.mode
        if isinstance(mode, numbers.Real) and not isinstance(mode, bool):
            return float(mode)
        if mode == "mean_img":
            return float(x.mean().item())
        if mode == "mean_patch":
            return _mean_patch
        if mode == "gaussian":
            return _Multiply(_gaussian_mul(x.shape[1], mask).to(x.device))
        return _Custom(mode, x)


def _mask_size(mask_size, ndim: int = 2) -> list[int]:
    m = [mask_size] * ndim if isinstance(mask_size, numbers.Integral) else list(mask_size)
    if len(m) != ndim or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                                 for v in m):
        raise ValueError(f"mask_size must be a positive int or {ndim} of them (one per spatial axis), got "
                         f"{mask_size!r}")
    return [int(v) for v in m]


def _crop(b_box, mask, shape) -> tuple[list[tuple[int, int]], list[int]]:
    """MONAI's ``crop_meshgrid``: the box widened by half the mask, clipped,
    as ``(start, stop)`` per axis; the mask clipped to it."""
    if len(b_box) != 2 * len(shape) or not all(isinstance(b, numbers.Integral) for b in b_box):
        raise ValueError(f"b_box must be [min_1, max_1, ..., min_{len(shape)}, max_{len(shape)}] (ints, two "
                         f"per spatial axis), got {list(b_box)!r}")
    edge = [(m - 1) // 2 for m in mask]
    lo = [max(int(b) - e, 0) for b, e in zip(b_box[0::2], edge)]
    hi = [s if b == -1 else min(int(b) + e, s) for b, e, s in zip(b_box[1::2], edge, shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        raise ValueError(f"b_box {list(b_box)} is empty for an image of {tuple(shape)}")
    mask = [min(m, h - l) for m, l, h in zip(mask, lo, hi)]
    return list(zip(lo, hi)), mask


def _scan_interval(size: int, mask: int, overlap: float) -> int:
    """``sliding_window_inference``'s step."""
    if mask == size:
        return mask
    return max(int(mask * (1 - overlap)), 1)


def _importance(mask: Sequence[int], gaussian: bool, sigma_scale: float = 0.125) -> torch.Tensor:
    """``monai.data.utils.compute_importance_map``: the weight of each pixel
    of a window in the blend."""
    if not gaussian:
        return torch.ones(tuple(mask))
    out = None
    for m in mask:
        r = torch.arange(-(m - 1) / 2.0, (m - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(r ** 2 / (-2 * (m * sigma_scale) ** 2))
        out = g if out is None else out.unsqueeze(-1) * g[None]
    floor = max(torch.min(out).item(), 1e-3)
    return torch.clamp(out, min=floor)


def _blend(maps: np.ndarray, starts, weights: torch.Tensor,
           region: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel (voxel) of ``region`` (``(start, stop)`` per axis): the
    weighted mean of the outputs (``maps``, classes x grid) of the windows
    covering it (``sliding_window_inference``), 0 where none does; ``starts``
    the windows' first corner per axis, in the same (image) coordinates.
    Returns the map ``(1, classes, *size)`` and the most probable class
    ``(1, 1, *size)``, as ``torch.argmax`` over the classes.

    The blend is linear and the same for every class: one sparse matrix
    (region pixels x windows: each window's weights at its pixels in the
    region, every row divided by its sum) times the windows' values. With a
    thousand classes that is 200 MB at 224x224, so :func:`kql.kernels.blend`
    does the rest in one pass that computes only the returned pixels, writes
    the classes-first map directly and takes the most probable class on the
    way (the product, argmax and transposing copy it replaced cost 0.3 s more
    at 224x224; sums bit for bit those of ``scipy.sparse``'s product)."""
    import scipy.sparse as sp
    from kql import kernels
    maps = np.asarray(maps, dtype=np.float32)
    K = maps.shape[0]
    w = weights.float().numpy()
    lo = np.asarray([a for a, _ in region], dtype=np.int64)
    size = tuple(int(b - a) for a, b in region)
    # every window (C order over the grid) x every pixel of a window, in region coordinates
    corners = np.stack(np.meshgrid(*[np.asarray(s, dtype=np.int64) for s in starts], indexing="ij"),
                       -1).reshape(-1, len(size))
    offsets = np.stack(np.meshgrid(*[np.arange(m) for m in w.shape], indexing="ij"), -1).reshape(-1, len(size))
    pixels = (corners[:, None, :] + offsets[None, :, :] - lo).reshape(-1, len(size))
    inside = np.all((pixels >= 0) & (pixels < np.asarray(size)), axis=1)
    flat = np.ravel_multi_index(tuple(pixels[inside].T), size) if inside.any() else np.zeros(0, np.int64)
    window = np.repeat(np.arange(len(corners)), len(offsets))[inside]
    placed = sp.csr_matrix((np.tile(w.reshape(-1), len(corners))[inside], (flat, window)),
                           shape=(math.prod(size), len(corners)))
    count = np.asarray(placed.sum(axis=1), dtype=np.float32).reshape(-1)
    scale = np.divide(np.float32(1), count, out=np.zeros_like(count), where=count > 0)
    placed = (sp.diags(scale) @ placed).astype(np.float32).tocsr()
    blended, best = kernels.blend(maps.reshape(K, -1), placed.indptr, placed.indices, placed.data)
    return blended.reshape(1, K, *size), best.reshape(1, 1, *size)


def _gaussian_mul(channels: int, mask: Sequence[int], sigma: float = 0.25) -> torch.Tensor:
    """MONAI's ``gaussian_occlusion`` factor ``(C, *mask)``: 1 minus a
    Gaussian (``GaussianSmooth`` of a centred impulse, erf kernel truncated
    at 4 sigma), scaled to [0, 1]: 0 at the centre."""
    kernels = []
    for m in mask:
        s = torch.as_tensor(float(m * sigma))
        tail = int(max(float(s) * 4.0, 0.5) + 0.5)
        r = torch.arange(-tail, tail + 1, dtype=torch.float)
        t = 0.70710678 / torch.abs(s)
        k = (0.5 * ((t * (r + 0.5)).erf() - (t * (r - 0.5)).erf())).clamp(min=0)
        c = m // 2
        idx = torch.arange(m) - c + tail                     # the impulse at c, filtered with zero padding
        kernels.append(torch.where((idx >= 0) & (idx < len(k)), k[idx.clamp(0, len(k) - 1)], torch.zeros(())))
    g = kernels[0]
    for k in kernels[1:]:
        g = g.unsqueeze(-1) * k
    g = -g.expand(channels, *g.shape)
    lo, hi = g.min(), g.max()
    if hi == lo:
        return torch.zeros_like(g)
    return (g - lo) / (hi - lo)


class _Multiply:
    """Gaussian mode: each box is the image's box times the factor."""

    def __init__(self, mul: torch.Tensor):
        self.mul = mul

    def __call__(self, x: torch.Tensor, *starts_patch) -> torch.Tensor:
        return _boxes(x, *starts_patch) * self.mul.to(x.dtype)


def _mean_patch(x: torch.Tensor, *starts_patch) -> torch.Tensor:
    """``mean_patch`` as MONAI (1.3 to 1.6) computes it: its predictor
    unpacks ``constant_occlusion``'s ``(mul, add)`` as ``(add, mul)``, so each
    box is multiplied by its own mean (over all channels) rather than
    replaced by it. Done the same here, so the maps match."""
    boxes = _boxes(x, *starts_patch)
    means = boxes.reshape(len(boxes), -1).mean(dim=1)
    return boxes * means.view(-1, *[1] * (boxes.dim() - 1))


class _Custom:
    """A callable mode: ``mode(x, box)`` with x the ``(1, C, *S)`` input."""

    def __init__(self, fn: Callable, x: torch.Tensor):
        self.fn, self.x = fn, x

    def __call__(self, x: torch.Tensor, *starts_patch) -> torch.Tensor:
        boxes = _boxes(x, *starts_patch)
        return torch.cat([self.fn(self.x, box[None]) for box in boxes]).to(torch.float32)


def _boxes(x: torch.Tensor, *starts_patch) -> torch.Tensor:
    """The input's boxes ``(B, C, *patch)`` at the windows' starts (one array
    per axis, then the patch size)."""
    from kql import kernels
    *starts, patch = starts_patch
    at = [torch.as_tensor(np.asarray(s, dtype=np.int64), device=x.device) for s in starts]
    return kernels.gather_nd(x.float().contiguous(), at, tuple(patch), backend="torch")
