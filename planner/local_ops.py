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


def pair(v: Any, what: str) -> Pair:
    if isinstance(v, bool):
        raise NotModelled(f"{what} {v!r} is not an int or pair")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list, torch.Size)) and len(v) in (1, 2) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (int(v[0]), int(v[-1]))
    raise NotModelled(f"{what} {v!r} is not an int or pair")


class LocalOps:
    """``module_<handler>`` / ``fn_<handler>`` for conv, max/avg/adaptive pooling and pad."""

    # -- convolution ----------------------------------------------------------
    def conv(self, x: Node, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
             groups: Any) -> dict:
        weight = self.const(weight, "conv2d weight")
        bias = self.const(bias, "conv2d bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise NotModelled(f"conv2d weight {type(weight).__name__} is not a 4D tensor")
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        dilation = pair(self.const(dilation, "dilation"), "dilation")
        stride = pair(self.const(stride, "stride"), "stride")
        padding = self.const(padding, "padding")
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0), (0, 0))
            elif padding == "same":
                # PyTorch's 'same': total d*(k-1), the odd pixel at the bottom/right.
                tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
                pads = ((tot[0] // 2, tot[0] - tot[0] // 2), (tot[1] // 2, tot[1] - tot[1] // 2))
            else:
                raise NotModelled(f"conv2d padding {padding!r} is not 'same' or 'valid'")
        else:
            ph, pw = pair(padding, "padding")
            pads = ((ph, ph), (pw, pw))
        return self.local("conv2d", x, kernel=kernel, stride=stride, padding=pads, dilation=dilation,
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
        kernel = pair(self.const(kernel_size, "kernel_size"), "kernel_size")
        stride = self.const(stride, "stride")
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
            else pair(stride, "stride")  # PyTorch: stride defaults to the kernel
        ph, pw = pair(self.const(padding, "padding"), "padding")
        return dict(kernel=kernel, stride=stride, padding=((ph, ph), (pw, pw)))

    def max_pool(self, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> dict:
        if return_indices:
            raise NotModelled("max_pool2d with return_indices")
        return self.local("max_pool2d", x, **self.pool_window(kernel_size, stride, padding),
                          dilation=pair(self.const(dilation, "dilation"), "dilation"),
                          ceil_mode=bool(self.const(ceil_mode, "ceil_mode")), pad_value=float("-inf"))

    def module_max_pool(self, node, m, op, out_shape):
        return self.max_pool(self.first_input(node), m.kernel_size, m.stride, m.padding, m.dilation,
                             m.ceil_mode, m.return_indices)

    def fn_max_pool(self, node, op, out_shape):
        b = self.bind(node)
        return self.max_pool(b["input"], b["kernel_size"], b["stride"], b["padding"], b["dilation"],
                             b["ceil_mode"], b.get("return_indices", False))

    def avg_pool(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return self.local("avg_pool2d", x, **self.pool_window(kernel_size, stride, padding),
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
        in_shape = self.shape(x)
        if len(in_shape) != 3:
            raise NotModelled(f"{op} on a {in_shape} tensor")
        size = self.const(output_size, "output_size")
        size = (size, size) if isinstance(size, int) or size is None else tuple(size)
        if len(size) == 1:
            size = (size[0], size[0])
        (h, w), (oh, ow) = in_shape[1:], (size[0] or in_shape[1], size[1] or in_shape[2])
        if h % oh or w % ow:
            return dict(op=op, kind=Kind.GLOBAL,
                        reason=f"adaptive pooling {h}x{w} -> {oh}x{ow} is not one window "
                               f"({h}x{w} is not a multiple of {oh}x{ow})")
        k = (h // oh, w // ow)
        extra = {"adaptive_output_size": (oh, ow)}
        if op == "adaptive_max_pool2d":
            return self.local("max_pool2d", x, kernel=k, stride=k, pad_value=float("-inf"), extra=extra)
        extra["divisor_override"] = None
        return self.local("avg_pool2d", x, kernel=k, stride=k, extra=extra)

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
        """Constant padding of H and W is local; F.pad lists (left, right, top, bottom, ...)."""
        pad = [int(p) for p in self.const(pad, "pad")]
        if mode != "constant":
            raise NotModelled(f"{mode!r} padding is not constant")
        if any(p < 0 for p in pad):
            raise NotModelled(f"negative padding {tuple(pad)} crops the input")
        if len(pad) % 2 or len(pad) < 2 or any(pad[4:]):
            raise NotModelled(f"padding {tuple(pad)} pads dimensions other than H and W")
        left, right = pad[0], pad[1]
        top, bottom = (pad[2], pad[3]) if len(pad) >= 4 else (0, 0)
        value = self.const(value, "pad value")
        return self.local("pad", x, padding=((top, bottom), (left, right)),
                          pad_value=float(0.0 if value is None else value), extra={"mode": "constant"})

    def module_pad(self, node, m, op, out_shape):
        mode = {"Reflection": "reflect", "Replication": "replicate", "Circular": "circular"}.get(
            type(m).__name__.split("Pad")[0], "constant")
        return self.pad(self.first_input(node), m.padding, mode, getattr(m, "value", 0.0))

    def fn_pad(self, node, op, out_shape):
        b = self.bind(node)
        return self.pad(b["input"], b["pad"], self.const(b.get("mode", "constant"), "mode"), b["value"])
