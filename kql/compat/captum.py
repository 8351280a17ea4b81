"""``captum.attr.Occlusion``, computed incrementally: change one import.

>>> from kql.compat.captum import Occlusion      # was: from captum.attr import Occlusion
>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
>>> attr = Occlusion(net).attribute(torch.randn(2, 3, 12, 12), sliding_window_shapes=(3, 4, 4),
...                                 strides=(3, 2, 2), target=1)
>>> tuple(attr.shape)
(2, 3, 12, 12)

Same constructor, same :meth:`Occlusion.attribute` signature, same tensor
(values to float rounding). Captum's windows start at multiples of the
stride and the last ones are clipped at the border; they are laid out the
same here (``kql.occlusion(..., grid='clip')``) and each input's windows run
as one incremental plan. ``perturbations_per_eval`` is a memory hint only:
the planner sizes batches itself.

Where the engine cannot run the forward function -- it cannot be traced by
torch.fx, takes tensor ``additional_forward_args``, the window does not span
all channels, the input is neither images ``(N, C, H, W)`` nor volumes
``(N, C, D, H, W)``, several input tensors, a
target Captum selects from a >2-D output, or a model in training mode -- it
is computed anyway by batched naive occlusion, with one warning saying why;
the result still equals Captum's.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from kql.errors import KqlError

__all__ = ["Occlusion"]


class Occlusion:
    """A drop-in for ``captum.attr.Occlusion``.

    Args:
        forward_func: the model (``nn.Module``) or a function around one.
    """

    def __init__(self, forward_func: Callable[..., torch.Tensor]) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func
        self._module: Optional[nn.Module] = None

    def attribute(self, inputs, sliding_window_shapes, strides=None, baselines=None, target=None,
                  additional_forward_args: Optional[Any] = None, perturbations_per_eval: int = 1,
                  show_progress: bool = False):
        """Occlusion attributions, shaped like ``inputs``, as Captum computes them.

        Raises:
            TypeError / ValueError: bad inputs, windows, strides, baselines or
                targets (Captum raises ``AssertionError`` for some of them).
        """
        is_tuple = isinstance(inputs, tuple)
        xs = inputs if is_tuple else (inputs,)
        if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
            raise TypeError("inputs must be a tensor or a tuple of tensors")
        windows = _windows(sliding_window_shapes, xs)
        steps = _strides(strides, xs)
        for i, (x, w, s) in enumerate(zip(xs, windows, steps)):
            rest = [d - k for d, k in zip(x.shape[1:], w)]
            if any(r < 0 for r in rest):
                raise ValueError(f"sliding window dimensions {w} cannot exceed input dimensions "
                                 f"{tuple(x.shape[1:])}")
            if any(r != 0 and st > k for r, st, k in zip(rest, s, w)):
                raise ValueError(f"stride dimension {s} cannot be larger than sliding window shape "
                                 f"dimension {w}")
        bases = _baselines(baselines, xs)
        if isinstance(perturbations_per_eval, bool) or not isinstance(perturbations_per_eval, int) \
                or perturbations_per_eval < 1:
            raise ValueError("perturbations_per_eval must be an integer and at least 1")
        args = () if additional_forward_args is None else (
            additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
        _check_count(target, len(xs[0]))
        why = self._why_naive(xs, windows, args, target)
        if why is None and not _negative(target):
            # the engine's own unoccluded forward checks the output against
            # the target (_CaptumScore): no separate forward pass here
            try:
                attr = self._exact(xs[0], windows[0], steps[0], bases[0], target, args, show_progress)
                return (attr,) if is_tuple else attr
            except _Untraceable as e:
                why = str(e)
        with torch.no_grad():
            output = _forward(self.forward_func, xs, args)
        initial = _select(output, target)
        if initial.numel() != len(xs[0]):
            raise ValueError(_one_per_example(initial.shape))
        if why is None:                  # negative targets, now known to be in range
            try:
                attr = self._exact(xs[0], windows[0], steps[0], bases[0], _nonnegative(target, output.shape[1]),
                                   args, show_progress)
                return (attr,) if is_tuple else attr
            except _Untraceable as e:
                why = str(e)
        warnings.warn(f"kql.compat.captum.Occlusion: {why}; computing with batched naive occlusion "
                      f"(no incremental speedup)", stacklevel=2)
        attrs = _naive(self.forward_func, xs, windows, steps, bases, target, args, initial,
                       max(perturbations_per_eval, 16))
        return attrs if is_tuple else attrs[0]

    # -- which path ---------------------------------------------------------------
    def _why_naive(self, xs, windows, args, target) -> Optional[str]:
        if len(xs) != 1:
            return "several input tensors"
        x, w = xs[0], windows[0]
        if x.dim() not in (4, 5):
            return f"the input is {x.dim()}-D, not images (N, C, H, W) or volumes (N, C, D, H, W)"
        if w[0] != x.shape[1]:
            return f"the window {w} does not span all {x.shape[1]} channels"
        if x.dtype != torch.float32:
            return f"the input is {x.dtype} (the engine computes in float32)"
        if any(isinstance(a, torch.Tensor) for a in args):
            return "additional_forward_args holds tensors"
        module = self.forward_func if isinstance(self.forward_func, nn.Module) else None
        if module is not None and module.training:
            return "the model is in training mode"
        from kql.tensor_api import float_dtypes
        held = float_dtypes(module) if module is not None else set()
        if held - {torch.float32}:
            return f"the model holds {', '.join(sorted(map(str, held)))} weights (the engine computes in float32)"
        if not (target is None or isinstance(target, numbers.Integral)
                or isinstance(target, torch.Tensor) and target.dim() <= 1
                or isinstance(target, list) and all(isinstance(t, numbers.Integral) for t in target)):
            return f"target {target!r} selects from a >2-D output"
        return None

    def _exact(self, x, window, stride, baseline, target, args, show_progress):
        from kql.tensor_api import as_module, occlusion
        fn = self.forward_func
        if args:
            base_fn = fn
            fn = lambda inp: base_fn(inp, *args)  # noqa: E731  (non-tensor extra arguments)
        if self._module is None or args:
            module, _ = as_module(fn)
            if not args:
                self._module = module
        else:
            module = self._module
        N = len(x)
        targets = [[0]] * N if target is None else _per_example(target, N)
        try:
            results = occlusion(module, x, tuple(window[1:]), tuple(stride[1:]), target=targets,
                                baseline=baseline, score=_CaptumScore(target), grid="clip",
                                progress="on" if show_progress else "off")
        except ValueError as e:
            if "cannot plan" in str(e):
                raise _Untraceable(str(e)) from None
            raise
        except KqlError as e:
            if isinstance(e.__cause__, _BadOutput):   # the output does not fit the target
                raise ValueError(str(e.__cause__)) from None
            raise
        maps = np.stack([r.attribution() for r in results])          # (N, H, W)
        attr = torch.from_numpy(maps).to(x.device)
        return attr[:, None].expand(N, x.shape[1], *maps.shape[1:]).contiguous()


class _BadOutput(ValueError):
    """The model's output does not give one value per example for the target."""


class _CaptumScore:
    """The engine's score: the raw output, checked as Captum's target
    selection checks it (``_select``), on every batch the engine runs
    (B examples): one value per example for ``target=None``; a ``(B, K)``
    output (trailing axes of size 1 allowed) for an int; exactly 2-D for a
    list or tensor of targets."""

    def __init__(self, target) -> None:
        self.kind = "none" if target is None else "int" if isinstance(target, numbers.Integral) or (
            isinstance(target, torch.Tensor) and target.numel() == 1) else "list"

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "list" and output.dim() != 2:
            raise _BadOutput(f"output must be 2D to select a list or tensor of targets; the forward "
                             f"function's output has shape {tuple(output.shape)}")
        if self.kind == "int" and output.dim() < 2:
            raise _BadOutput(f"cannot choose a target column with output shape {tuple(output.shape)}")
        selected = output if self.kind == "none" else output[:, 0]
        if output.dim() == 0 or selected.numel() != len(output):
            raise _BadOutput(_one_per_example(selected.shape))
        return output.reshape(len(output), -1)


def _check_count(target, N: int) -> None:
    """What :func:`_select` checks before it sees the output: one target per example."""
    if isinstance(target, torch.Tensor) and target.numel() not in (1, N):
        raise ValueError(f"tensor target of shape {tuple(target.shape)} is not valid for {N} examples")
    if isinstance(target, list) and len(target) != N:
        raise ValueError(f"target list length ({len(target)}) does not match the output ({N} examples)")


def _one_per_example(shape) -> str:
    return (f"the forward function's output selected by target has shape {tuple(shape)}: give a target "
            f"that selects one value per example")


def _negative(target) -> bool:
    if isinstance(target, numbers.Integral):
        return target < 0
    if isinstance(target, torch.Tensor):
        return bool((target < 0).any())
    if isinstance(target, list):
        return any(isinstance(t, numbers.Integral) and t < 0 for t in target)
    return False


def _nonnegative(target, classes: int):
    """Captum's negative int target (counted from the last class) as a class
    index (:func:`_select` has refused negative lists and tensors)."""
    if isinstance(target, (numbers.Integral, torch.Tensor)) and int(target) < 0:
        return int(target) % classes
    return target


class _Untraceable(Exception):
    pass


# -- Captum's argument formats ------------------------------------------------------
def _windows(shapes, xs) -> list[tuple[int, ...]]:
    if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], numbers.Integral):
        shapes = (shapes,)
    if not isinstance(shapes, tuple) or len(shapes) != len(xs):
        raise ValueError("sliding_window_shapes must be a tuple of ints (one tensor) or a tuple of such "
                         "tuples, one per input tensor")
    out = []
    for i, (w, x) in enumerate(zip(shapes, xs)):
        if not isinstance(w, tuple) or len(w) != x.dim() - 1 or not all(
                isinstance(v, numbers.Integral) and v >= 1 for v in w):
            raise ValueError(f"occlusion shape for input index {i} is {w} but should be a tuple of "
                             f"{x.dim() - 1} positive ints")
        out.append(tuple(int(v) for v in w))
    return out


def _strides(strides, xs) -> list[tuple[int, ...]]:
    if strides is None:
        strides = tuple(1 for _ in xs)
    if len(xs) == 1 and not (isinstance(strides, tuple) and len(strides) == 1):
        strides = (strides,)
    if not isinstance(strides, tuple) or len(strides) != len(xs):
        raise ValueError("strides must be provided for each input tensor")
    out = []
    for i, (s, x) in enumerate(zip(strides, xs)):
        if isinstance(s, numbers.Integral) and not isinstance(s, bool):
            s = (int(s),) * (x.dim() - 1)
        if not isinstance(s, tuple) or len(s) != x.dim() - 1 or not all(
                isinstance(v, numbers.Integral) and v >= 1 for v in s):
            raise ValueError(f"stride for input index {i} is {s}, which is invalid for input with shape "
                             f"{tuple(x.shape)}: it must be a positive int or a tuple of "
                             f"{x.dim() - 1} positive ints")
        out.append(tuple(int(v) for v in s))
    return out


def _baselines(baselines, xs) -> list:
    if baselines is None:
        baselines = tuple(0.0 for _ in xs)
    if not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(xs):
        raise ValueError(f"{len(baselines)} baselines for {len(xs)} input tensors")
    out = []
    for b, x in zip(baselines, xs):
        if isinstance(b, bool) or not isinstance(b, (torch.Tensor, int, float)):
            raise TypeError(f"baseline input argument must be either a torch.Tensor or a number, "
                            f"got {type(b).__name__}")
        if isinstance(b, torch.Tensor):
            try:
                torch.broadcast_shapes(b.shape, x.shape)
            except RuntimeError:
                raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to the input "
                                 f"{tuple(x.shape)}") from None
            b = b.to(x.device)
        out.append(b)
    return out


def _forward(fn, xs, args):
    out = fn(*xs, *args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(out)
    return out


def _select(output: torch.Tensor, target) -> torch.Tensor:
    """Captum's ``_select_targets``, with ValueErrors."""
    if target is None:
        return output
    if isinstance(target, torch.Tensor):
        if target.numel() == 1:
            target = int(target.item())
        elif target.dim() == 1 and target.numel() == output.shape[0]:
            if output.dim() != 2:
                raise ValueError("output must be 2D to select tensor of targets")
            if bool(((target < 0) | (target >= output.shape[1])).any()):
                raise ValueError(f"targets {target.tolist()} out of range: the output has {output.shape[1]} "
                                 f"columns")
            return torch.gather(output, 1, target.reshape(len(output), 1).to(output.device)).squeeze(-1)
        else:
            raise ValueError(f"tensor target of shape {tuple(target.shape)} is not valid for output "
                             f"{tuple(output.shape)}")
    if isinstance(target, (numbers.Integral, tuple)):
        t = (int(target),) if isinstance(target, numbers.Integral) else target
        if len(t) > output.dim() - 1:
            raise ValueError(f"cannot choose target column {target} with output shape {tuple(output.shape)}")
        for axis, v in enumerate(t, start=1):
            if isinstance(v, numbers.Integral) and not -output.shape[axis] <= v < output.shape[axis]:
                raise ValueError(f"target {target} is out of range for output shape {tuple(output.shape)}")
        return output[(slice(None), *t)]
    if isinstance(target, list):
        if len(target) != output.shape[0]:
            raise ValueError(f"target list length ({len(target)}) does not match the output "
                             f"({output.shape[0]} examples)")
        if all(isinstance(t, numbers.Integral) for t in target):
            if output.dim() != 2:
                raise ValueError("output must be 2D to select a list of targets")
            if any(not 0 <= t < output.shape[1] for t in target):
                raise ValueError(f"targets {target} out of range: the output has {output.shape[1]} columns")
            return torch.gather(output, 1, torch.tensor(target, device=output.device).reshape(-1, 1)).squeeze(-1)
        if all(isinstance(t, tuple) for t in target):
            return torch.stack([output[(i,) + t] for i, t in enumerate(target)])
        raise ValueError(f"target list elements must all be ints or all tuples, got {target!r}")
    raise TypeError(f"target type {type(target).__name__} is not valid")


def _per_example(target, N: int) -> list[list[int]]:
    if isinstance(target, torch.Tensor):
        flat = target.reshape(-1).tolist()
        return [[int(flat[0])]] * N if len(flat) == 1 else [[int(t)] for t in flat]
    if isinstance(target, numbers.Integral):
        return [[int(target)]] * N
    return [[int(t)] for t in target]


# -- batched naive, exactly as Captum lays the windows out ---------------------------
def _naive(fn, xs, windows, steps, bases, target, args, initial, batch: int) -> tuple:
    N = len(xs[0])
    initial = initial.reshape(N).float()
    out = []
    with torch.no_grad():
        for i, (x, w, s, b) in enumerate(zip(xs, windows, steps, bases)):
            counts = [math.ceil((d - k) / st) + 1 if d > k else 1 for d, k, st in zip(x.shape[1:], w, s)]
            starts = np.stack(np.meshgrid(*[np.arange(c) * st for c, st in zip(counts, s)], indexing="ij"),
                              -1).reshape(-1, len(w))
            total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            weight = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
            base = torch.as_tensor(b, dtype=x.dtype, device=x.device)
            for lo in range(0, len(starts), batch):
                chunk = starts[lo:lo + batch]
                masks = torch.zeros((len(chunk),) + tuple(x.shape[1:]), dtype=torch.bool, device=x.device)
                for j, st in enumerate(chunk):
                    masks[(j,) + tuple(slice(int(a), int(a) + k) for a, k in zip(st, w))] = True
                m = masks[:, None]                                         # (k, 1, ...)
                ablated = torch.where(m, base.expand(x.shape)[None], x[None])  # (k, N, ...)
                batch_in = list(xs)
                batch_in[i] = ablated.reshape((-1,) + tuple(x.shape[1:]))
                for j, other in enumerate(xs):
                    if j != i:
                        batch_in[j] = other.repeat((len(chunk),) + (1,) * (other.dim() - 1))
                extra = tuple(a.repeat((len(chunk),) + (1,) * (a.dim() - 1))
                              if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == N else a
                              for a in args)
                rep_target = target
                if isinstance(target, list):
                    rep_target = target * len(chunk)
                elif isinstance(target, torch.Tensor) and target.numel() == N and N > 1:
                    rep_target = target.repeat(len(chunk))
                modified = _select(_forward(fn, batch_in, extra), rep_target).reshape(len(chunk), N).float()
                diff = initial[None] - modified                            # (k, N)
                view = (len(chunk), N) + (1,) * (x.dim() - 1)
                total += (diff.reshape(view) * m.float()).sum(0)
                weight += masks.float().sum(0)
            out.append(total / weight)
    return tuple(out)
