"""The annotator: every image-dependent tensor node of a propagated fx graph becomes a
:class:`~kql.planner.ir.Layer` with its kind, window, layout and FLOPs.

The op tables (:mod:`kql.planner.ops`) name a handler per module class,
function and tensor method; :class:`Annotator` has one ``module_<handler>``
and one ``fn_<handler>`` per handler (``fn_`` for functions and methods).
Arguments are bound by torch.fx's signature normalisation
(``torch.fx.operator_schemas.normalize_function``, with the propagated types
of the arguments to pick between overloads), so a call written positionally,
by keyword or as a Tensor method reaches the handler by parameter name with
every default filled in. A handler returns the layer's fields (``op``,
``kind``, parameters, ``spatial_axes``) or raises :class:`NotModelled` and the
layer becomes global with that reason (EXPLAIN shows it).

**What is pointwise although it looks global.** An op is a point layer when
an output pixel depends on the same pixel of its input alone, whatever
happens to the values within a pixel. Besides activations and arithmetic this
covers the ops that only move or regroup the per-pixel axes, tracked by the
layout (``Layer.spatial_axes``): permutes that keep the batch axis first
(ConvNeXt's ``permute(0, 2, 3, 1)`` to channels-last and back), reshapes that
split or merge only per-pixel axes (ShuffleNet's channel shuffle
``view -> transpose -> view``), ``chunk``/``split`` pieces along a per-pixel
axis, and per-pixel ops on any layout: LayerNorm over per-pixel trailing axes,
Linear over a per-pixel last axis, reductions, softmax and ``cat`` along
per-pixel axes. Nothing here assumes two spatial axes: a layout is the tuple
of the spatial axes' positions.

>>> import torch.nn as nn
>>> from kql.planner.tracer import trace
>>> class Block(nn.Module):   # ConvNeXt's inverted bottleneck, channels-last inside
...     def __init__(self):
...         super().__init__()
...         self.dw, self.norm, self.fc = nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.LayerNorm(8), nn.Linear(8, 32)
...     def forward(self, x):
...         y = self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1)))
...         return y.permute(0, 3, 1, 2)
>>> g = trace(Block(), (8, 14, 14))
>>> [(l.op, str(l.kind), l.out_shape, l.out_axes) for l in g][1:-1]  # doctest: +NORMALIZE_WHITESPACE
[('conv2d', 'local', (8, 14, 14), (1, 2)), ('permute', 'point', (14, 14, 8), (0, 1)),
 ('layer_norm', 'point', (14, 14, 8), (0, 1)), ('linear', 'point', (14, 14, 32), (0, 1)),
 ('permute', 'point', (32, 14, 14), (1, 2))]
"""
from __future__ import annotations

import operator
import typing
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.node import Node, map_arg
from torch.fx.operator_schemas import normalize_function

from kql.errors import PlanError
from kql.planner.ir import Kind, Layer, channels_first_axes, permuted_axes, reshaped_axes
from kql.planner.local_ops import LocalOps, NotModelled
from kql.planner.ops import ACTIVATION_PARAMS, ARITH, UNARY_OP, flops, lookup, op_name, target_name


def _layout(out_shape: tuple[int, ...], axes: tuple[int, ...], ndim: int) -> dict:
    """``spatial_axes`` for a Layer: ``None`` (the default) when channels first."""
    return {"spatial_axes": None if tuple(axes) == channels_first_axes(out_shape, ndim) else tuple(axes)}


def _per_pixel_dims(dims, rank: int, axes: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """``dims`` (over the whole tensor, batch first) as non-negative ints, or
    ``None`` if one of them is the batch axis or a spatial axis."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims or not all(isinstance(d, int) and -rank <= d < rank for d in dims):
        return None
    dims = tuple(d % rank for d in dims)
    return None if any(d == 0 or d - 1 in axes for d in dims) else dims


# Python's operators have positional-only ``a, b``; bind them as torch.add does.
_OPERATORS = {getattr(operator, n) for n in ("add", "sub", "mul", "truediv", "pow", "iadd", "isub", "imul",
                                             "itruediv", "ipow", "neg", "abs")}


class Annotator(LocalOps):
    """Turns the propagated fx graph into :class:`Layer` objects (:meth:`layers`)."""

    def __init__(self, gm: torch.fx.GraphModule, image: Node, depends: dict[Node, bool],
                 values: dict[Node, Any], input_shape: tuple[int, ...]):
        self.gm = gm
        self.image = image
        self.depends = depends
        self.values = values
        self.input_shape = input_shape
        self.ndim = len(input_shape) - 1  # spatial axes: 2 (image) or 3 (volume)
        self.layer_nodes: dict[Node, Layer] = {}
        self.by_name: dict[str, Layer] = {}
        # An in-place op (nn.ReLU(inplace=True), x.add_(y)) returns its input
        # tensor, overwritten: every node that is that tensor (its root) reads,
        # from then on, the last op that wrote it.
        self.root: dict[Node, Node] = {}
        self.last_writer: dict[Node, Node] = {}

    # -- helpers ------------------------------------------------------------
    def is_layer_value(self, node: Node) -> bool:
        """Tensor-valued and computed from the image."""
        kind = node.meta.get("type")
        return self.depends[node] and isinstance(kind, type) and issubclass(kind, torch.Tensor)

    def first_input(self, node: Node) -> Node:
        """The tensor a module is called on (positionally or by keyword)."""
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if not self.dep_tensor(x):
            raise NotModelled(f"not recognised: {target_name(node)} called on {x!r}")
        return x

    def shape(self, node: Node) -> tuple[int, ...]:
        """Shape without the batch dimension."""
        return tuple(node.meta["tensor_meta"].shape)[1:]

    def axes(self, node: Node) -> tuple[int, ...]:
        """Spatial axes of an image tensor (its layer's layout; channels first if
        it is not a layer itself)."""
        layer = self.layer_nodes.get(self.last_writer.get(self.root.get(node, node), node))
        return layer.out_axes if layer is not None else channels_first_axes(self.shape(node), self.ndim)

    def known_axes(self, node: Node) -> tuple[int, ...]:
        """The spatial axes of ``node`` when its layout follows from the graph; ``()``
        after a global layer, whose output changes everywhere and whose layout
        nothing tracks (a global attention block's ``(H, W, C)`` output is
        not taken for a ``(C, H, W)`` map by the permutes and norms after it)."""
        layer = self.layer_nodes.get(self.last_writer.get(self.root.get(node, node), node))
        return () if layer is None or layer.kind is Kind.GLOBAL else layer.out_axes

    def dep_tensor(self, v: Any) -> bool:
        return isinstance(v, Node) and self.is_layer_value(v)

    def const(self, v: Any, what: str) -> Any:
        """The value of an argument that does not depend on the image."""
        if isinstance(v, Node):
            if self.dep_tensor(v):
                raise NotModelled(f"{what} depends on the input")
            return self.values[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.const(x, what) for x in v)
        return v

    def _type(self, v: Any) -> Any:
        """The type ``normalize_function`` matches an argument against a schema
        with (``(2, 2)`` is a ``Tuple[int, int]``, which fits ``List[int]``)."""
        if isinstance(v, Node):
            if self.dep_tensor(v):
                return torch.Tensor
            v = self.values.get(v)
        if isinstance(v, torch.Tensor):
            return torch.Tensor
        if isinstance(v, (list, tuple)):
            return typing.Tuple[tuple(self._type(x) for x in v)] if v else typing.Tuple[()]
        return type(v)

    def bind(self, node: Node, first: str = "input") -> dict[str, Any]:
        """Arguments of a function or method call by parameter name, defaults
        filled in (Nodes left as Nodes), by torch.fx's ``normalize_function``.

        A Tensor method binds as the ``torch`` function of its name (``x.add_(y)``
        as ``torch.add(x, y)``); Python's operators bind their two operands as
        ``input`` and ``other``.
        """
        target = node.target
        if node.op == "call_method":
            name = target[:-1] if target.endswith("_") and not target.endswith("__") else target
            target = getattr(torch, name, None) or getattr(torch.nn.functional, name, None)
        if target in _OPERATORS:
            return dict(zip(("input", "other"), node.args))
        if target is None:
            raise NotModelled(f"not recognised: {target_name(node)} (no signature to bind)")
        try:
            bound = normalize_function(target, tuple(node.args), dict(node.kwargs),
                                       arg_types=tuple(self._type(a) for a in node.args),
                                       kwarg_types={k: self._type(v) for k, v in node.kwargs.items()},
                                       normalize_to_only_use_kwargs=True)
        except Exception as e:  # an ambiguous overload, or arguments no schema accepts
            raise NotModelled(f"not recognised: {target_name(node)} ({type(e).__name__})") from e
        if bound is None:
            raise NotModelled(f"not recognised: {target_name(node)} with these arguments")
        kwargs = dict(bound.kwargs)
        if first != "input" and "input" in kwargs and first not in kwargs:
            kwargs[first] = kwargs.pop("input")
        return kwargs

    def ordered_args(self, node: Node) -> list[Node]:
        found: list[Node] = []
        map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return found

    def layer_inputs(self, node: Node) -> tuple[str, ...]:
        """Image-dependent tensors a node reads, in argument order.

        A direct tensor argument counts every time it appears (``x + x`` reads
        ``x`` twice); a non-tensor in between (the tuple from ``chunk``,
        ``x.size(0)``) is looked through to the tensors it came from.
        """
        out: list[str] = []
        for a in self.ordered_args(node):
            a = self.last_writer.get(self.root.get(a, a), a)
            if a in self.layer_nodes:
                out.append(a.name)
            elif self.depends[a]:
                for name in self._look_through(a, set()):
                    if name not in out:
                        out.append(name)
        return tuple(out)

    def _look_through(self, node: Node, seen: set) -> list[str]:
        names: list[str] = []
        for a in self.ordered_args(node):
            if a in seen:
                continue
            seen.add(a)
            if a in self.layer_nodes:
                names.append(a.name)
            elif self.depends[a]:
                names += self._look_through(a, seen)
        return names

    # -- building -----------------------------------------------------------
    def layers(self) -> list[Layer]:
        out: list[Layer] = []
        for node in self.gm.graph.nodes:
            if node is self.image:
                layer = Layer(name=node.name, op="input", kind=Kind.INPUT, target=str(node.target),
                              out_shape=self.input_shape, ndim=self.ndim)
            elif node.op == "output":
                layer = self.output_layer(node)
            elif node.op in ("call_module", "call_function", "call_method") and self.is_layer_value(node):
                layer = self.layer(node)
            else:
                continue
            self.layer_nodes[node] = layer
            self.by_name[layer.name] = layer
            out.append(layer)
            if self.mutates_input(node):
                root = self.root.get(node.args[0], node.args[0])
                self.root[node] = root
                self.last_writer[root] = node
        return out

    def mutates_input(self, node: Node) -> bool:
        """Whether the op writes its result into its first argument.

        Only the tensor itself is redirected, not other views of its storage.
        """
        if not node.args or not self.dep_tensor(node.args[0]):
            return False
        if node.op == "call_module":
            return getattr(self.gm.get_submodule(node.target), "inplace", False) is True
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True

    def output_layer(self, node: Node) -> Layer:
        ret = node.args[0]
        if not (isinstance(ret, Node) and ret in self.layer_nodes):
            got = type(self.values.get(ret, ret)).__name__ if isinstance(ret, Node) else type(ret).__name__
            raise PlanError(f"cannot plan {type(self.gm).__name__}: forward returns {got}; KQL needs one "
                            f"tensor of class scores computed from the image")
        src = self.layer_nodes[ret]
        return Layer(name=node.name, op="output", kind=Kind.OUTPUT, target="output",
                     inputs=(ret.name,), in_shapes=(src.out_shape,), out_shape=src.out_shape,
                     spatial_axes=src.spatial_axes, in_spatial_axes=self.input_layouts((ret.name,)),
                     ndim=self.ndim)

    def input_layouts(self, inputs: tuple[str, ...]) -> tuple:
        """``Layer.in_spatial_axes``: the producers' layouts, ``()`` if all channels first."""
        given = tuple(self.by_name[i].spatial_axes for i in inputs)
        return given if any(a is not None for a in given) else ()

    def layer(self, node: Node) -> Layer:
        inputs = self.layer_inputs(node)
        in_shapes = tuple(self.by_name[i].out_shape for i in inputs)
        out_shape = self.shape(node)
        target = target_name(node)
        handler, op = lookup(node, self.gm)
        try:
            fields = self.classify(node, handler, op, out_shape)
        except NotModelled as e:
            fields = {"op": op_name(handler, op), "kind": Kind.GLOBAL, "reason": str(e)}
        if fields["kind"] is Kind.POINT and len(set(inputs)) > 1:  # x.view_as(y): y's pixels are read too
            fields = {"op": fields["op"], "kind": Kind.GLOBAL, "extra": fields.get("extra", {}),
                      "reason": f"{fields['op']} reads {len(set(inputs))} image tensors"}
        if fields["kind"] is Kind.GLOBAL and fields.get("op") == "unknown" and not fields.get("reason"):
            fields["reason"] = f"not recognised: {target}" + (
                f" ({type(self.gm.get_submodule(node.target)).__name__})" if node.op == "call_module" else "")
        layer = Layer(name=node.name, target=target, inputs=inputs, in_shapes=in_shapes,
                      out_shape=out_shape, in_spatial_axes=self.input_layouts(inputs), ndim=self.ndim,
                      **fields)
        layer.flops = flops(layer)
        return layer

    def classify(self, node: Node, handler: str, op: str, out_shape: tuple[int, ...]) -> dict:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            return getattr(self, f"module_{handler}")(node, module, op, out_shape)
        return getattr(self, f"fn_{handler}")(node, op, out_shape)

    # -- shared checks ------------------------------------------------------
    def point(self, op: str, x: Node, out_shape: tuple[int, ...], axes: Optional[tuple[int, ...]] = None,
              **extra) -> dict:
        """A point op, if the output keeps the input's pixels where ``axes`` says
        (the input's layout by default); global otherwise."""
        in_shape, in_axes = self.shape(x), self.axes(x)
        out_axes = in_axes if axes is None else tuple(axes)
        if in_axes:
            same = len(out_axes) == len(in_axes) and all(a < len(out_shape) for a in out_axes) and \
                [in_shape[a] for a in in_axes] == [out_shape[a] for a in out_axes]
        else:
            same, out_axes = in_shape == out_shape, ()
        if not same:
            return dict(op=op, kind=Kind.GLOBAL, extra=extra,
                        reason=f"{op} changes the shape {in_shape} -> {out_shape}")
        return dict(op=op, kind=Kind.POINT, extra=extra, **_layout(out_shape, out_axes, self.ndim))

    def merge(self, op: str, operands: list[Node], out_shape: tuple[int, ...], **extra) -> dict:
        """A merge, if every operand lines up with the output pixel by pixel.

        An operand of spatial size 1 along an axis (the squeeze-and-excitation
        gate) is broadcast over that axis: still a merge, and the geometry sees
        from its ``in_shapes`` that a change there changes the whole axis.
        """
        shapes = [self.shape(x) for x in operands]
        layouts = {self.axes(x) for x in operands}
        axes = next(iter(layouts)) if len(layouts) == 1 else None
        if axes:
            ok = all(len(s) == len(out_shape) and all(s[a] in (1, out_shape[a]) for a in axes) for s in shapes)
        else:
            ok, axes = axes == () and all(s == out_shape for s in shapes), ()
        if len(layouts) > 1:
            return dict(op=op, kind=Kind.GLOBAL, extra=extra,
                        reason=f"{op} of maps whose pixels lie along different axes {sorted(layouts)}")
        if not ok:
            return dict(op=op, kind=Kind.GLOBAL, extra=extra,
                        reason=f"{op} of shapes {shapes} -> {out_shape} is not pixel by pixel")
        return dict(op=op, kind=Kind.MERGE, extra=extra, **_layout(out_shape, axes, self.ndim))

    def local(self, op: str, x: Node, **fields) -> dict:
        shape = self.shape(x)
        if not channels_first_axes(shape, self.ndim) or self.axes(x) != channels_first_axes(shape, self.ndim):
            raise NotModelled(f"{op} on a {shape} tensor, not a {'(C, D, H, W)' if self.ndim == 3 else '(C, H, W)'} map")
        fields.setdefault("extra", {})
        n = self.ndim
        for name in ("kernel", "stride", "dilation"):
            fields.setdefault(name, (1,) * n)
        fields.setdefault("padding", ((0, 0),) * n)
        return dict(op=op, kind=Kind.LOCAL, **fields)


    # -- point ops --------------------------------------------------------------
    def module_activation(self, node, m, op, out_shape):
        extra = {p: getattr(m, p) for p in ACTIVATION_PARAMS.get(op, ())}
        if op == "prelu":
            extra["weight"] = m.weight.detach()
        return self.point(op, self.first_input(node), out_shape, **extra)

    def fn_unary(self, node, op, out_shape):
        if node.op == "call_method" and op in ("contiguous", "clone", "detach"):
            b = {"input": node.args[0]}  # Tensor.contiguous has no torch function to bind as
        else:
            b = self.bind(node)
        extra = {p: self.const(v, p) for p, v in b.items() if p not in ("input", "inplace", "memory_format")}
        if not self.dep_tensor(b["input"]):
            raise NotModelled(f"{op} of a value that is not the image's")
        return self.point(UNARY_OP.get(op, op), b["input"], out_shape, **extra)

    def module_identity(self, node, m, op, out_shape):
        return self.point("identity", self.first_input(node), out_shape)

    def dropout(self, x: Node, p: Any, training: Any, out_shape) -> dict:
        p, training = self.const(p, "p"), self.const(training, "training")
        if training and p:
            raise NotModelled(f"dropout in training mode (p={p}) is random")
        return self.point("dropout", x, out_shape)

    def module_dropout(self, node, m, op, out_shape):
        return self.dropout(self.first_input(node), m.p, m.training, out_shape)

    def fn_dropout(self, node, op, out_shape):
        b = self.bind(node)  # F.dropout's ``training``, torch.dropout's ``train``, stochastic_depth's
        return self.dropout(b["input"], b["p"], b.get("training", b.get("train")), out_shape)

    def batch_norm(self, x, mean, var, weight, bias, training, eps, out_shape) -> dict:
        mean, var = self.const(mean, "running_mean"), self.const(var, "running_var")
        if self.const(training, "training") or mean is None or var is None:
            raise NotModelled("batch_norm uses the statistics of the batch (training mode or "
                              "track_running_stats=False)")
        if self.axes(x) != channels_first_axes(self.shape(x), self.ndim):
            raise NotModelled(f"batch_norm over axis 1 of a {self.shape(x)} map that is not channels first")
        weight, bias = self.const(weight, "weight"), self.const(bias, "bias")
        det = (lambda t: None if t is None else t.detach())
        return self.point("batch_norm", x, out_shape, running_mean=det(mean), running_var=det(var),
                          weight=det(weight), bias=det(bias), eps=float(self.const(eps, "eps")))

    def module_batch_norm(self, node, m, op, out_shape):
        return self.batch_norm(self.first_input(node), m.running_mean, m.running_var, m.weight, m.bias,
                               m.training or not m.track_running_stats, m.eps, out_shape)

    def fn_batch_norm(self, node, op, out_shape):
        b = self.bind(node)
        return self.batch_norm(b["input"], b["running_mean"], b["running_var"], b["weight"], b["bias"],
                               b["training"], b["eps"], out_shape)

    def instance_norm(self, x: Node, use_input_stats: bool, mean, var, weight, bias, eps, out_shape) -> dict:
        """Instance norm normalises each channel by its statistics over the whole
        map (volume): every output depends on every input pixel, a global layer.
        With running statistics in eval mode it is a per-channel affine map, a
        point layer like batch norm."""
        if use_input_stats or mean is None or var is None:
            what = "volume" if self.ndim == 3 else "image"
            return dict(op="instance_norm", kind=Kind.GLOBAL,
                        reason=f"instance norm computes its statistics over the whole {what}")
        return self.batch_norm(x, mean, var, weight, bias, False, eps, out_shape)

    def module_instance_norm(self, node, m, op, out_shape):
        uses_input = m.training or not m.track_running_stats
        return self.instance_norm(self.first_input(node), uses_input, m.running_mean, m.running_var,
                                  m.weight, m.bias, m.eps, out_shape)

    def fn_instance_norm(self, node, op, out_shape):
        b = self.bind(node)
        return self.instance_norm(b["input"], bool(self.const(b.get("use_input_stats", True), "use_input_stats")),
                                  b.get("running_mean"), b.get("running_var"), b.get("weight"), b.get("bias"),
                                  b.get("eps", 1e-5), out_shape)

    def layer_norm(self, x: Node, normalized_shape: Any, out_shape) -> dict:
        """Normalises the trailing ``len(normalized_shape)`` axes of each sample:
        per pixel when none of them is spatial (ConvNeXt: channels-last, over C)."""
        shape = self.const(normalized_shape, "normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
        in_shape, axes = self.shape(x), self.known_axes(x)
        if not axes or any(a >= len(in_shape) - k for a in axes):
            return dict(op="layer_norm", kind=Kind.GLOBAL, extra={"normalized_shape": shape},
                        reason=f"layer_norm over the last {k} axes of {in_shape} spans the pixels")
        return self.point("layer_norm", x, out_shape, normalized_shape=shape)

    def module_layer_norm(self, node, m, op, out_shape):
        return self.layer_norm(self.first_input(node), m.normalized_shape, out_shape)

    def fn_layer_norm(self, node, op, out_shape):
        b = self.bind(node)
        return self.layer_norm(b["input"], b["normalized_shape"], out_shape)

    def lrn(self, x, size, alpha, beta, k, out_shape) -> dict:
        # Normalises across channels only (PyTorch pools a channel window), so a
        # pixel's output depends on that pixel alone: a point op.
        if self.axes(x) != channels_first_axes(self.shape(x), self.ndim):
            raise NotModelled(f"local_response_norm of a {self.shape(x)} map that is not channels first")
        return self.point("local_response_norm", x, out_shape, size=size, alpha=alpha, beta=beta, k=k)

    def module_lrn(self, node, m, op, out_shape):
        return self.lrn(self.first_input(node), m.size, m.alpha, m.beta, m.k, out_shape)

    def fn_lrn(self, node, op, out_shape):
        b = self.bind(node)
        return self.lrn(b["input"], *(self.const(b[p], p) for p in ("size", "alpha", "beta", "k")), out_shape)

    def softmax(self, op, x, dim, out_shape) -> dict:
        # Along a per-pixel axis (the channels of an (N, C, H, W) map) it is per pixel, like LRN.
        rank = len(self.shape(x)) + 1
        dims = _per_pixel_dims(dim, rank, self.axes(x)) if dim is not None else None
        if dims and self.axes(x):
            return self.point(op, x, out_shape, dim=dims[0])
        return dict(op=op, kind=Kind.GLOBAL, extra={"dim": dim})

    def module_softmax(self, node, m, op, out_shape):
        dim = -3 if isinstance(m, torch.nn.Softmax2d) else m.dim
        return self.softmax(op, self.first_input(node), dim, out_shape)

    def fn_softmax(self, node, op, out_shape):
        b = self.bind(node)
        return self.softmax(op, b["input"], self.const(b["dim"], "dim"), out_shape)

    # -- arithmetic and merges ----------------------------------------------------
    def fn_arith(self, node, op, out_shape):
        canon = ARITH[op]
        b = self.bind(node)
        operands = [b["input"], b.get("other", b.get("exponent"))]
        deps = [v for v in operands if self.dep_tensor(v)]
        extra = {k: self.const(b[k], k) for k in ("alpha", "rounding_mode") if b.get(k) not in (None, 1)}
        if len(deps) >= 2:
            return self.merge(canon, deps, out_shape, **extra)
        if not deps:
            raise NotModelled(f"{canon} of values that are not the image's")
        i = 1 if operands[0] is deps[0] else 0  # where the constant sits: 2 - x is not x - 2
        return self.point(canon, deps[0], out_shape, const=self.const(operands[i], "operand"),
                          const_index=i, **extra)

    def fn_cat(self, node, op, out_shape):
        b = self.bind(node)
        if not isinstance(b["tensors"], (list, tuple)):
            raise NotModelled("cat of a list computed at run time")
        tensors = list(b["tensors"])
        deps = [t for t in tensors if self.dep_tensor(t)]
        rank = len(out_shape) + 1
        axes = self.axes(deps[0])
        dims = _per_pixel_dims(self.const(b["dim"], "dim"), rank, axes)
        if not axes or not dims:
            return dict(op="cat", kind=Kind.GLOBAL,
                        reason=f"cat along dim {b['dim']} of {rank}D tensors (not the channels)")
        if len(deps) >= 2:
            return self.merge("cat", deps, out_shape, dim=dims[0])
        # One image tensor next to constant channels: still pixel by pixel.
        return self.point("cat", deps[0], out_shape, dim=dims[0],
                          operands=[None if self.dep_tensor(t) else self.const(t, "cat operand")
                                    for t in tensors])

    # -- ops that move or regroup the per-pixel values -------------------------------
    def module_linear(self, node, m, op, out_shape):
        return self.linear(self.first_input(node), out_shape)

    def fn_linear(self, node, op, out_shape):
        return self.linear(self.bind(node)["input"], out_shape)

    def linear(self, x: Node, out_shape) -> dict:
        """Over a per-pixel last axis (a channels-last map) a Linear is a 1x1 conv."""
        axes = self.known_axes(x)
        if axes and len(self.shape(x)) - 1 not in axes:
            return self.point("linear", x, out_shape)
        return dict(op="linear", kind=Kind.GLOBAL)

    def reshape(self, x: Node, out_shape) -> dict:
        op = "flatten" if len(out_shape) == 1 else "reshape"
        axes = self.known_axes(x)
        out_axes = reshaped_axes(self.shape(x), axes, out_shape) if axes else None
        if out_axes is None:
            return dict(op=op, kind=Kind.GLOBAL)
        return self.point("reshape", x, out_shape, axes=out_axes)

    def module_reshape(self, node, m, op, out_shape):
        return self.reshape(self.first_input(node), out_shape)

    def fn_reshape(self, node, op, out_shape):
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not self.dep_tensor(x):
            raise NotModelled(f"{op} of a value that is not the image's")
        return self.reshape(x, out_shape)

    def fn_permute(self, node, op, out_shape):
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not self.dep_tensor(x):
            raise NotModelled(f"{op} of a value that is not the image's")
        rank = len(self.shape(x)) + 1
        if op == "transpose":
            b = self.bind(node)
            d0, d1 = (self.const(b[k], k) % rank for k in ("dim0", "dim1"))
            dims = list(range(rank))
            dims[d0], dims[d1] = d1, d0
        elif node.op == "call_method" and len(node.args) > 2:   # x.permute(0, 2, 3, 1)
            dims = self.const(list(node.args[1:]), "dims")
        else:
            dims = self.const(self.bind(node)["dims"], "dims")
        axes = self.known_axes(x)
        out_axes = permuted_axes(axes, tuple(dims)) if axes else None
        if out_axes is None:
            return dict(op="permute", kind=Kind.GLOBAL)
        return self.point("permute", x, out_shape, axes=out_axes, dims=tuple(dims))

    def fn_reduce(self, node, op, out_shape):
        # Over per-pixel axes only (the channels), keeping the pixels, a reduction is per pixel.
        b = self.bind(node)
        x, dim = b["input"], self.const(b.get("dim"), "dim")
        in_shape, axes = self.shape(x), self.axes(x)
        dims = _per_pixel_dims(dim, len(in_shape) + 1, axes) if dim is not None and axes else None
        if not dims:
            return dict(op=op, kind=Kind.GLOBAL)
        keepdim = bool(self.const(b.get("keepdim", False), "keepdim"))
        out_axes = axes if keepdim else tuple(a - sum(d - 1 < a for d in dims) for a in axes)
        return self.point(op, x, out_shape, axes=out_axes, dim=dims[0] if len(dims) == 1 else dims,
                          keepdim=keepdim)

    def interpolate(self) -> dict:
        return dict(op="interpolate", kind=Kind.GLOBAL,
                    reason="interpolation is not modelled as a local window")

    def module_interpolate(self, node, m, op, out_shape):
        return self.interpolate()

    def fn_interpolate(self, node, op, out_shape):
        return self.interpolate()

    def fn_getitem(self, node, op, out_shape):
        src = node.args[0]
        if isinstance(src, Node) and not self.dep_tensor(src):
            piece = self.piece(src, node.args[1], out_shape)
            if piece is not None:
                return piece
            return dict(op="getitem", kind=Kind.GLOBAL,
                        reason=f"element of the {type(self.values.get(src)).__name__} returned by "
                               f"{target_name(src)}")
        return dict(op="getitem", kind=Kind.GLOBAL, reason="tensor indexing is not modelled pixel by pixel")

    def piece(self, src: Node, index: Any, out_shape) -> Optional[dict]:
        """One piece of ``x.chunk(n, dim)`` / ``x.split(size, dim)`` along a
        per-pixel axis (ShuffleNetV2's channel split): a point layer."""
        name = src.target if src.op == "call_method" else getattr(src.target, "__name__", "")
        if src.op not in ("call_method", "call_function") or name not in ("chunk", "split") \
                or not src.args or not self.dep_tensor(src.args[0]) or not isinstance(index, int):
            return None
        x = src.args[0]
        dim = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
        dims = _per_pixel_dims(self.const(dim, "dim"), len(self.shape(x)) + 1, self.known_axes(x))
        if not dims or not self.known_axes(x) or index < 0:
            return None
        pieces = self.values.get(src)
        start = sum(int(p.shape[dims[0]]) for p in pieces[:index])
        return self.point("chunk", x, out_shape, dim=dims[0], start=start, length=int(out_shape[dims[0] - 1]))

    def module_unknown(self, node, m, op, out_shape):
        return dict(op="unknown", kind=Kind.GLOBAL)

    def fn_unknown(self, node, op, out_shape):
        return dict(op="unknown", kind=Kind.GLOBAL)
