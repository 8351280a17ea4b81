"""The op tables: which handler of the annotator classifies a traced call, and its FLOPs.

A traced node is a module call (looked up by its exact ``torch.nn`` class in
:data:`MODULES`), a function call (by its display name, :func:`target_name`,
in :data:`FUNCTIONS`) or a tensor method (by name, in :data:`METHODS`). Each
entry is ``(handler, op)``: :class:`kql.planner.annotator.Annotator` calls
``module_<handler>`` / ``fn_<handler>`` with the normalised op name. Argument
names and defaults are not listed here: the annotator binds every call with
torch.fx's own signature normalisation (``torch.fx.operator_schemas``).

FLOPs are multiply-adds for one image (Krypton eq. 16 counts one per
multiplication of a fused multiply-add), :func:`flops`:

- conv: ``C_out * H_out * W_out * (C_in / groups) * kh * kw`` (eq. 16; a 3-D
  conv times ``D_out * kd`` as well);
- linear: ``in * out``, times the leading non-batch dims if any (a Linear on
  a channels-last map: ``in * out`` per pixel);
- pooling windows: ``C * H_out * W_out * kh * kw``;
- reductions (mean/sum/amax, adaptive pooling that is not a window): one per
  input element;
- point, merge, batch norm, layer norm, softmax, interpolate, unknown ops: one
  per output element;
- pad, flatten/reshape/permute, chunk pieces, dropout, identity, contiguous, getitem,
  input, output: 0.

>>> FUNCTIONS["torch.nn.functional.layer_norm"], METHODS["permute"], MODULES[torch.nn.ReLU]
(('layer_norm', 'layer_norm'), ('permute', 'permute'), ('activation', 'relu'))
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch.fx.node import Node

from kql.planner.ir import AVG_POOL_OPS, CONV_OPS, MAX_POOL_OPS, Kind, Layer

# Point ops of one tensor (``torch.<name>``, ``F.<name>``, ``Tensor.<name>``
# and the in-place ``<name>_``); their non-tensor arguments go to ``extra``.
UNARY = ("relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish", "hardswish",
         "hardsigmoid", "sigmoid", "tanh", "logsigmoid", "hardtanh", "softplus", "clamp", "clip",
         "prelu", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "erf", "reciprocal",
         "contiguous", "clone", "detach")
UNARY_OP = {"clip": "clamp", "clone": "identity", "detach": "identity"}
# Binary arithmetic (operator, torch function or Tensor method name) -> op.
ARITH = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub", "subtract": "sub",
         "mul": "mul", "imul": "mul", "multiply": "mul", "truediv": "div", "itruediv": "div",
         "div": "div", "divide": "div", "true_divide": "div", "pow": "pow", "ipow": "pow",
         "maximum": "maximum", "minimum": "minimum"}
# Module attributes that are an activation's parameters (stored in ``extra``).
ACTIVATION_PARAMS = {"leaky_relu": ("negative_slope",), "elu": ("alpha",), "celu": ("alpha",),
                     "gelu": ("approximate",), "hardtanh": ("min_val", "max_val"),
                     "softplus": ("beta", "threshold"), "prelu": ("weight",)}
# Ops that only move or regroup elements (a reshape or permute is a point
# layer when the pixels keep their place; see kql.planner.annotator).
RESHAPES = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "unflatten"}
PERMUTES = {"permute", "transpose"}


def target_name(node: Node) -> str:
    """Display name: module path, ``torch.conv2d``, ``operator.add``, ``Tensor.view``."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        target = node.target
        try:
            name = torch.fx.node._get_qualified_name(target)
        except Exception:
            name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', repr(target))}"
        # F.avg_pool2d and friends live in torch._C._nn; show them as users write them.
        for inner, shown in (("_operator.", "operator."), ("torch._C._nn.", "torch.nn.functional.")):
            if name.startswith(inner):
                return shown + name[len(inner):]
        return name
    return node.op


def _function_table() -> dict[str, tuple[str, str]]:
    """Display name (:func:`target_name`) of a function -> (handler, op)."""
    table: dict[str, tuple[str, str]] = {}
    for n in UNARY:
        for prefix in ("torch.nn.functional.", "torch.", "torch.special."):
            table[prefix + n] = ("unary", n)
            table[prefix + n + "_"] = ("unary", n)
    table["operator.neg"] = ("unary", "neg")
    table["operator.abs"] = ("unary", "abs")
    for n in ARITH:
        for prefix in ("operator.", "torch."):
            table[prefix + n] = ("arith", n)
    for name, (handler, op) in {
        "torch.conv2d": ("conv", "conv2d"), "torch.nn.functional.conv2d": ("conv", "conv2d"),
        "torch.nn.functional.max_pool2d": ("max_pool", "max_pool2d"),
        "torch.nn.functional._max_pool2d": ("max_pool", "max_pool2d"),
        "torch.max_pool2d": ("max_pool", "max_pool2d"),
        "torch.nn.functional.avg_pool2d": ("avg_pool", "avg_pool2d"),
        "torch.nn.functional.adaptive_avg_pool2d": ("adaptive", "adaptive_avg_pool2d"),
        "torch.nn.functional.adaptive_max_pool2d": ("adaptive", "adaptive_max_pool2d"),
        "torch.nn.functional._adaptive_max_pool2d": ("adaptive", "adaptive_max_pool2d"),
        "torch.conv3d": ("conv", "conv3d"), "torch.nn.functional.conv3d": ("conv", "conv3d"),
        "torch.nn.functional.max_pool3d": ("max_pool", "max_pool3d"),
        "torch.nn.functional._max_pool3d": ("max_pool", "max_pool3d"),
        "torch.max_pool3d": ("max_pool", "max_pool3d"),
        "torch.nn.functional.avg_pool3d": ("avg_pool", "avg_pool3d"),
        "torch.nn.functional.adaptive_avg_pool3d": ("adaptive", "adaptive_avg_pool3d"),
        "torch.nn.functional.adaptive_max_pool3d": ("adaptive", "adaptive_max_pool3d"),
        "torch.nn.functional._adaptive_max_pool3d": ("adaptive", "adaptive_max_pool3d"),
        "torch.nn.functional.instance_norm": ("instance_norm", "instance_norm"),
        "torch.instance_norm": ("instance_norm", "instance_norm"),
        "torch.nn.functional.pad": ("pad", "pad"),
        "torch.constant_pad_nd": ("pad", "constant_pad_nd"),
        "torch.nn.functional.batch_norm": ("batch_norm", "batch_norm"),
        "torch.batch_norm": ("batch_norm", "batch_norm"),
        "torch.nn.functional.layer_norm": ("layer_norm", "layer_norm"),
        "torch.layer_norm": ("layer_norm", "layer_norm"),
        "torch.nn.functional.linear": ("linear", "linear"),
        "torch.cat": ("cat", "cat"), "torch.concat": ("cat", "cat"), "torch.concatenate": ("cat", "cat"),
        "torch.flatten": ("reshape", "flatten"),
        "torch.reshape": ("reshape", "reshape"), "torch.squeeze": ("reshape", "squeeze"),
        "torch.unsqueeze": ("reshape", "unsqueeze"),
        "torch.permute": ("permute", "permute"), "torch.transpose": ("permute", "transpose"),
        "torch.mean": ("reduce", "mean"), "torch.sum": ("reduce", "sum"),
        "torch.amax": ("reduce", "amax"), "torch.amin": ("reduce", "amin"),
        "torch.nn.functional.softmax": ("softmax", "softmax"), "torch.softmax": ("softmax", "softmax"),
        "torch.nn.functional.log_softmax": ("softmax", "log_softmax"),
        "torch.log_softmax": ("softmax", "log_softmax"),
        "torch.nn.functional.interpolate": ("interpolate", "interpolate"),
        "torch.nn.functional.upsample": ("interpolate", "interpolate"),
        "torch.nn.functional.upsample_nearest": ("interpolate", "interpolate"),
        "torch.nn.functional.upsample_bilinear": ("interpolate", "interpolate"),
        "torch.nn.functional.local_response_norm": ("lrn", "local_response_norm"),
        "torchvision.ops.stochastic_depth.stochastic_depth": ("dropout", "dropout"),
        "operator.getitem": ("getitem", "getitem"),
    }.items():
        table[name] = (handler, op)
    for n in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"):
        table["torch.nn.functional." + n] = ("dropout", "dropout")
    for n in ("dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"):
        table["torch." + n] = ("dropout", "dropout")
    return table


def _method_table() -> dict[str, tuple[str, str]]:
    """Tensor method name -> (handler, op)."""
    table: dict[str, tuple[str, str]] = {}
    for n in UNARY:
        table[n] = table[n + "_"] = ("unary", n)
    for n in ("add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "pow",
              "maximum", "minimum"):
        table[n] = table[n + "_"] = ("arith", n)
    table.update({
        "flatten": ("reshape", "flatten"), "view": ("reshape", "view"), "reshape": ("reshape", "reshape"),
        "view_as": ("reshape", "view"), "reshape_as": ("reshape", "reshape"),
        "squeeze": ("reshape", "squeeze"), "unsqueeze": ("reshape", "unsqueeze"),
        "permute": ("permute", "permute"), "transpose": ("permute", "transpose"),
        "mean": ("reduce", "mean"), "sum": ("reduce", "sum"), "amax": ("reduce", "amax"),
        "amin": ("reduce", "amin"), "softmax": ("softmax", "softmax"),
        "log_softmax": ("softmax", "log_softmax"),
    })
    return table


def _module_table() -> dict[type, tuple[str, str]]:
    """Exact ``torch.nn`` class -> (handler, op). Exact, so that a subclass with
    its own forward is never mistaken for the class it extends."""
    nn = torch.nn
    table: dict[type, tuple[str, str]] = {
        nn.Conv2d: ("conv", "conv2d"), nn.MaxPool2d: ("max_pool", "max_pool2d"),
        nn.AvgPool2d: ("avg_pool", "avg_pool2d"),
        nn.AdaptiveAvgPool2d: ("adaptive", "adaptive_avg_pool2d"),
        nn.AdaptiveMaxPool2d: ("adaptive", "adaptive_max_pool2d"),
        nn.Conv3d: ("conv", "conv3d"), nn.MaxPool3d: ("max_pool", "max_pool3d"),
        nn.AvgPool3d: ("avg_pool", "avg_pool3d"),
        nn.AdaptiveAvgPool3d: ("adaptive", "adaptive_avg_pool3d"),
        nn.AdaptiveMaxPool3d: ("adaptive", "adaptive_max_pool3d"),
        nn.BatchNorm3d: ("batch_norm", "batch_norm"),
        nn.InstanceNorm1d: ("instance_norm", "instance_norm"),
        nn.InstanceNorm2d: ("instance_norm", "instance_norm"),
        nn.InstanceNorm3d: ("instance_norm", "instance_norm"),
        nn.BatchNorm1d: ("batch_norm", "batch_norm"), nn.BatchNorm2d: ("batch_norm", "batch_norm"),
        nn.SyncBatchNorm: ("batch_norm", "batch_norm"), nn.LayerNorm: ("layer_norm", "layer_norm"),
        nn.Identity: ("identity", "identity"), nn.Linear: ("linear", "linear"),
        nn.Flatten: ("reshape", "flatten"), nn.Unflatten: ("reshape", "unflatten"),
        nn.Softmax: ("softmax", "softmax"), nn.LogSoftmax: ("softmax", "log_softmax"),
        nn.Softmax2d: ("softmax", "softmax"),
        nn.LocalResponseNorm: ("lrn", "local_response_norm"),
        nn.Upsample: ("interpolate", "interpolate"),
        nn.UpsamplingNearest2d: ("interpolate", "interpolate"),
        nn.UpsamplingBilinear2d: ("interpolate", "interpolate"),
    }
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout):
        table[cls] = ("dropout", "dropout")
    for name in ("ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ZeroPad1d", "ZeroPad2d",
                 "ZeroPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d",
                 "ReplicationPad1d", "ReplicationPad2d", "ReplicationPad3d", "CircularPad1d",
                 "CircularPad2d", "CircularPad3d"):
        if hasattr(nn, name):
            table[getattr(nn, name)] = ("pad", "pad")
    activations = {
        nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.CELU: "celu",
        nn.SELU: "selu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
        nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Hardtanh: "hardtanh",
        nn.Mish: "mish", nn.Softplus: "softplus", nn.PReLU: "prelu", nn.LogSigmoid: "logsigmoid",
    }
    for cls, op in activations.items():
        table[cls] = ("activation", op)
    return table


FUNCTIONS = _function_table()
METHODS = _method_table()
MODULES = _module_table()


def lookup(node: Node, gm: torch.fx.GraphModule) -> tuple[str, str]:
    """``(handler, op)`` of a call node; ``("unknown", "unknown")`` if no table lists it."""
    if node.op == "call_module":
        return MODULES.get(type(gm.get_submodule(node.target)), ("unknown", "unknown"))
    if node.op == "call_function":
        return FUNCTIONS.get(target_name(node), ("unknown", "unknown"))
    return METHODS.get(node.target, ("unknown", "unknown"))


def op_name(handler: str, op: str) -> str:
    """The normalised op of a table entry (what ``Layer.op`` says)."""
    if handler == "arith":
        return ARITH[op]
    if op == "constant_pad_nd":
        return "pad"
    return UNARY_OP.get(op, op)


_ZERO_FLOPS = {"input", "output", "pad", "flatten", "reshape", "view", "squeeze", "unsqueeze",
               "unflatten", "permute", "transpose", "dropout", "identity", "contiguous", "getitem", "chunk"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "adaptive_avg_pool2d", "adaptive_max_pool2d",
               "adaptive_avg_pool3d", "adaptive_max_pool3d"}


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def flops(layer: Layer) -> int:
    """Multiply-adds of one layer for one image (see the module docstring).

    >>> conv = Layer("c", "conv2d", Kind.LOCAL, kernel=(3, 3), in_shapes=((3, 8, 8),), out_shape=(4, 8, 8))
    >>> flops(conv) == 4 * 8 * 8 * 3 * 3 * 3
    True
    >>> flops(Layer("l", "linear", Kind.POINT, in_shapes=((7, 7, 96),), out_shape=(7, 7, 384),
    ...             spatial_axes=(0, 1), in_spatial_axes=((0, 1),))) == 7 * 7 * 96 * 384
    True
    """
    out = _numel(layer.out_shape)
    if layer.op in _ZERO_FLOPS:
        return 0
    if layer.op in CONV_OPS and layer.kind is Kind.LOCAL:
        return out * (layer.in_shapes[0][0] // layer.groups) * math.prod(layer.kernel)  # Krypton eq. 16
    if (layer.op in MAX_POOL_OPS or layer.op in AVG_POOL_OPS) and layer.kind is Kind.LOCAL:
        return out * math.prod(layer.kernel)
    if layer.op == "linear":
        return out * (layer.in_shapes[0][-1] if layer.in_shapes and layer.in_shapes[0] else 1)
    if layer.op in _REDUCTIONS:
        return _numel(layer.in_shapes[0]) if layer.in_shapes else out
    return out
