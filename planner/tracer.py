"""The tracer: a model becomes a :class:`~kql.planner.ir.CNNGraph` (:func:`trace`).

1. ``torch.fx`` symbolic tracing with a tracer that remembers which submodule
   it is inside, so a failure names it (``module 'layer2.0' (Bottleneck)``).
   Only ``torch.nn`` modules are leaves; everything else (torchvision blocks,
   ``Conv2dStaticSamePadding`` of efficientnet-lite) is traced through, so the
   graph holds the functional ops those blocks really call.
2. One interpreter pass on a ``(1, C, H, W)`` input under ``torch.no_grad``
   records every node's shape in ``node.meta["tensor_meta"]`` (as ShapeProp
   does) and keeps the values of what does not depend on the image (weights,
   ``x.size(0)``), which classification needs.
3. The annotator (:mod:`kql.planner.annotator`, with the op tables of
   :mod:`kql.planner.ops`) makes one :class:`~kql.planner.ir.Layer` per
   tensor-valued node that depends on the image. Nodes that do not
   (parameters, buffers, tensors computed only from them, or only from shape
   queries such as ``x.size(0)``) are constants: they are not layers and never
   appear in ``inputs``. After an in-place op (``nn.ReLU(inplace=True)``,
   ``x.mul_(2)``) later readers of the tensor it overwrote read the in-place
   layer, so the DAG computes what eager PyTorch does.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.node import Node, map_aggregate

from kql.errors import PlanError
from kql.planner.annotator import Annotator
from kql.planner.ir import CNNGraph
from kql.planner.ops import target_name


def trace(model: torch.nn.Module, input_shape: tuple[int, ...]) -> CNNGraph:
    """Trace ``model`` once and annotate every layer (kind, window, shapes, FLOPs).

    Args:
        model: any ``torch.nn.Module`` that takes one ``(N, C, H, W)`` image
            batch (further ``forward`` arguments must have defaults, which are
            used). It is put in eval mode: the graph describes inference.
        input_shape: ``(C, H, W)`` of one image, or ``(C, D, H, W)`` of one
            volume (a 3-D CNN: Conv3d, MaxPool3d, ...; a video clip is
            ``(C, T, H, W)``).

    Returns:
        A :class:`CNNGraph` whose module is the ``torch.fx.GraphModule``
        (sharing the model's parameters).

    Raises:
        PlanError: the shape is not ``(C, H, W)``; the model cannot be traced
            symbolically (the message names the submodule where tracing
            stopped, e.g. data-dependent control flow); running it on a
            ``(1, C, H, W)`` input fails (the message names the node and
            module); or it does not return one tensor.

    >>> import torch.nn as nn
    >>> g = trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (3, 32, 32))
    >>> [(l.name, l.op, str(l.kind), l.out_shape) for l in g]  # doctest: +NORMALIZE_WHITESPACE
    [('input_1', 'input', 'input', (3, 32, 32)), ('_0', 'conv2d', 'local', (8, 32, 32)),
     ('_1', 'relu', 'point', (8, 32, 32)), ('_2', 'max_pool2d', 'local', (8, 16, 16)),
     ('output', 'output', 'output', (8, 16, 16))]
    >>> g["_0"].padding, g["_0"].flops == 8 * 32 * 32 * 3 * 3 * 3
    (((1, 1), (1, 1)), True)
    """
    shape = _check_input_shape(input_shape)
    if not isinstance(model, torch.nn.Module):
        raise PlanError(f"cannot trace {type(model).__name__}: expected a torch.nn.Module")
    model.eval()
    gm = _symbolic_trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise PlanError(f"cannot trace model: {type(model).__name__}.forward takes no input")
    image = placeholders[0]
    depends = _input_dependence(gm.graph, image)
    values = _propagate(gm, depends, shape)
    layers = Annotator(gm, image, depends, values, shape).layers()
    return CNNGraph(gm, layers, shape)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) in (3, 4) and all(v > 0 and v == s for v, s in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PlanError(f"input_shape must be (C, H, W) of one image or (C, D, H, W) of one volume with "
                        f"positive ints (the model gets a (1, C, H, W) or (1, C, D, H, W) batch), "
                        f"got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


class _KqlTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that knows which submodule it is tracing through.

    fx reports data-dependent control flow deep inside a model with a message
    that names no place; the stack of ``(path, class name)`` lets :func:`trace`
    name the innermost module, and ``node.meta["kql_module"]`` lets the shape
    pass name the module a failing function call sits in.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.failure: Optional[tuple[str, str]] = None

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:  # a module built inside forward(); fx will complain itself
            path = "?"
        self.stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure is None:  # the innermost module sees the error first
                self.failure = self.stack[-1]
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.stack:
            node.meta["kql_module"] = self.stack[-1]
        return node


def _symbolic_trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    name = type(model).__name__
    params = list(inspect.signature(model.forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise PlanError(f"cannot trace model: {name}.forward must take the image batch as its "
                        f"first argument, its signature is {inspect.signature(model.forward)}")
    concrete = {}
    for p in params[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise PlanError(f"cannot trace model: {name}.forward needs argument {p.name!r} besides the "
                            f"image; KQL passes only the image (give it a default)")
        concrete[p.name] = p.default  # traced as the constant it will be at inference
    tracer = _KqlTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        if tracer.failure is not None:
            path, cls = tracer.failure
            where = f"module '{path}' ({cls})"
        else:
            where = f"top-level module ({name})"
        hint = ""
        if isinstance(e, torch.fx.proxy.TraceError) or "control flow" in str(e):
            hint = (" (KQL plans over a torch.fx trace: replace Python if/for on tensor values "
                    "in that module with tensor ops such as torch.where)")
        raise PlanError(f"cannot trace model: {where} failed: {_first_line(e)}{hint}") from e
    return torch.fx.GraphModule(tracer.root, graph, name)


_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}


def _is_shape_query(node: Node) -> bool:
    """``x.size(0)``, ``x.shape``, ``len(x)``: facts of the shape, not of the pixels."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
        return node.target is len
    return False


def _input_dependence(graph: torch.fx.Graph, image: Node) -> dict[Node, bool]:
    """Which nodes' values change when the image's pixels do.

    Only the first placeholder is the image. A shape query breaks the chain:
    ``torch.zeros(1, 2, x.shape[2], x.shape[3])`` is a constant of the traced
    size, not a layer, and ``x.view(x.size(0), -1)`` reads only ``x``.
    """
    depends: dict[Node, bool] = {}
    for node in graph.nodes:
        depends[node] = node is image or (not _is_shape_query(node) and
                                          any(depends[a] for a in node.all_input_nodes))
    return depends


def _where(node: Node, gm: torch.fx.GraphModule) -> str:
    """'node 'x' (module 'a.b', Conv2d)' or 'node 'add' (operator.add in module 'a', Block)'."""
    if node.op == "call_module":
        return f"node {node.name!r} (module '{node.target}', {type(gm.get_submodule(node.target)).__name__})"
    what = target_name(node)
    owner = node.meta.get("kql_module")
    inside = f" in module '{owner[0]}', {owner[1]}" if owner else ""
    return f"node {node.name!r} ({what}{inside})"


class _Propagator(torch.fx.Interpreter):
    """One ShapeProp-like pass that also keeps the values classification needs.

    Tensors computed from the image only leave their metadata (shape, dtype)
    in ``node.meta["tensor_meta"]``; everything else (parameters, constant
    tensors, ints from ``x.size(0)``, the ``(left, right, top, bottom)`` of a
    dynamic ``F.pad``) is kept by value in ``self.values``.
    """

    def __init__(self, gm: torch.fx.GraphModule, depends: dict[Node, bool], example: torch.Tensor):
        super().__init__(gm)
        self.extra_traceback = False  # our PlanError already names the node
        self.depends = depends
        self.example = example
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata
        try:
            result = super().run_node(n)
        except Exception as e:
            raise PlanError(f"cannot propagate shapes through {_where(n, self.module)} on input "
                            f"{tuple(self.example.shape)}: {_first_line(e)}") from e
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
            if not self.depends[n]:
                self.values[n] = result
        elif self.depends[n]:
            self.values[n] = map_aggregate(
                result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v)
        else:
            self.values[n] = result
        n.meta["type"] = type(result)
        return result


def _propagate(gm: torch.fx.GraphModule, depends: dict[Node, bool],
               shape: tuple[int, ...]) -> dict[Node, Any]:
    ref = next(iter(gm.parameters()), None)
    if ref is None:
        ref = next(iter(gm.buffers()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    example = torch.zeros((1, *shape), dtype=dtype, device=device)
    prop = _Propagator(gm, depends, example)
    with torch.no_grad():
        prop.run(example)
    return prop.values
