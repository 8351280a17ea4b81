"""The annotator's handlers of windowed ops: conv, pooling (adaptive pooling when it is a
window) and explicit padding, the ``local`` layers.

A mixin of :class:`kql.planner.annotator.Annotator` (which supplies ``bind``,
``const``, ``shape``, ``first_input`` and ``local``), kept apart because every
local op needs three things the point ops do not: its window parameters in
PyTorch's conventions, the pad value an executor fills the padding with, and
what the executor needs to call the functional op (``extra``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx.node import Node

from kql.planner.ir import Kind, Pair


class NotModelled(Exception):
    """Raised by a handler to make the layer global with ``reason``."""


def ntuple(v: Any, n: int, what: str) -> tuple[int, ...]:
    """``v`` (an int, or a sequence of 1 or ``n`` ints) as one int per spatial axis."""
    if isinstance(v, bool):
        raise NotModelled(f"{what} {v!r} is not an int or {n}-tuple")
    if isinstance(v, int):
        return (v,) * n
    if isinstance(v, (tuple, list, torch.Size)) and len(v) in (1, n) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(int(x) for x in v) if len(v) == n else (int(v[0]),) * n
    raise NotModelled(f"{what} {v!r} is not an int or {n}-tuple")


def pair(v: Any, what: str) -> Pair:
    return ntuple(v, 2, what)  # type: ignore[return-value]


class LocalOps:
    """``module_<handler>`` / ``fn_<handler>`` for conv, max/avg/adaptive pooling and pad."""

    # -- convolution ----------------------------------------------------------
    def conv(self, x: Node, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
             groups: Any) -> dict:
        n = self.ndim
        op = f"conv{n}d"
        weight = self.const(weight, f"{op} weight")
        bias = self.const(bias, f"{op} bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != n + 2:
            raise NotModelled(f"{op} weight {type(weight).__name__} is not a {n + 2}D tensor")
        kernel = tuple(int(k) for k in weight.shape[2:])
        dilation = ntuple(self.const(dilation, "dilation"), n, "dilation")
        stride = ntuple(self.const(stride, "stride"), n, "stride")
        padding = self.const(padding, "padding")
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * n
            elif padding == "same":
                # PyTorch's 'same': total d*(k-1), the odd pixel at the bottom/right.
                tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
                pads = tuple((t // 2, t - t // 2) for t in tot)
            else:
                raise NotModelled(f"{op} padding {padding!r} is not 'same' or 'valid'")
        else:
            pads = tuple((p, p) for p in ntuple(padding, n, "padding"))
        return self.local(op, x, kernel=kernel, stride=stride, padding=pads, dilation=dilation,
                          groups=int(self.const(groups, "groups")), pad_value=0.0,
                          extra={"weight": weight.detach(),
                                 "bias": None if bias is None else bias.detach()})

    def module_conv(self, node, m, op, out_shape):
        if m.padding_mode != "zeros":
            raise NotModelled(f"padding_mode {m.padding_mode!r} is not zero padding")
        return self.conv(self.first_input(node), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

    def fn_conv(self, node, op, out_shape):
        b = self.bind(node)
        return self.conv(b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"],
                         b["groups"])

    # -- pooling --------------------------------------------------------------
    def pool_window(self, kernel_size: Any, stride: Any, padding: Any) -> dict:
        """``kernel``, ``stride`` and ``padding`` of a max or average pool."""
        n = self.ndim
        kernel = ntuple(self.const(kernel_size, "kernel_size"), n, "kernel_size")
        stride = self.const(stride, "stride")
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
            else ntuple(stride, n, "stride")  # PyTorch: stride defaults to the kernel
        pads = tuple((p, p) for p in ntuple(self.const(padding, "padding"), n, "padding"))
        return dict(kernel=kernel, stride=stride, padding=pads)

    def max_pool(self, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> dict:
        op = f"max_pool{self.ndim}d"
        if return_indices:
            raise NotModelled(f"{op} with return_indices")
        return self.local(op, x, **self.pool_window(kernel_size, stride, padding),
                          dilation=ntuple(self.const(dilation, "dilation"), self.ndim, "dilation"),
                          ceil_mode=bool(self.const(ceil_mode, "ceil_mode")), pad_value=float("-inf"))

    def module_max_pool(self, node, m, op, out_shape):
        return self.max_pool(self.first_input(node), m.kernel_size, m.stride, m.padding, m.dilation,
                             m.ceil_mode, m.return_indices)

    def fn_max_pool(self, node, op, out_shape):
        b = self.bind(node)
        return self.max_pool(b["input"], b["kernel_size"], b["stride"], b["padding"], b["dilation"],
                             b["ceil_mode"], b.get("return_indices", False))

    def avg_pool(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return self.local(f"avg_pool{self.ndim}d", x, **self.pool_window(kernel_size, stride, padding),
                          ceil_mode=bool(self.const(ceil_mode, "ceil_mode")),
                          count_include_pad=bool(self.const(count_include_pad, "count_include_pad")),
                          pad_value=0.0,
                          extra={"divisor_override": self.const(divisor_override, "divisor_override")})

    def module_avg_pool(self, node, m, op, out_shape):
        return self.avg_pool(self.first_input(node), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                             m.count_include_pad, m.divisor_override)

    def fn_avg_pool(self, node, op, out_shape):
        b = self.bind(node)
        return self.avg_pool(b["input"], b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                             b["count_include_pad"], b["divisor_override"])

    def adaptive(self, op: str, x: Node, output_size: Any, out_shape: tuple[int, ...]) -> dict:
        """Adaptive pooling is a plain window when the input size divides evenly.

        Window i spans [floor(i*n/m), ceil((i+1)*n/m)) (PyTorch's adaptive
        pooling); with n = k*m that is [i*k, (i+1)*k): kernel = stride = k.
        """
        in_shape, n = self.shape(x), self.ndim
        if len(in_shape) != n + 1:
            raise NotModelled(f"{op} on a {in_shape} tensor")
        size = self.const(output_size, "output_size")
        size = (size,) * n if isinstance(size, int) or size is None else tuple(size)
        if len(size) == 1:
            size = size * n
        dims = in_shape[1:]
        out = tuple(o or d for o, d in zip(size, dims))
        if len(out) != n or any(d % o for d, o in zip(dims, out)):
            return dict(op=op, kind=Kind.GLOBAL,
                        reason=f"adaptive pooling {'x'.join(map(str, dims))} -> {'x'.join(map(str, out))} "
                               f"is not one window ({'x'.join(map(str, dims))} is not a multiple of "
                               f"{'x'.join(map(str, out))})")
        k = tuple(d // o for d, o in zip(dims, out))
        pads = ((0, 0),) * n
        extra = {"adaptive_output_size": out}
        if op.startswith("adaptive_max_pool"):
            return self.local(f"max_pool{n}d", x, kernel=k, stride=k, padding=pads, dilation=(1,) * n,
                              pad_value=float("-inf"), extra=extra)
        extra["divisor_override"] = None
        return self.local(f"avg_pool{n}d", x, kernel=k, stride=k, padding=pads, dilation=(1,) * n, extra=extra)

    def module_adaptive(self, node, m, op, out_shape):
        if getattr(m, "return_indices", False):
            raise NotModelled(f"{op} with return_indices")
        return self.adaptive(op, self.first_input(node), m.output_size, out_shape)

    def fn_adaptive(self, node, op, out_shape):
        b = self.bind(node)
        if b.get("return_indices"):
            raise NotModelled(f"{op} with return_indices")
        return self.adaptive(op, b["input"], b["output_size"], out_shape)

    # -- padding --------------------------------------------------------------
    def pad(self, x: Node, pad: Any, mode: str, value: Any) -> dict:
        """Constant padding of the spatial axes is local; F.pad lists (left, right,
        top, bottom, front, back), the last axis first."""
        pad = [int(p) for p in self.const(pad, "pad")]
        n = self.ndim
        if mode != "constant":
            raise NotModelled(f"{mode!r} padding is not constant")
        if any(p < 0 for p in pad):
            raise NotModelled(f"negative padding {tuple(pad)} crops the input")
        if len(pad) % 2 or len(pad) < 2 or any(pad[2 * n:]):
            raise NotModelled(f"padding {tuple(pad)} pads dimensions other than "
                              f"{'D, H and W' if n == 3 else 'H and W'}")
        pad = pad + [0] * (2 * n - len(pad))
        # pairs from the last axis back: ((before, after) of axis 0, ..., of axis n-1)
        pads = tuple((pad[2 * (n - 1 - a)], pad[2 * (n - 1 - a) + 1]) for a in range(n))
        value = self.const(value, "pad value")
        return self.local("pad", x, padding=pads, kernel=(1,) * n, stride=(1,) * n, dilation=(1,) * n,
                          pad_value=float(0.0 if value is None else value), extra={"mode": "constant"})

    def module_pad(self, node, m, op, out_shape):
        mode = {"Reflection": "reflect", "Replication": "replicate", "Circular": "circular"}.get(
            type(m).__name__.split("Pad")[0], "constant")
        return self.pad(self.first_input(node), m.padding, mode, getattr(m, "value", 0.0))

    def fn_pad(self, node, op, out_shape):
        b = self.bind(node)
        return self.pad(b["input"], b["pad"], self.const(b.get("mode", "constant"), "mode"), b["value"])
