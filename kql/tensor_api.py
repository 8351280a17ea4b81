"""The tensor API: occlusion maps of inputs already in the model's space.

People who explain CNN predictions from their own PyTorch code hold a model
and a normalised batch, not an image file and a query string.
:func:`occlusion` takes those, plans each input with the planner the query
language uses (``planner.binder.bind_input`` then ``planner.optimizer``'s
rules) and runs the same executors, so one incremental run yields the maps of
every requested class:

>>> import torch, torch.nn as nn, kql
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
>>> results = kql.occlusion(net, torch.randn(2, 3, 16, 16), patch=4, stride=4, target=[1, 3])
>>> [r.heatmap.shape for r in results], [r.label for r in results]
([(4, 4), (4, 4)], [1, 3])

Volumes ``(N, C, D, H, W)`` take a patch and stride per axis (or one number
for a cube) and give ``(nd, nh, nw)`` heatmaps.

The drop-ins ``kql.compat.captum`` and ``kql.compat.monai`` are built on it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import numbers
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kql import ast
from kql.catalog import Catalog
from kql.errors import ExecutionError, KqlError, PlanError, QueryInterrupted

__all__ = ["occlusion", "as_module", "in_float32", "float_dtypes", "SCORES"]

SCORES = ("softmax", "sigmoid", "logits")
GRIDS = ("edge", "clip")
MODES = ("exact", "naive", "approx")

Target = Union[None, int, str, Sequence[Any], torch.Tensor]


def occlusion(model: Union[nn.Module, Callable], inputs: torch.Tensor, patch, stride, *,
              target: Target = None, top: Optional[int] = None,
              baseline: Union[float, Sequence[float], torch.Tensor] = 0.0,
              score: Union[str, Callable] = "softmax", region: Optional[Sequence[int]] = None,
              mode: str = "exact", tau: Optional[float] = None, grid: str = "edge",
              batch_size: Optional[int] = None, memory_limit: Optional[str] = None,
              progress: str = "off") -> list:
    """Occlusion maps of a batch of inputs, one result per input.

    Args:
        model: an ``nn.Module`` or a function around modules (``lambda x:
            net(x).softmax(1)``) that torch.fx can trace; it is put in eval
            mode.
        inputs: ``(N, C, H, W)`` images or ``(N, C, D, H, W)`` volumes in
            the model's space (already normalised), or one ``(C, H, W)``
            image.
        patch: the occluding window: one int (a square, or a cube on
            volumes), one per spatial axis (``(h, w)``, ``(d, h, w)``), or
            that preceded by ``C`` (spanning all channels).
        stride: one int or one per spatial axis.
        target: the classes to map. ``None``: the top class of each input;
            an int: that class for every input; ``"all"``: every class; a
            sequence (or 1-D tensor) of length N: one entry per input, each an
            int or a list of ints (several maps from one run).
        top: instead of ``target``, the ``top`` highest-scoring classes of
            each unoccluded input.
        baseline: what the patch holds: a scalar, one value per channel, a
            tensor broadcastable to ``inputs`` as torch broadcasts (each
            patch takes the part of it under the patch; one value per channel
            as a tensor is ``(C, 1, 1)``), or a function ``f(input, ys, xs,
            (ph, pw))`` of one input ``(C, H, W)`` and a batch of patch
            corners returning the patches ``(B, C, ph, pw)`` (e.g. the input
            blurred, or scaled by a mask); on volumes ``f(input, ds, ys,
            xs, (pd, ph, pw))`` returning ``(B, C, pd, ph, pw)``.
        score: what the maps hold: ``"softmax"`` (probabilities),
            ``"sigmoid"``, ``"logits"`` (the model's raw output), or a
            callable ``output -> (B, K)`` tensor.
        region: occlude only this crop: ``(x0, y0, x1, y1)`` on images,
            or one ``(start, stop)`` per spatial axis in tensor order
            (``((d0, d1), (h0, h1), (w0, w1))`` on volumes).
        mode: ``"exact"`` (incremental, equal to naive up to float rounding),
            ``"naive"`` or ``"approx"`` (with ``tau``, the projective-field
            threshold in (0, 1]).
        grid: ``"edge"``: the last row and column of windows are shifted
            inward to end at the region's edge (the query language's grid);
            ``"clip"``: windows start at multiples of the stride and the last
            ones are clipped at the edge (Captum's).
        batch_size: positions per batch (default: from ``memory_limit``).
        memory_limit: e.g. ``"2GB"``: what a batch may take.
        progress: ``"off"``, ``"on"`` or ``"auto"``.

    Returns:
        A list of N :class:`kql.HeatmapResult`, one per input, each with a
        map per target (``maps``, ``labels``, ``originals``), its timings and
        its plan (``result.plan``).

    Raises:
        TypeError: ``model`` or ``inputs`` of the wrong type.
        ValueError: a bad shape, patch, stride, region, baseline, target,
            score or mode, or a model torch.fx cannot trace (the message
            says where tracing stopped).

    The engine computes in float32: a module with float64 (or half)
    weights is run as a float32 copy, with a warning; a function around
    such modules is refused (``TypeError``: pass ``model.float()``).
    """
    module, name = as_module(model)
    module = in_float32(module, name)
    x = _check_inputs(inputs)
    N, C, *S = x.shape
    patch_hw = _per_axis(patch, "patch", len(S), C)
    stride_hw = _per_axis(stride, "stride", len(S))
    fills = _baselines(baseline, x)
    scorer = _scorer(score)
    targets = _targets(target, top, N)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be 'edge' or 'clip', got {grid!r}")
    if grid == "clip" and callable(baseline) and not isinstance(baseline, torch.Tensor):
        raise ValueError("grid='clip' takes a number, per-channel values or a tensor as baseline, "
                         "not a function")
    if mode == "approx" and tau is None:
        raise ValueError("mode='approx' needs tau, the projective-field threshold in (0, 1]")
    if tau is not None and mode != "approx":
        raise ValueError(f"tau applies to mode='approx', not mode={mode!r}")
    settings = _settings(x.device.type, batch_size, memory_limit, progress)
    spec = _spec(name, module, C)
    graph = _graph(spec, (C, *S))
    select = ast.Select(source=ast.Source("name", "inputs"), model=name, patch=patch_hw,
                        stride=stride_hw, label=ast.Label("predicted"), region=_region(region, len(S)),
                        mode=mode, approx=None if tau is None else ast.Approx("tau", float(tau)),
                        batch=batch_size, device=x.device.type)
    results = []
    for n in range(N):
        results.append(_one(select, spec, graph, x[n], fills[n], scorer, targets[n], settings, grid,
                            f"inputs[{n}]"))
    return results


# -- one input ---------------------------------------------------------------------
def _one(select, spec, graph, x: torch.Tensor, fill, scorer, target, settings, grid: str, desc: str):
    from kql import compiler

    start = time.perf_counter()
    plan = compile_tensor(dataclasses.replace(select, label=_label(target)), spec, graph, x, fill, settings,
                          grid, desc)
    t_plan = time.perf_counter() - start
    try:
        result = compiler.run(plan, settings.progress, score=scorer.scores, score_name=scorer.name)
    except ExecutionError as e:
        if e.__cause__ is not None or isinstance(e, QueryInterrupted):  # the model failed, or Ctrl-C
            raise
        raise ValueError(f"target of {desc}: {e}") from None  # a class beyond the model's outputs
    if isinstance(plan.fill, _ClippedFill):  # grid='clip': where each window starts
        _set_starts(result, plan.fill.window_starts)
    result.timings = {"plan": t_plan, **result.timings, "total": time.perf_counter() - start}
    return result


def _label(target) -> ast.Label:
    """The LABEL clause of one input's targets (see :func:`_targets`)."""
    if target[0] == "predicted":
        return ast.Label("predicted")
    if target[0] == "all":
        return ast.Label("all")
    if target[0] == "top":
        return ast.Label("top", target[1])
    if len(target) == 1:
        return ast.Label("index", target[0])
    return ast.Label("list", tuple(ast.Label("index", t) for t in target))


def compile_tensor(select, spec, graph, x: torch.Tensor, fill, settings, grid: str = "edge",
                   desc: str = "input"):
    """Bind and optimize one model-space input ``x`` (``(C, H, W)`` or
    ``(C, D, H, W)``): the query language's path (``bind_input`` then the optimizer's rules,
    ``kql.compiler.optimize_bound``), with ``fill`` the patch's content
    (``(C,)``, a ``(C, H, W)`` baseline or a function) and, for
    ``grid='clip'``, the rule that clips the last windows at the edge."""
    from kql.compiler import optimize_bound
    from kql.planner.binder import bind_input
    from kql.planner.optimizer import RULES
    C, *S = x.shape
    if isinstance(fill, _PatchFill):
        fill.patch = select.patch
    shown = "baseline function" if isinstance(fill, _PatchFill) else "baseline tensor" if fill.dim() > 1 else \
        ("(" + ", ".join(f"{float(v):.3g}" for v in fill) + ")" if C <= 4 else f"{C} channel values")
    t0 = time.perf_counter()
    plan = bind_input(select, spec, graph, x, _display(x), fill, settings, select.device,
                      image_desc=f"tensor {desc}", original_hw=tuple(S), fill_text=shown)
    rules = RULES
    if grid == "clip":
        i = RULES.index(next(r for r in RULES if r.__name__ == "resolve_region")) + 1
        rules = RULES[:i] + (clip_windows,) + RULES[i:]
    t1 = time.perf_counter()
    try:
        plan = optimize_bound(plan, settings, rules)
    except PlanError as e:
        raise ValueError(str(e)) from None
    plan.timings = {"bind": t1 - t0, "optimize": time.perf_counter() - t1}
    return plan


def _set_starts(result, starts) -> None:
    """Give a result the windows' starts (``(ys, xs)``, or ``(zs, ys, xs)`` on volumes)."""
    if len(starts) == 3:
        result.zs = np.asarray(starts[0], dtype=np.int64)
    result.ys, result.xs = (np.asarray(s, dtype=np.int64) for s in starts[-2:])


def clip_windows(plan):
    """Rule (tensor API, ``grid='clip'``): windows start at multiples of the
    stride and the last ones on every axis are clipped at the region's edge,
    as Captum lays them out. The grid keeps its positions (the last ones end
    at the edge); their patch holds the baseline only where the clipped
    window lies and the input elsewhere, so the changed regions stay a
    superset."""
    starts, bounds = plan.grid.starts, plan.grid.bounds
    windows = tuple(lo + st * np.arange(len(s)) for s, (lo, _), st in zip(starts, bounds, plan.stride))
    if any((w != s).any() for w, s in zip(windows, starts)):
        plan.fill = _ClippedFill(plan.input, plan.fill, starts, windows, plan.patch)
        what = "row/column" if len(starts) == 2 else "window on every axis"
        plan.record("clip_windows", f"last {what} clipped at the edge: "
                    + " x ".join(f"{int(w[-1])}..{hi}" for w, (_, hi) in zip(windows, bounds)))
    else:
        plan.record("clip_windows", "the windows end at the edge: nothing to clip")
    return plan


class _ClippedFill:
    """Patch contents for clipped windows: the baseline from each window's
    start on, the input before it (``executor.common.patch_values``)."""

    def __init__(self, x, fill, starts, window_starts, patch):
        C, *S = x.shape
        self.x = x
        self.base = (fill.view(C, *[1] * len(S)) if fill.dim() == 1 else fill).expand(x.shape).contiguous()
        self.shift = [dict(zip(np.asarray(s).tolist(), (w - s).tolist())) for s, w in zip(starts, window_starts)]
        self.window_starts = window_starts
        self.patch = patch

    def __call__(self, *starts: np.ndarray) -> torch.Tensor:
        from kql import kernels
        at = [torch.as_tensor(np.asarray(s), dtype=torch.int64) for s in starts]
        base = kernels.gather_nd(self.base, at, self.patch, backend="torch")
        inp = kernels.gather_nd(self.x.float().contiguous(), at, self.patch, backend="torch")
        inside = torch.ones(inp.shape, dtype=torch.bool)
        n = len(self.patch)
        for axis, (s, shift, size) in enumerate(zip(starts, self.shift, self.patch)):
            d = torch.tensor([shift[int(v)] for v in s]).view(-1, *[1] * (n + 1))
            inside &= torch.arange(size).view(*[1] * (2 + axis), size, *[1] * (n - axis - 1)) >= d
        return torch.where(inside, base, inp)


# -- scores and targets ----------------------------------------------------------
class _Scorer:
    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def scores(self, output) -> torch.Tensor:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the model returned {type(output).__name__}, not a tensor of class scores")
        out = self.fn(output.reshape(output.shape[0], -1).float() if self.name != "custom" else output)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"score returned {type(out).__name__}, not a tensor")
        return out.reshape(out.shape[0], -1).float()


def _scorer(score) -> _Scorer:
    if callable(score):
        return _Scorer("custom", score)
    if score == "softmax":
        def softmax(out):
            if out.shape[1] == 1:
                raise ValueError("score='softmax' of a single output is always 1: use score='sigmoid' "
                                 "or 'logits'")
            return torch.softmax(out, dim=1)
        return _Scorer("softmax", softmax)
    if score == "sigmoid":
        return _Scorer("sigmoid", torch.sigmoid)
    if score == "logits":
        return _Scorer("logits", lambda out: out)
    raise ValueError(f"score must be 'softmax', 'sigmoid', 'logits' or a callable, got {score!r}")


def _targets(target, top, N: int) -> list:
    """Per input: ``("predicted",)``, ``("all",)``, ``("top", k)`` or a list of ints."""
    if top is not None:
        if target is not None:
            raise ValueError("give target or top, not both")
        if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
            raise ValueError(f"top must be a positive int, got {top!r}")
        return [("top", int(top))] * N
    if target is None:
        return [("predicted",)] * N
    if isinstance(target, str):
        if target.lower() != "all":
            raise ValueError(f"target takes an int, 'all', or one entry per input, got {target!r}")
        return [("all",)] * N
    if isinstance(target, torch.Tensor):
        if target.dim() == 0 or target.numel() == 1 and N != 1:
            return [[_class(target.reshape(-1)[0])]] * N
        if target.dim() != 1 or len(target) != N:
            raise ValueError(f"target tensor must hold one class per input ({N}), got shape "
                             f"{tuple(target.shape)}")
        return [[_class(v)] for v in target]
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return [[_class(target)]] * N
    if isinstance(target, (list, tuple)):
        if len(target) != N:
            raise ValueError(f"target must be an int, 'all', or one entry per input: {N} inputs, "
                             f"{len(target)} targets (several classes of one input: [[c1, c2, ...]])")
        out = []
        for t in target:
            if isinstance(t, (list, tuple)) or isinstance(t, torch.Tensor) and t.dim() == 1:
                if len(t) == 0:
                    raise ValueError("a list of targets must not be empty")
                out.append([_class(v) for v in t])
            else:
                out.append([_class(t)])
        return out
    raise TypeError(f"target must be None, an int, 'all', a sequence or a 1-D tensor, got "
                    f"{type(target).__name__}")


def _class(v) -> int:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"a target must be a class index >= 0, got {v!r}")
    return int(v)


# -- checks --------------------------------------------------------------------------
def as_module(model) -> tuple[nn.Module, str]:
    """``(module, name)``: ``model`` itself, or a function around modules
    wrapped so torch.fx can trace it (the modules it closes over, is bound
    to or reads as globals become submodules).

    Raises:
        TypeError: ``model`` is neither a module nor a callable.
    """
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a function around one, got "
                        f"{type(model).__name__}")
    return _Forward(model, _modules_of(model)), getattr(model, "__name__", type(model).__name__)


def float_dtypes(module: nn.Module) -> set:
    """The floating-point dtypes of ``module``'s parameters and buffers."""
    return {t.dtype for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()}


def in_float32(module: nn.Module, name: str, stacklevel: int = 4) -> nn.Module:
    """``module`` with float32 weights: ``module`` itself, or a float32
    copy of it (with a warning) where it holds other floating-point
    weights or buffers; the engine's views, kernels and memory sizing are
    float32. The user's module is never changed.

    Raises:
        TypeError: a function around such modules (its code calls the
            originals, so a copy would not be what runs), or a module that
            cannot be copied.
    """
    dtypes = float_dtypes(module)
    if dtypes <= {torch.float32}:
        return module
    held = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    advice = f"KQL computes in float32: pass a float32 model ({name}.float()), or a copy of it"
    if isinstance(module, _Forward):
        raise TypeError(f"the function {name!r} runs modules with {held} weights; {advice}")
    try:
        copied = copy.deepcopy(module).float()
    except Exception as e:  # noqa: BLE001 - any failure to copy is the same answer
        raise TypeError(f"model {name!r} holds {held} weights and cannot be copied "
                        f"({type(e).__name__}: {e}); {advice}") from None
    warnings.warn(f"model {name!r} holds {held} weights: KQL computes in float32, so the maps come from a "
                  f"float32 copy of it and agree with the model's own outputs to float32 rounding",
                  stacklevel=stacklevel)           # 4: the caller of kql.occlusion or of a drop-in
    return copied


class _Forward(nn.Module):
    """A forward function as a module: what it calls are its submodules."""

    def __init__(self, fn: Callable, modules: list[nn.Module]):
        super().__init__()
        self.fn = fn
        for i, m in enumerate(modules):
            self.add_module(f"module{i}", m)

    def forward(self, x):
        return self.fn(x)


def _modules_of(fn, depth: int = 0) -> list[nn.Module]:
    found: list[nn.Module] = []

    def add(obj):
        if isinstance(obj, nn.Module):
            if all(obj is not m for m in found):
                found.append(obj)
        elif callable(obj) and depth < 3 and not isinstance(obj, type):
            for m in _modules_of(obj, depth + 1):
                add(m)

    if isinstance(fn, functools.partial):
        add(fn.func)
        for a in list(fn.args) + list(fn.keywords.values()):
            add(a)
    self_ = getattr(fn, "__self__", None)
    if isinstance(self_, nn.Module):
        add(self_)
    code = getattr(fn, "__code__", None)
    if code is not None:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                add(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        globs = getattr(fn, "__globals__", {})
        for name in code.co_names:
            if isinstance(globs.get(name), nn.Module):
                add(globs[name])
    return found


def _check_inputs(inputs) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (N, C, H, W), got {type(inputs).__name__}")
    if inputs.dim() == 3:
        inputs = inputs[None]
    if inputs.dim() not in (4, 5) or 0 in inputs.shape:
        raise ValueError(f"inputs must be (N, C, H, W) images, (N, C, D, H, W) volumes or one (C, H, W) image, "
                         f"got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {inputs.dtype}")
    return inputs.detach().float()


def _per_axis(value, what: str, ndim: int = 2, channels: Optional[int] = None) -> tuple[int, ...]:
    """``value`` as one int per spatial axis (``ndim`` of them): an int for
    every axis, one per axis, or (given ``channels``) that preceded by the
    channel count."""
    v = value
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v,) * ndim
    if not isinstance(v, (tuple, list)) or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in v):
        raise TypeError(f"{what} must be an int or a tuple of ints, got {value!r}")
    axes = "h, w" if ndim == 2 else "d, h, w"
    if channels is not None and len(v) == ndim + 1:
        if v[0] != channels:
            kind = "2-D images" if ndim == 2 else "volumes"
            raise ValueError(f"{what} {tuple(v)} must span all {channels} channels (C, {axes}): the inputs are "
                             f"{kind}, so give one size per axis ({axes})")
        v = v[1:]
    if len(v) != ndim:
        form = f"{axes[0]}, ({axes})" + (f" or (C, {axes})" if channels else "")
        kind = "images" if ndim == 2 else "volumes"
        raise ValueError(f"{what} must be {form} on {kind}, got {value!r}")
    if min(v) < 1:
        raise ValueError(f"{what} must be at least 1, got {tuple(v)}")
    return tuple(int(a) for a in v)


def _baselines(baseline, x: torch.Tensor) -> list[torch.Tensor]:
    """Per input, the patch content: ``(C,)`` or a ``(C, *S)`` baseline."""
    N, C = x.shape[:2]
    if callable(baseline) and not isinstance(baseline, torch.Tensor):
        return [_PatchFill(baseline, x[n]) for n in range(N)]
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return [torch.full((C,), float(baseline))] * N
    if isinstance(baseline, (list, tuple)):
        try:
            baseline = torch.tensor([float(v) for v in baseline])
        except (TypeError, ValueError):
            raise TypeError(f"baseline must be a number, one per channel, or a tensor; got {baseline!r}") \
                from None
        if baseline.numel() != C:
            raise ValueError(f"baseline has {baseline.numel()} values; give one per channel ({C})")
        return [baseline] * N
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"baseline must be a number, one per channel, or a tensor; got "
                        f"{type(baseline).__name__}")
    b = baseline.detach().float().to(x.device)
    if b.numel() == 1:
        return [b.reshape(1).expand(C).clone()] * N
    try:
        full = torch.broadcast_to(b, x.shape)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to the inputs "
                         f"{tuple(x.shape)}") from None
    out = []
    for n in range(N):
        one = full[n]
        flat = one.reshape(C, -1)
        per_channel = (flat == flat[:, :1]).all() if one.numel() else False
        out.append(flat[:, 0].clone() if per_channel else one.contiguous())
    return out


class _PatchFill:
    """A callable baseline bound to one input: ``fill(ys, xs)`` (``fill(ds,
    ys, xs)`` on volumes) for the executors (``executor.common.patch_values``)."""

    def __init__(self, fn: Callable, x: torch.Tensor):
        self.fn, self.x, self.patch = fn, x, None

    def __call__(self, *starts: np.ndarray) -> torch.Tensor:
        out = self.fn(self.x, *starts, self.patch)
        want = (len(starts[0]), self.x.shape[0], *self.patch)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"baseline(input, ys, xs, patch) must return a tensor of shape {want}, got {got}")
        return out


def _region(region, ndim: int = 2) -> Optional[ast.Region]:
    """The REGION of ``region``: ``(x0, y0, x1, y1)`` on images, or one
    ``(start, stop)`` per spatial axis in tensor order."""
    if region is None:
        return None
    if isinstance(region, ast.Region):
        return region
    try:
        pairs = [tuple(int(v) for v in axis) for axis in region]
        if len(pairs) != ndim or any(len(p) != 2 for p in pairs):
            raise ValueError
    except (TypeError, ValueError):
        pairs = None
    if pairs is not None:
        return ast.Region.from_bounds(pairs)
    if ndim != 2:
        raise ValueError(f"region must be one (start, stop) per spatial axis, ((d0, d1), (h0, h1), (w0, w1)), "
                         f"got {region!r}")
    try:
        x0, y0, x1, y1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ValueError(f"region must be (x0, y0, x1, y1) or ((y0, y1), (x0, x1)), got {region!r}") from None
    return ast.Region(x0, y0, x1, y1)


def _settings(device: str, batch_size, memory_limit, progress):
    from kql.settings import Settings
    s = Settings()
    try:
        s = s.with_option("device", device).with_option("progress", progress)
        if batch_size is not None:
            s = s.with_option("batch_size", batch_size)
        if memory_limit is not None:
            s = s.with_option("memory_limit", memory_limit)
    except PlanError as e:
        raise ValueError(str(e)) from None
    return s


def _spec(name: str, module: nn.Module, channels: int):
    from kql.sources import ModelSpec
    return ModelSpec(name=name, module=module, input_size=None, mean=(0.0,) * channels,
                     std=(1.0,) * channels, channels=channels, class_names=None, weights="bound from Python",
                     warning=None, num_classes=None)


_CATALOG = Catalog(keep_graphs=8)  # its graphs: the last few (module, shape) pairs traced


def _graph(spec, shape):
    """The traced graph (``Catalog.graph``), cached for the last few (module, shape) pairs."""
    try:
        return _CATALOG.graph(spec, shape)
    except KqlError as e:
        raise ValueError(f"cannot plan {spec.name}: {e}") from None


def _display(x: torch.Tensor) -> np.ndarray:
    """A picture in [0, 1] of a model-space input, for figures: an image
    ``HxWx3``, each channel of an RGB input (the mean of other channel
    counts) scaled to its own range; a volume ``DxHxW``, the mean of its
    channels scaled to its range."""
    a = x.detach().float().cpu().numpy()
    if a.ndim == 4:
        a = a.mean(axis=0, keepdims=True)
    elif a.shape[0] != 3:
        a = np.repeat(a.mean(axis=0, keepdims=True), 3, axis=0)
    spatial = tuple(range(1, a.ndim))
    lo = a.min(axis=spatial, keepdims=True)
    span = a.max(axis=spatial, keepdims=True) - lo
    a = (a - lo) / np.where(span > 0, span, 1.0)
    return (a[0] if x.dim() == 4 else np.moveaxis(a, 0, -1)).astype(np.float32)
