"""Pieces every physical executor shares: turning logits into probabilities,
the unoccluded reference inference, and a batch loop with a progress bar that
Ctrl-C stops cleanly (and that a caller can watch and cancel: see
:func:`batch_hook`)."""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from kql.errors import ExecutionError, KqlError, QueryInterrupted


def probabilities(output) -> torch.Tensor:
    """Class probabilities ``(B, K)`` from a model's output.

    Logits of K > 1 classes go through softmax; a single logit through a
    sigmoid (a binary classifier's probability of the positive class).
    Models that return a tuple (auxiliary heads) contribute their first item.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ExecutionError(f"the model returned {type(output).__name__}, not a tensor of class scores")
    output = output.reshape(output.shape[0], -1).float()
    if output.shape[1] == 1:
        return torch.sigmoid(output)
    return torch.softmax(output, dim=1)


def reference(plan, model, score: Optional[Callable] = None) -> tuple[int, float, torch.Tensor]:
    """Run the unoccluded image: ``(label, p_original, probabilities)``
    (or the scores ``score(output)`` gives, ``(1, K)`` for one image).

    Resolves ``LABEL PREDICTED`` to the top class; checks an explicit label
    against the model's real number of outputs.
    """
    with torch.inference_mode():
        try:
            output = model(plan.input.to(plan.device)[None])
        except (KqlError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise model_failed(plan, e, 0) from e
        probs = (score or probabilities)(output)[0]
    k = probs.shape[0]
    label = plan.label if plan.label is not None else int(probs.argmax())
    if label >= k:
        raise ExecutionError(f"label {label} is out of range: the model has {k} outputs (0-{k - 1})")
    return label, float(probs[label]), probs


def batches(n: int, size) -> Iterator[slice]:
    """Consecutive slices of ``range(n)``: of ``size`` positions each, or,
    when ``size`` is an array of bounds (starts, then ``n``), between them."""
    if np.ndim(size) == 0:
        for start in range(0, n, int(size)):
            yield slice(start, min(start + int(size), n))
    else:
        for start, stop in zip(size[:-1].tolist(), size[1:].tolist()):
            yield slice(start, stop)


# A context variable, not a plan field or an argument, so every executor's
# batch loop reports without any executor (or the API between the caller and
# the executor) passing it along; and each thread sees only its own hook.
_BATCH_HOOK: contextvars.ContextVar[Optional[Callable[[int, int], None]]] = \
    contextvars.ContextVar("kql_batch_hook", default=None)


@contextlib.contextmanager
def batch_hook(hook: Callable[[int, int], None]):
    """Watch and cancel the queries run inside this ``with`` block (in this
    thread): :func:`run_batches` calls ``hook(done, total)`` with the number of
    positions done, before its first batch and after each one.

    To cancel cooperatively, the hook raises :class:`QueryInterrupted` (or
    ``KeyboardInterrupt``): the query stops between two batches and raises
    ``QueryInterrupted("interrupted after <done> of <total> positions; nothing
    was written")``, exactly as on Ctrl-C.

    >>> seen = []
    >>> with batch_hook(lambda done, total: seen.append(done)):
    ...     _ = run_batches(5, 2, lambda sl: None, progress="off")
    >>> seen
    [0, 2, 4, 5]
    """
    token = _BATCH_HOOK.set(hook)
    try:
        yield
    finally:
        _BATCH_HOOK.reset(token)


def run_batches(n: int, size, step: Callable[[slice], None], *, progress: str = "auto",
                desc: str = "positions", plan=None, bar=None, before: int = 0,
                total: Optional[int] = None) -> float:
    """Call ``step`` for consecutive slices of ``range(n)`` (see :func:`batches`)
    with a progress bar.

    Returns the elapsed seconds. Ctrl-C raises :class:`QueryInterrupted`,
    saying how far it got; nothing has been written by then. Any other
    failure of ``step`` that is not a KqlError is the model's (or a bug's)
    and becomes an :class:`ExecutionError` naming the model (see
    :func:`model_failed`). A :func:`batch_hook` in force sees every batch and
    may cancel between them.

    One call may be one round of a longer loop (refinement runs one per
    stage): ``bar`` is that loop's progress bar, advanced here instead of a
    bar of this call's own, and ``before`` of ``total`` positions were done
    before this call, so the hook sees ``(before + done, total)`` and is
    called before the first batch only when nothing is done yet.
    """
    slices = list(batches(n, size))
    hook = _BATCH_HOOK.get()
    total = n if total is None else total
    start = time.perf_counter()
    done = 0
    try:
        if hook is not None and before == 0:
            hook(0, total)
        with (progress_bar(n, progress, desc, "pos", steps=len(slices)) if bar is None
              else contextlib.nullcontext(bar)) as bar:
            for sl in slices:
                try:
                    step(sl)
                except (KqlError, KeyboardInterrupt):
                    raise
                except Exception as e:
                    if plan is None:
                        raise
                    raise model_failed(plan, e, sl.stop - sl.start) from e
                done = sl.stop
                bar.update(sl.stop - sl.start)
                if hook is not None:
                    hook(before + done, total)
    except KeyboardInterrupt:
        raise QueryInterrupted(f"interrupted after {before + done} of {total} positions; "
                               f"nothing was written") from None
    return time.perf_counter() - start


def occlude(x: torch.Tensor, fill, *positions) -> torch.Tensor:
    """A batch of copies of ``x`` (C, H, W), each with its patch filled:
    ``(len(ys), C, H, W)``. Krypton eq. 5. Called ``occlude(x, fill, ys,
    xs, (ph, pw))``; on a volume ``x`` (C, D, H, W), ``occlude(x, fill, zs,
    ys, xs, (pd, ph, pw))``. ``fill`` as :func:`patch_values` takes it."""
    *starts, patch = positions
    out = x.unsqueeze(0).repeat(len(starts[0]), *(1,) * x.dim())
    values = box_values(fill, starts, patch, x.shape[0], x.device).to(x.dtype)
    for b, corner in enumerate(zip(*(np.asarray(a).tolist() for a in starts))):
        out[(b, slice(None)) + tuple(slice(c, c + p) for c, p in zip(corner, patch))] = values[b]
    return out


def patch_values(fill, ys: np.ndarray, xs: np.ndarray, patch: tuple[int, int], channels: int,
                 device) -> torch.Tensor:
    """What each position's patch holds: float32 ``(len(ys), C, ph, pw)``.

    ``fill`` is one value per channel ``(C,)`` (every patch alike), a
    baseline image ``(C, H, W)`` (each patch takes the part of it under the
    patch) or a callable ``fill(ys, xs) -> (B, C, ph, pw)`` tensor (the
    tensor API's windows clipped at the border, ``kql.tensor_api``).
    :func:`box_values` is the same on any number of spatial axes.
    """
    return box_values(fill, (ys, xs), patch, channels, device)


def box_values(fill, starts, patch, channels: int, device) -> torch.Tensor:
    """:func:`patch_values` with the corners along every spatial axis in
    ``starts`` (``(ys, xs)``, or ``(zs, ys, xs)`` on a volume): float32
    ``(B, C, *patch)``. A baseline is ``(C, *S)`` and a callable takes
    ``fill(*starts)``."""
    B = len(starts[0])
    if callable(fill) and not isinstance(fill, torch.Tensor):
        return fill(*(np.asarray(a) for a in starts)).to(device, torch.float32)
    fill = fill.to(device, torch.float32)
    if fill.dim() == len(starts) + 1:
        from kql import kernels
        return kernels.gather_nd(fill.contiguous(),
                                 [torch.as_tensor(np.asarray(a, dtype=np.int64), device=device) for a in starts],
                                 tuple(patch))
    return fill.view(1, channels, *(1,) * len(patch)).expand(B, channels, *patch).contiguous()


def model_failed(plan, error: Exception, batch: int) -> ExecutionError:
    """The error to raise when the model itself fails on a batch of ``batch``
    occluded images (0: on the unoccluded image)."""
    detail = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {detail[0]}" if detail else type(error).__name__
    hint = ""
    if batch > 1:
        hint = (" (it ran on one image while planning: if its forward assumes a batch of one, "
                "add BATCH 1)")
    what = f"a batch of {batch} occluded images" if batch else "the unoccluded image"
    return ExecutionError(f"model '{plan.spec.name}' failed on {what}: {text}{hint}")


def progress_bar(total: int, progress: str, desc: str, unit: str, *, steps: Optional[int] = None):
    """The tqdm bar of every executor loop (:func:`run_batches`, TUNE's
    heatmaps, refinement's positions): ``progress`` ``"on"``, ``"off"``, or
    ``"auto"`` (a bar on a terminal, unless the loop is known to take one
    step, ``steps``). Off, tqdm's disabled bar (its methods do nothing)."""
    from tqdm import tqdm
    disable = {"on": False, "off": True}.get(progress, None)
    if disable is None:
        disable = not sys.stderr.isatty() or (steps is not None and steps <= 1)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, file=sys.stderr,
                dynamic_ncols=True)
