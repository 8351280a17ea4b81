"""The CNN as a DAG of layers, traced once with torch.fx and annotated once.

Like torch.fx's ``ShapeProp``, every fact a later pass needs (kind, kernel,
stride, padding, shapes, FLOPs) is computed here and stored on the node; the
geometry, the cost model and the executors only read it and never re-trace.

Kinds (Krypton section 3 calls them point / local / global transformations;
"merge" is its element-wise add and depth-wise concat, eqs. 35-38):

- ``point``: output pixel (y, x) depends only on input pixel (y, x) of the same
  tensor (ReLU, BatchNorm in eval, dropout in eval, arithmetic with constants).
- ``local``: output pixel depends on a window of input pixels (conv, pooling,
  explicit padding); described by kernel/stride/padding/dilation.
- ``merge``: two or more spatial tensors from the graph combined pixel by pixel
  (add, mul, cat along channels): the changed region is the bounding box.
- ``global``: anything else (flatten, linear, adaptive pooling that is not a
  plain window, unknown ops). Its output counts as changed everywhere, which is
  always safe.

How a model becomes a :class:`CNNGraph` (:func:`trace`):

1. ``torch.fx`` symbolic tracing with a tracer that remembers which submodule
   it is inside, so a failure names it (``module 'layer2.0' (Bottleneck)``).
   Only ``torch.nn`` modules are leaves; everything else (torchvision blocks,
   ``Conv2dStaticSamePadding`` of efficientnet-lite) is traced through, so the
   graph holds the functional ops those blocks really call.
2. One interpreter pass on a ``(1, C, H, W)`` input under ``torch.no_grad``
   records every node's shape in ``node.meta["tensor_meta"]`` (as ShapeProp
   does) and keeps the values of what does not depend on the image (weights,
   ``x.size(0)``), which classification needs.
3. One :class:`Layer` per tensor-valued node that depends on the image. Nodes
   that do not (parameters, buffers, tensors computed only from them, or only
   from shape queries such as ``x.size(0)``) are constants: they are not
   layers and never appear in ``inputs``. After an in-place op
   (``nn.ReLU(inplace=True)``, ``x.mul_(2)``) later readers of the tensor it
   overwrote read the in-place layer, so the DAG computes what eager PyTorch
   does.

Every ``local`` layer carries exactly what a crop executor needs to call the
functional op (``F.conv2d``, ``F.max_pool2d``, ``F.avg_pool2d``, ``F.pad``)
instead of the module: the input padded by ``padding`` with ``pad_value``,
then the op with padding 0 (conv weights in ``extra["weight"]`` and
``extra["bias"]``, ``extra["divisor_override"]`` for average pooling).
Average pooling with ``count_include_pad=False`` and ``ceil_mode`` with
padding are the two cases where explicit padding alone is not the same
thing: the executor must honour those flags.

FLOPs are multiply-adds for one image (Krypton eq. 16 counts one per
multiplication of a fused multiply-add):

- conv: ``C_out * H_out * W_out * (C_in / groups) * kh * kw`` (eq. 16);
- linear: ``in * out``, times the leading non-batch dims if any;
- pooling windows: ``C * H_out * W_out * kh * kw``;
- reductions (mean/sum/amax, adaptive pooling that is not a window): one per
  input element;
- point, merge, batch norm, softmax, interpolate, unknown ops: one per
  output element;
- pad, flatten/reshape/permute, dropout, identity, contiguous, getitem,
  input, output: 0.
"""
from __future__ import annotations

import enum
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import networkx as nx
import torch
import torch.fx
from torch.fx.node import Node, map_aggregate, map_arg

from kql.errors import PlanError


class Kind(str, enum.Enum):
    INPUT = "input"
    POINT = "point"
    LOCAL = "local"
    MERGE = "merge"
    GLOBAL = "global"
    OUTPUT = "output"

    def __str__(self) -> str:  # prints as "local", not "Kind.LOCAL"
        return self.value


Pair = tuple[int, int]


@dataclass
class Layer:
    """One tensor-valued node of the traced model.

    Shapes exclude the batch dimension: a conv output is ``(C, H, W)``, a
    linear output ``(F,)``. Spatial pairs are ``(height, width)``.

    Attributes:
        name: the fx node name (unique in the graph).
        op: normalised operation: ``conv2d``, ``max_pool2d``, ``avg_pool2d``,
            ``pad``, ``relu``, ``batch_norm``, ``add``, ``mul``, ``cat``,
            ``linear``, ``flatten``, ``adaptive_avg_pool2d``, ... or
            ``unknown`` for anything not recognised.
        kind: see :class:`Kind`.
        target: what the model calls it, for display (module path such as
            ``features.0`` or a function name such as ``torch.conv2d``).
        inputs: names of the tensor layers this one reads, in argument order.
        kernel, stride, dilation: for ``local`` layers; ``(1, 1)`` otherwise.
        padding: ``((top, bottom), (left, right))`` implicit padding of a local
            layer, or the explicit padding of a ``pad`` layer. ceil_mode extra
            rows/columns at the bottom/right are *not* included here.
        pad_value: what the padding holds: 0.0 for conv and zero-pad,
            ``-inf`` for max pooling, the constant of a constant pad.
        groups: conv groups (1 otherwise).
        ceil_mode: pooling ceil_mode.
        count_include_pad: avg pooling's flag (True otherwise).
        in_shapes: shape of each input, in the order of ``inputs``.
        out_shape: shape of the output.
        flops: multiply-adds for one full image (see ``planner.cost``).
        reason: for ``global`` layers that are global only because they were
            not recognised, why (shown by EXPLAIN).
        extra: op-specific facts an executor needs: ``weight``/``bias`` of a
            conv; ``divisor_override`` of average pooling;
            ``adaptive_output_size`` when adaptive pooling became a window;
            ``mode`` of a pad; ``const``/``const_index`` (the constant operand
            and its position) of point arithmetic; running statistics, weight,
            bias and eps of batch norm; activation parameters
            (``negative_slope``, ``min_val``...); ``dim`` of cat and softmax.
    """
    name: str
    op: str
    kind: Kind
    target: str = ""
    inputs: tuple[str, ...] = ()
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0))
    dilation: Pair = (1, 1)
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    pad_value: float = 0.0
    in_shapes: tuple[tuple[int, ...], ...] = ()
    out_shape: tuple[int, ...] = ()
    flops: int = 0
    reason: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def spatial(self) -> bool:
        """True when the output is a ``(C, H, W)`` feature map."""
        return len(self.out_shape) == 3

    @property
    def out_hw(self) -> Pair:
        return (self.out_shape[1], self.out_shape[2]) if self.spatial else (1, 1)

    @property
    def in_hw(self) -> Pair:
        s = self.in_shapes[0] if self.in_shapes else ()
        return (s[1], s[2]) if len(s) == 3 else (1, 1)


# ---------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------

class CNNGraph:
    """A traced model: its layers in execution order and the DAG between them.

    Built by :func:`trace`; later passes read it and never re-trace.

    Attributes:
        module: the ``torch.fx.GraphModule`` (shares parameters with the model).
        dag: ``networkx.DiGraph`` with one node per layer name (node attribute
            ``layer`` holds the :class:`Layer`) and an edge producer -> consumer.
        input: name of the ``input`` layer.
        output: name of the ``output`` layer.
        input_shape: ``(C, H, W)`` the graph was traced for.

    Iterating yields the layers in execution order; ``graph[name]`` is one
    layer and ``name in graph`` asks whether it exists.
    """

    def __init__(self, module: torch.fx.GraphModule, layers: list[Layer],
                 input_shape: tuple[int, int, int]):
        self.module = module
        self.input_shape = tuple(int(v) for v in input_shape)
        self._layers = list(layers)
        self._by_name = {layer.name: layer for layer in self._layers}
        self._order = {layer.name: i for i, layer in enumerate(self._layers)}
        self.dag = nx.DiGraph()
        for layer in self._layers:
            self.dag.add_node(layer.name, layer=layer)
        for layer in self._layers:
            for src in layer.inputs:
                if src in self._by_name:  # a dangling name is lint()'s to report
                    self.dag.add_edge(src, layer.name)
        self.input = self._only(Kind.INPUT)
        self.output = self._only(Kind.OUTPUT)
        self._fx_nodes: dict[str, Node] = {}

    def _only(self, kind: Kind) -> str:
        names = [layer.name for layer in self._layers if layer.kind == kind]
        if len(names) != 1:
            raise ValueError(f"a CNNGraph needs exactly one {kind} layer, got {len(names)}: {names}")
        return names[0]

    # -- access -------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The layers in execution (fx) order: every layer after its inputs."""
        return list(self._layers)

    def __getitem__(self, name: str) -> Layer:
        try:
            return self._by_name[name]
        except KeyError:
            near = ", ".join(n for n in self._by_name if name in n or n in name) or \
                ", ".join(list(self._by_name)[:5]) + ", ..."
            raise KeyError(f"no layer named {name!r} in the graph of {len(self)} layers "
                           f"(did you mean: {near})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def consumers(self, name: str) -> list[str]:
        """Names of the layers that read ``name``, in execution order."""
        self[name]  # KeyError with a helpful message for an unknown name
        return sorted(self.dag.successors(name), key=self._order.__getitem__)

    def producers(self, name: str) -> list[str]:
        """Names of the layers ``name`` reads, in argument order, without repeats."""
        return list(dict.fromkeys(self[name].inputs))

    @property
    def total_flops(self) -> int:
        """Multiply-adds of one full forward pass (sum of ``Layer.flops``)."""
        return sum(layer.flops for layer in self._layers)

    def fx_node(self, name: str) -> Node:
        """The ``torch.fx`` node a layer was made from (same name)."""
        node = self._fx_nodes.get(name)
        if node is None or node.graph is not self.module.graph:  # first call, or the graph was rewritten
            self._fx_nodes = {n.name: n for n in self.module.graph.nodes}
            node = self._fx_nodes.get(name)
        if node is None:
            raise KeyError(f"no fx node named {name!r} in {type(self.module).__name__}'s graph")
        return node

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return (f"CNNGraph({type(self.module).__name__}, {len(self)} layers, input {c}x{h}x{w}, "
                f"{self.total_flops / 1e9:.3g} GFLOPs)")

    # -- checks -------------------------------------------------------------
    def lint(self) -> None:
        """Check the graph's invariants; raise ``AssertionError`` naming the first broken one.

        Cheap insurance after every rewrite (STYLE: torch.fx's ``Graph.lint``):
        names are unique, every input exists and comes earlier, the DAG is
        acyclic and matches ``inputs``, each producer's ``out_shape`` equals the
        consumer's ``in_shapes`` entry, and every ``local`` layer's output size
        follows from its kernel, stride, padding and dilation (so an executor
        calling the functional op gets the same size as the module did).
        """
        names = [layer.name for layer in self._layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AssertionError(f"layer names are not unique: {dup}")
        if set(self.dag.nodes) != set(names):
            raise AssertionError(f"dag nodes {sorted(set(self.dag.nodes) ^ set(names))} "
                                 f"do not match the layer list")
        if not nx.is_directed_acyclic_graph(self.dag):
            raise AssertionError(f"the graph has a cycle: {nx.find_cycle(self.dag)}")
        seen: set[str] = set()
        for layer in self._layers:
            self._lint_layer(layer, seen)
            seen.add(layer.name)
        edges = {(s, layer.name) for layer in self._layers for s in layer.inputs}
        if edges != set(self.dag.edges):
            raise AssertionError(f"dag edges differ from the layers' inputs: "
                                 f"{sorted(edges ^ set(self.dag.edges))}")
        if self[self.input].out_shape != self.input_shape:
            raise AssertionError(f"input layer {self.input!r} has shape {self[self.input].out_shape}, "
                                 f"graph input_shape is {self.input_shape}")

    def _lint_layer(self, layer: Layer, seen: set[str]) -> None:
        where = f"layer {layer.name!r} ({layer.op})"
        if not isinstance(layer.kind, Kind):
            raise AssertionError(f"{where} has kind {layer.kind!r}, not a Kind")
        if len(layer.in_shapes) != len(layer.inputs):
            raise AssertionError(f"{where} has {len(layer.inputs)} inputs {layer.inputs} "
                                 f"but {len(layer.in_shapes)} in_shapes {layer.in_shapes}")
        for i, (src, shape) in enumerate(zip(layer.inputs, layer.in_shapes)):
            if src not in self._by_name:
                raise AssertionError(f"{where} input {i} {src!r} is not a layer of the graph")
            if src not in seen:
                raise AssertionError(f"{where} input {i} {src!r} comes after it in execution order")
            produced = self._by_name[src].out_shape
            if tuple(produced) != tuple(shape):
                raise AssertionError(f"{where} input {i} {src!r} produces shape {tuple(produced)} "
                                     f"but the layer expects {tuple(shape)}")
        if layer.kind is Kind.INPUT and layer.inputs:
            raise AssertionError(f"{where} is the input but reads {layer.inputs}")
        if layer.kind is not Kind.INPUT and not layer.inputs:
            raise AssertionError(f"{where} is {layer.kind} but reads no layer")
        if layer.kind is Kind.LOCAL:
            if not layer.spatial or len(layer.in_shapes) != 1 or len(layer.in_shapes[0]) != 3:
                raise AssertionError(f"{where} is local but maps {layer.in_shapes} -> {layer.out_shape}, "
                                     f"not (C, H, W) -> (C, H, W)")
            expected = _local_out_hw(layer)
            if expected != layer.out_hw:
                raise AssertionError(f"{where}: kernel {layer.kernel} stride {layer.stride} padding "
                                     f"{layer.padding} dilation {layer.dilation} ceil_mode {layer.ceil_mode} "
                                     f"on {layer.in_hw} give {expected}, the model produced {layer.out_hw}")
            if layer.op == "conv2d":
                w = layer.extra.get("weight")
                cin = layer.in_shapes[0][0]
                if w is None or tuple(w.shape[2:]) != tuple(layer.kernel) or \
                        w.shape[1] * layer.groups != cin or w.shape[0] != layer.out_shape[0]:
                    raise AssertionError(f"{where}: weight {None if w is None else tuple(w.shape)} with "
                                         f"groups {layer.groups} does not map {cin} -> "
                                         f"{layer.out_shape[0]} channels with kernel {layer.kernel}")


def _local_out_hw(layer: Layer) -> Pair:
    """Output size a local layer's parameters imply (PyTorch's pooling_output_shape).

    Krypton eqs. 14-15 with asymmetric padding and dilation; ceil_mode drops a
    last window that would start in the bottom/right padding, as PyTorch does.
    """
    out = []
    for axis in (0, 1):
        n = layer.in_hw[axis]
        before, after = layer.padding[axis]
        if layer.op == "pad":
            out.append(n + before + after)
            continue
        span = layer.dilation[axis] * (layer.kernel[axis] - 1) + 1
        s = layer.stride[axis]
        room = n + before + after - span
        size = (-(-room // s) if layer.ceil_mode else room // s) + 1
        if layer.ceil_mode and (size - 1) * s >= n + before:
            size -= 1
        out.append(size)
    return (out[0], out[1])


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------

def trace(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> CNNGraph:
    """Trace ``model`` once and annotate every layer (kind, window, shapes, FLOPs).

    Args:
        model: any ``torch.nn.Module`` that takes one ``(N, C, H, W)`` image
            batch (further ``forward`` arguments must have defaults, which are
            used). It is put in eval mode: the graph describes inference.
        input_shape: ``(C, H, W)`` of one image.

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
    layers = _Annotator(gm, image, depends, values, shape).layers()
    return CNNGraph(gm, layers, shape)


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(v > 0 and v == s for v, s in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PlanError(f"input_shape must be (C, H, W) of one image with positive ints "
                        f"(the model gets a 4D (1, C, H, W) batch), got {input_shape!r}")
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
    what = _target_name(node)
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
               shape: tuple[int, int, int]) -> dict[Node, Any]:
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


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------

_REQ = object()  # marks a required parameter in a signature spec


class _Global(Exception):
    """Raised by a classifier to make the layer global with ``reason``."""


def _target_name(node: Node) -> str:
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


def _pair(v: Any, what: str) -> Pair:
    if isinstance(v, bool):
        raise _Global(f"{what} {v!r} is not an int or pair")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list, torch.Size)) and len(v) in (1, 2) and \
            all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (int(v[0]), int(v[-1]))
    raise _Global(f"{what} {v!r} is not an int or pair")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


# Parameter lists (name, default) after binding; ``input`` is the tensor (or
# ``self`` of a Tensor method).
_P_UNARY: dict[str, tuple] = {
    "relu": (("inplace", False),), "relu6": (("inplace", False),),
    "leaky_relu": (("negative_slope", 0.01), ("inplace", False)),
    "elu": (("alpha", 1.0), ("inplace", False)), "celu": (("alpha", 1.0), ("inplace", False)),
    "selu": (("inplace", False),), "gelu": (("approximate", "none"),),
    "silu": (("inplace", False),), "mish": (("inplace", False),),
    "hardswish": (("inplace", False),), "hardsigmoid": (("inplace", False),),
    "sigmoid": (), "tanh": (), "logsigmoid": (),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
    "clamp": (("min", None), ("max", None)), "clip": (("min", None), ("max", None)),
    "prelu": (("weight", _REQ),),
    "neg": (), "abs": (), "exp": (), "log": (), "sqrt": (), "rsqrt": (), "square": (),
    "erf": (), "reciprocal": (),
    "contiguous": (("memory_format", None),), "clone": (("memory_format", None),), "detach": (),
}
_UNARY_OP = {"clip": "clamp", "clone": "identity", "detach": "identity"}
_ARITH = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub", "subtract": "sub",
          "mul": "mul", "imul": "mul", "multiply": "mul", "truediv": "div", "itruediv": "div",
          "div": "div", "divide": "div", "true_divide": "div", "pow": "pow", "ipow": "pow",
          "maximum": "maximum", "minimum": "minimum"}
_P_ARITH = {"add": (("other", _REQ), ("alpha", 1)), "sub": (("other", _REQ), ("alpha", 1)),
            "div": (("other", _REQ), ("rounding_mode", None))}
_P = {
    "conv2d": (("weight", _REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
               ("groups", 1)),
    "max_pool2d": (("kernel_size", _REQ), ("stride", None), ("padding", 0), ("dilation", 1),
                   ("ceil_mode", False), ("return_indices", False)),
    "avg_pool2d": (("kernel_size", _REQ), ("stride", None), ("padding", 0), ("ceil_mode", False),
                   ("count_include_pad", True), ("divisor_override", None)),
    "adaptive_avg_pool2d": (("output_size", _REQ),),
    "adaptive_max_pool2d": (("output_size", _REQ), ("return_indices", False)),
    "pad": (("pad", _REQ), ("mode", "constant"), ("value", None)),
    "constant_pad_nd": (("pad", _REQ), ("value", 0)),
    "batch_norm": (("running_mean", _REQ), ("running_var", _REQ), ("weight", None), ("bias", None),
                   ("training", False), ("momentum", 0.1), ("eps", 1e-5)),
    "torch.batch_norm": (("weight", _REQ), ("bias", _REQ), ("running_mean", _REQ), ("running_var", _REQ),
                         ("training", _REQ), ("momentum", _REQ), ("eps", _REQ), ("cudnn_enabled", True)),
    "dropout": (("p", 0.5), ("training", True), ("inplace", False)),
    "torch.dropout": (("p", _REQ), ("train", _REQ)),
    "stochastic_depth": (("p", _REQ), ("mode", _REQ), ("training", True)),
    "linear": (("weight", _REQ), ("bias", None)),
    "flatten": (("start_dim", 0), ("end_dim", -1)),
    "reduce": (("dim", None), ("keepdim", False)),
    "softmax": (("dim", None),),
    "local_response_norm": (("size", _REQ), ("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)),
}


def _function_table() -> dict[str, tuple[str, str]]:
    """Display name (:func:`_target_name`) of a function -> (handler, op)."""
    table: dict[str, tuple[str, str]] = {}
    for n in _P_UNARY:
        for prefix in ("torch.nn.functional.", "torch.", "torch.special."):
            table[prefix + n] = ("unary", n)
            table[prefix + n + "_"] = ("unary", n)
    table["operator.neg"] = ("unary", "neg")
    table["operator.abs"] = ("unary", "abs")
    for n in _ARITH:
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
        "torch.nn.functional.pad": ("pad", "pad"),
        "torch.constant_pad_nd": ("pad", "constant_pad_nd"),
        "torch.nn.functional.batch_norm": ("batch_norm", "batch_norm"),
        "torch.batch_norm": ("batch_norm", "torch.batch_norm"),
        "torch.nn.functional.linear": ("linear", "linear"),
        "torch.cat": ("cat", "cat"), "torch.concat": ("cat", "cat"), "torch.concatenate": ("cat", "cat"),
        "torch.flatten": ("flatten", "flatten"),
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
        "torchvision.ops.stochastic_depth.stochastic_depth": ("stochastic_depth", "dropout"),
        "operator.getitem": ("getitem", "getitem"),
    }.items():
        table[name] = (handler, op)
    for n in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"):
        table["torch.nn.functional." + n] = ("dropout", "dropout")
    for n in ("dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"):
        table["torch." + n] = ("dropout", "torch.dropout")
    return table


def _method_table() -> dict[str, tuple[str, str]]:
    """Tensor method name -> (handler, op)."""
    table: dict[str, tuple[str, str]] = {}
    for n in _P_UNARY:
        table[n] = table[n + "_"] = ("unary", n)
    for n in ("add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "pow",
              "maximum", "minimum"):
        table[n] = table[n + "_"] = ("arith", n)
    table.update({
        "flatten": ("flatten", "flatten"), "view": ("reshape", "view"), "reshape": ("reshape", "reshape"),
        "view_as": ("reshape", "view"), "reshape_as": ("reshape", "reshape"),
        "squeeze": ("reshape", "squeeze"), "unsqueeze": ("reshape", "unsqueeze"),
        "permute": ("permute", "permute"), "transpose": ("permute", "transpose"),
        "mean": ("reduce", "mean"), "sum": ("reduce", "sum"), "amax": ("reduce", "amax"),
        "amin": ("reduce", "amin"), "softmax": ("softmax", "softmax"),
        "log_softmax": ("softmax", "log_softmax"),
    })
    return table


_FUNCTIONS = _function_table()
_METHODS = _method_table()


def _module_table() -> dict[type, tuple[str, str]]:
    """Exact ``torch.nn`` class -> (handler, op). Exact, so that a subclass with
    its own forward is never mistaken for the class it extends."""
    nn = torch.nn
    table: dict[type, tuple[str, str]] = {
        nn.Conv2d: ("conv", "conv2d"), nn.MaxPool2d: ("max_pool", "max_pool2d"),
        nn.AvgPool2d: ("avg_pool", "avg_pool2d"),
        nn.AdaptiveAvgPool2d: ("adaptive", "adaptive_avg_pool2d"),
        nn.AdaptiveMaxPool2d: ("adaptive", "adaptive_max_pool2d"),
        nn.BatchNorm1d: ("batch_norm", "batch_norm"), nn.BatchNorm2d: ("batch_norm", "batch_norm"),
        nn.SyncBatchNorm: ("batch_norm", "batch_norm"),
        nn.Identity: ("identity", "identity"), nn.Linear: ("linear", "linear"),
        nn.Flatten: ("flatten", "flatten"), nn.Unflatten: ("reshape", "unflatten"),
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


_MODULES = _module_table()
# Module attributes that are an activation's parameters (stored in ``extra``).
_ACTIVATION_PARAMS = {"leaky_relu": ("negative_slope",), "elu": ("alpha",), "celu": ("alpha",),
                      "gelu": ("approximate",), "hardtanh": ("min_val", "max_val"),
                      "softplus": ("beta", "threshold"), "prelu": ("weight",)}
_ZERO_FLOPS = {"input", "output", "pad", "flatten", "reshape", "view", "squeeze", "unsqueeze",
               "unflatten", "permute", "transpose", "dropout", "identity", "contiguous", "getitem"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "adaptive_avg_pool2d", "adaptive_max_pool2d"}


def _flops(layer: Layer) -> int:
    """Multiply-adds of one layer for one image (see the module docstring)."""
    out = _numel(layer.out_shape)
    if layer.op in _ZERO_FLOPS:
        return 0
    if layer.op == "conv2d" and layer.kind is Kind.LOCAL:
        kh, kw = layer.kernel
        return out * (layer.in_shapes[0][0] // layer.groups) * kh * kw  # Krypton eq. 16
    if layer.op in ("max_pool2d", "avg_pool2d") and layer.kind is Kind.LOCAL:
        return out * layer.kernel[0] * layer.kernel[1]
    if layer.op == "linear":
        return out * (layer.in_shapes[0][-1] if layer.in_shapes and layer.in_shapes[0] else 1)
    if layer.op in _REDUCTIONS:
        return _numel(layer.in_shapes[0]) if layer.in_shapes else out
    return out


class _Annotator:
    """Turns the propagated fx graph into :class:`Layer` objects."""

    def __init__(self, gm: torch.fx.GraphModule, image: Node, depends: dict[Node, bool],
                 values: dict[Node, Any], input_shape: tuple[int, int, int]):
        self.gm = gm
        self.image = image
        self.depends = depends
        self.values = values
        self.input_shape = input_shape
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
            raise _Global(f"not recognised: {_target_name(node)} called on {x!r}")
        return x

    def shape(self, node: Node) -> tuple[int, ...]:
        """Shape without the batch dimension."""
        return tuple(node.meta["tensor_meta"].shape)[1:]

    def dep_tensor(self, v: Any) -> bool:
        return isinstance(v, Node) and self.is_layer_value(v)

    def const(self, v: Any, what: str) -> Any:
        """The value of an argument that does not depend on the image."""
        if isinstance(v, Node):
            if self.dep_tensor(v):
                raise _Global(f"{what} depends on the input")
            return self.values[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.const(x, what) for x in v)
        return v

    def bind(self, node: Node, params: tuple, first: str = "input") -> dict[str, Any]:
        """Arguments of a call by name, with defaults (Nodes left as Nodes)."""
        names = [first] + [p for p, _ in params]
        if len(node.args) > len(names):
            raise _Global(f"not recognised: {_target_name(node)} with {len(node.args)} arguments")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        for p, default in ((first, _REQ),) + tuple(params):
            if p not in bound:
                if default is _REQ:
                    raise _Global(f"not recognised: {_target_name(node)} without {p!r}")
                bound[p] = default
        return bound

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
                              out_shape=self.input_shape)
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
        shape = self.layer_nodes[ret].out_shape
        return Layer(name=node.name, op="output", kind=Kind.OUTPUT, target="output",
                     inputs=(ret.name,), in_shapes=(shape,), out_shape=shape)

    def layer(self, node: Node) -> Layer:
        inputs = self.layer_inputs(node)
        in_shapes = tuple(self.by_name[i].out_shape for i in inputs)
        out_shape = self.shape(node)
        target = _target_name(node)
        try:
            fields = self.classify(node, out_shape)
        except _Global as e:
            fields = {"op": self.fallback_op(node), "kind": Kind.GLOBAL, "reason": str(e)}
        if fields["kind"] is Kind.GLOBAL and fields.get("op") == "unknown" and not fields.get("reason"):
            fields["reason"] = f"not recognised: {target}" + (
                f" ({type(self.gm.get_submodule(node.target)).__name__})" if node.op == "call_module" else "")
        layer = Layer(name=node.name, target=target, inputs=inputs, in_shapes=in_shapes,
                      out_shape=out_shape, **fields)
        layer.flops = _flops(layer)
        return layer

    def classify(self, node: Node, out_shape: tuple[int, ...]) -> dict:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            handler, op = _MODULES.get(type(module), ("unknown", "unknown"))
            return getattr(self, f"module_{handler}")(node, module, op, out_shape)
        table = _FUNCTIONS if node.op == "call_function" else _METHODS
        key = _target_name(node) if node.op == "call_function" else node.target
        handler, op = table.get(key, ("unknown", "unknown"))
        return getattr(self, f"fn_{handler}")(node, op, out_shape)

    # -- shared checks ------------------------------------------------------
    def point(self, op: str, x: Node, out_shape: tuple[int, ...], **extra) -> dict:
        """A point op, if the output keeps the input's spatial size (else global)."""
        in_shape = self.shape(x)
        if len(out_shape) == 3:
            same = len(in_shape) == 3 and in_shape[1:] == out_shape[1:]
        else:
            same = in_shape == out_shape
        if not same:
            return dict(op=op, kind=Kind.GLOBAL, extra=extra,
                        reason=f"{op} changes the shape {in_shape} -> {out_shape}")
        return dict(op=op, kind=Kind.POINT, extra=extra)

    def merge(self, op: str, operands: list[Node], out_shape: tuple[int, ...], **extra) -> dict:
        """A merge, if every operand lines up with the output pixel by pixel.

        An operand of spatial size 1 along an axis (the squeeze-and-excitation
        gate) is broadcast over that axis: still a merge, and the geometry sees
        from its ``in_shapes`` that a change there changes the whole axis.
        """
        shapes = [self.shape(x) for x in operands]
        if len(out_shape) == 3:
            ok = all(len(s) == 3 and s[1] in (1, out_shape[1]) and s[2] in (1, out_shape[2]) for s in shapes)
        else:
            ok = all(s == out_shape for s in shapes)
        if not ok:
            return dict(op=op, kind=Kind.GLOBAL, extra=extra,
                        reason=f"{op} of shapes {shapes} -> {out_shape} is not pixel by pixel")
        return dict(op=op, kind=Kind.MERGE, extra=extra)

    def local(self, op: str, x: Node, **fields) -> dict:
        if len(self.shape(x)) != 3:
            raise _Global(f"{op} on a {self.shape(x)} tensor, not a (C, H, W) map")
        fields.setdefault("extra", {})
        return dict(op=op, kind=Kind.LOCAL, **fields)

    # -- convolution ----------------------------------------------------------
    def conv(self, x: Node, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
             groups: Any) -> dict:
        weight = self.const(weight, "conv2d weight")
        bias = self.const(bias, "conv2d bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise _Global(f"conv2d weight {type(weight).__name__} is not a 4D tensor")
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        dilation = _pair(self.const(dilation, "dilation"), "dilation")
        stride = _pair(self.const(stride, "stride"), "stride")
        padding = self.const(padding, "padding")
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0), (0, 0))
            elif padding == "same":
                # PyTorch's 'same': total d*(k-1), the odd pixel at the bottom/right.
                tot = [d * (k - 1) for d, k in zip(dilation, kernel)]
                pads = ((tot[0] // 2, tot[0] - tot[0] // 2), (tot[1] // 2, tot[1] - tot[1] // 2))
            else:
                raise _Global(f"conv2d padding {padding!r} is not 'same' or 'valid'")
        else:
            ph, pw = _pair(padding, "padding")
            pads = ((ph, ph), (pw, pw))
        return self.local("conv2d", x, kernel=kernel, stride=stride, padding=pads, dilation=dilation,
                          groups=int(self.const(groups, "groups")), pad_value=0.0,
                          extra={"weight": weight.detach(),
                                 "bias": None if bias is None else bias.detach()})

    def module_conv(self, node, m, op, out_shape):
        if m.padding_mode != "zeros":
            raise _Global(f"padding_mode {m.padding_mode!r} is not zero padding")
        return self.conv(self.first_input(node), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

    def fn_conv(self, node, op, out_shape):
        b = self.bind(node, _P["conv2d"])
        return self.conv(b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"],
                         b["groups"])

    # -- pooling --------------------------------------------------------------
    def max_pool(self, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> dict:
        if return_indices:
            raise _Global("max_pool2d with return_indices")
        kernel = _pair(self.const(kernel_size, "kernel_size"), "kernel_size")
        stride = self.const(stride, "stride")
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
            else _pair(stride, "stride")  # PyTorch: stride defaults to the kernel
        ph, pw = _pair(self.const(padding, "padding"), "padding")
        return self.local("max_pool2d", x, kernel=kernel, stride=stride, padding=((ph, ph), (pw, pw)),
                          dilation=_pair(self.const(dilation, "dilation"), "dilation"),
                          ceil_mode=bool(self.const(ceil_mode, "ceil_mode")), pad_value=float("-inf"))

    def module_max_pool(self, node, m, op, out_shape):
        return self.max_pool(self.first_input(node), m.kernel_size, m.stride, m.padding, m.dilation,
                             m.ceil_mode, m.return_indices)

    def fn_max_pool(self, node, op, out_shape):
        b = self.bind(node, _P["max_pool2d"])
        return self.max_pool(b["input"], b["kernel_size"], b["stride"], b["padding"], b["dilation"],
                             b["ceil_mode"], b["return_indices"])

    def avg_pool(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        kernel = _pair(self.const(kernel_size, "kernel_size"), "kernel_size")
        stride = self.const(stride, "stride")
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
            else _pair(stride, "stride")
        ph, pw = _pair(self.const(padding, "padding"), "padding")
        return self.local("avg_pool2d", x, kernel=kernel, stride=stride, padding=((ph, ph), (pw, pw)),
                          ceil_mode=bool(self.const(ceil_mode, "ceil_mode")),
                          count_include_pad=bool(self.const(count_include_pad, "count_include_pad")),
                          pad_value=0.0,
                          extra={"divisor_override": self.const(divisor_override, "divisor_override")})

    def module_avg_pool(self, node, m, op, out_shape):
        return self.avg_pool(self.first_input(node), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                             m.count_include_pad, m.divisor_override)

    def fn_avg_pool(self, node, op, out_shape):
        b = self.bind(node, _P["avg_pool2d"])
        return self.avg_pool(b["input"], b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                             b["count_include_pad"], b["divisor_override"])

    def adaptive(self, op: str, x: Node, output_size: Any, out_shape: tuple[int, ...]) -> dict:
        """Adaptive pooling is a plain window when the input size divides evenly.

        Window i spans [floor(i*n/m), ceil((i+1)*n/m)) (PyTorch's adaptive
        pooling); with n = k*m that is [i*k, (i+1)*k): kernel = stride = k.
        """
        in_shape = self.shape(x)
        if len(in_shape) != 3:
            raise _Global(f"{op} on a {in_shape} tensor")
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
            raise _Global(f"{op} with return_indices")
        return self.adaptive(op, self.first_input(node), m.output_size, out_shape)

    def fn_adaptive(self, node, op, out_shape):
        b = self.bind(node, _P[op])
        if b.get("return_indices"):
            raise _Global(f"{op} with return_indices")
        return self.adaptive(op, b["input"], b["output_size"], out_shape)

    # -- padding --------------------------------------------------------------
    def pad(self, x: Node, pad: Any, mode: str, value: Any) -> dict:
        """Constant padding of H and W is local; F.pad lists (left, right, top, bottom, ...)."""
        pad = [int(p) for p in self.const(pad, "pad")]
        if mode != "constant":
            raise _Global(f"{mode!r} padding is not constant")
        if any(p < 0 for p in pad):
            raise _Global(f"negative padding {tuple(pad)} crops the input")
        if len(pad) % 2 or len(pad) < 2 or any(pad[4:]):
            raise _Global(f"padding {tuple(pad)} pads dimensions other than H and W")
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
        b = self.bind(node, _P[op])
        return self.pad(b["input"], b["pad"], self.const(b.get("mode", "constant"), "mode"), b["value"])

    # -- point ops --------------------------------------------------------------
    def module_activation(self, node, m, op, out_shape):
        extra = {p: getattr(m, p) for p in _ACTIVATION_PARAMS.get(op, ())}
        if op == "prelu":
            extra["weight"] = m.weight.detach()
        return self.point(op, self.first_input(node), out_shape, **extra)

    def fn_unary(self, node, op, out_shape):
        b = self.bind(node, _P_UNARY[op])
        extra = {p: self.const(b[p], p) for p, _ in _P_UNARY[op] if p not in ("inplace", "memory_format")}
        if not self.dep_tensor(b["input"]):
            raise _Global(f"{op} of a value that is not the image's")
        return self.point(_UNARY_OP.get(op, op), b["input"], out_shape, **extra)

    def module_identity(self, node, m, op, out_shape):
        return self.point("identity", self.first_input(node), out_shape)

    def dropout(self, x: Node, p: Any, training: Any, out_shape) -> dict:
        p, training = self.const(p, "p"), self.const(training, "training")
        if training and p:
            raise _Global(f"dropout in training mode (p={p}) is random")
        return self.point("dropout", x, out_shape)

    def module_dropout(self, node, m, op, out_shape):
        return self.dropout(self.first_input(node), m.p, m.training, out_shape)

    def fn_dropout(self, node, op, out_shape):
        b = self.bind(node, _P[op])
        return self.dropout(b["input"], b["p"], b.get("training", b.get("train")), out_shape)

    def fn_stochastic_depth(self, node, op, out_shape):
        b = self.bind(node, _P["stochastic_depth"])
        return self.dropout(b["input"], b["p"], b["training"], out_shape)

    def batch_norm(self, x, mean, var, weight, bias, training, eps, out_shape) -> dict:
        mean, var = self.const(mean, "running_mean"), self.const(var, "running_var")
        if self.const(training, "training") or mean is None or var is None:
            raise _Global("batch_norm uses the statistics of the batch (training mode or "
                            "track_running_stats=False)")
        weight, bias = self.const(weight, "weight"), self.const(bias, "bias")
        det = (lambda t: None if t is None else t.detach())
        return self.point("batch_norm", x, out_shape, running_mean=det(mean), running_var=det(var),
                          weight=det(weight), bias=det(bias), eps=float(self.const(eps, "eps")))

    def module_batch_norm(self, node, m, op, out_shape):
        return self.batch_norm(self.first_input(node), m.running_mean, m.running_var, m.weight, m.bias,
                               m.training or not m.track_running_stats, m.eps, out_shape)

    def fn_batch_norm(self, node, op, out_shape):
        b = self.bind(node, _P[op])
        return self.batch_norm(b["input"], b["running_mean"], b["running_var"], b["weight"], b["bias"],
                               b["training"], b["eps"], out_shape)

    def lrn(self, x, size, alpha, beta, k, out_shape) -> dict:
        # Normalises across channels only (PyTorch pools a channel window), so a
        # pixel's output depends on that pixel alone: a point op.
        return self.point("local_response_norm", x, out_shape, size=size, alpha=alpha, beta=beta, k=k)

    def module_lrn(self, node, m, op, out_shape):
        return self.lrn(self.first_input(node), m.size, m.alpha, m.beta, m.k, out_shape)

    def fn_lrn(self, node, op, out_shape):
        b = self.bind(node, _P["local_response_norm"])
        return self.lrn(b["input"], *(self.const(b[p], p) for p in ("size", "alpha", "beta", "k")),
                        out_shape)

    def softmax(self, op, x, dim, out_shape) -> dict:
        # Over the channels of a (N, C, H, W) map it is per pixel (like LRN).
        in_shape = self.shape(x)
        if dim is not None and len(in_shape) == 3 and dim in (1, -3):
            return self.point(op, x, out_shape, dim=1)
        return dict(op=op, kind=Kind.GLOBAL, extra={"dim": dim})

    def module_softmax(self, node, m, op, out_shape):
        dim = -3 if isinstance(m, torch.nn.Softmax2d) else m.dim
        return self.softmax(op, self.first_input(node), dim, out_shape)

    def fn_softmax(self, node, op, out_shape):
        b = self.bind(node, _P["softmax"])
        return self.softmax(op, b["input"], self.const(b["dim"], "dim"), out_shape)

    # -- arithmetic and merges ----------------------------------------------------
    def fn_arith(self, node, op, out_shape):
        canon = _ARITH[op]
        b = self.bind(node, _P_ARITH.get(canon, (("other", _REQ),)))
        operands = [b["input"], b["other"]]
        deps = [v for v in operands if self.dep_tensor(v)]
        extra = {k: self.const(b[k], k) for k in ("alpha", "rounding_mode") if b.get(k) not in (None, 1)}
        if len(deps) >= 2:
            return self.merge(canon, deps, out_shape, **extra)
        if not deps:
            raise _Global(f"{canon} of values that are not the image's")
        i = 1 if operands[0] is deps[0] else 0  # where the constant sits: 2 - x is not x - 2
        return self.point(canon, deps[0], out_shape, const=self.const(operands[i], "operand"),
                          const_index=i, **extra)

    def fn_cat(self, node, op, out_shape):
        b = self.bind(node, (("dim", 0),), first="tensors")
        dim = self.const(b.get("axis", b["dim"]), "dim")
        if not isinstance(b["tensors"], (list, tuple)):
            raise _Global("cat of a list computed at run time")
        tensors = list(b["tensors"])
        deps = [t for t in tensors if self.dep_tensor(t)]
        rank = len(out_shape) + 1
        if rank != 4 or dim not in (1, -3):
            return dict(op="cat", kind=Kind.GLOBAL,
                        reason=f"cat along dim {dim} of {rank}D tensors (not the channels)")
        if len(deps) >= 2:
            return self.merge("cat", deps, out_shape, dim=1)
        # One image tensor next to constant channels: still pixel by pixel.
        return self.point("cat", deps[0], out_shape, dim=1,
                          operands=[None if self.dep_tensor(t) else self.const(t, "cat operand")
                                    for t in tensors])

    # -- global ops -------------------------------------------------------------
    def module_linear(self, node, m, op, out_shape):
        return dict(op="linear", kind=Kind.GLOBAL)

    def fn_linear(self, node, op, out_shape):
        return dict(op="linear", kind=Kind.GLOBAL)

    def reshape_op(self, out_shape) -> str:
        return "flatten" if len(out_shape) == 1 else "reshape"

    def module_flatten(self, node, m, op, out_shape):
        return dict(op=self.reshape_op(out_shape), kind=Kind.GLOBAL)

    def fn_flatten(self, node, op, out_shape):
        return dict(op=self.reshape_op(out_shape), kind=Kind.GLOBAL)

    fn_reshape = fn_flatten

    def module_reshape(self, node, m, op, out_shape):
        return dict(op=self.reshape_op(out_shape), kind=Kind.GLOBAL)

    def fn_permute(self, node, op, out_shape):
        return dict(op="permute", kind=Kind.GLOBAL)

    def fn_reduce(self, node, op, out_shape):
        # Over the channels only, keeping H and W, a reduction is per pixel.
        b = self.bind(node, _P["reduce"])
        dim, x = self.const(b["dim"], "dim"), b["input"]
        dims = {dim} if isinstance(dim, int) else set(dim) if dim is not None else None
        in_shape = self.shape(x)
        if dims and len(in_shape) == 3 and dims <= {1, -3} and len(out_shape) == 3:
            return self.point(op, x, out_shape, dim=1, keepdim=True)
        return dict(op=op, kind=Kind.GLOBAL)

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
            return dict(op="getitem", kind=Kind.GLOBAL,
                        reason=f"element of the {type(self.values.get(src)).__name__} returned by "
                               f"{_target_name(src)}")
        return dict(op="getitem", kind=Kind.GLOBAL, reason="tensor indexing is not modelled pixel by pixel")

    def module_unknown(self, node, m, op, out_shape):
        return dict(op="unknown", kind=Kind.GLOBAL)

    def fn_unknown(self, node, op, out_shape):
        return dict(op="unknown", kind=Kind.GLOBAL)

    def fallback_op(self, node: Node) -> str:
        """The op name of a layer whose classifier gave up (it becomes global)."""
        if node.op == "call_module":
            return _MODULES.get(type(self.gm.get_submodule(node.target)), ("unknown", "unknown"))[1]
        table = _FUNCTIONS if node.op == "call_function" else _METHODS
        key = _target_name(node) if node.op == "call_function" else node.target
        handler, op = table.get(key, ("unknown", "unknown"))
        if handler == "arith":
            return _ARITH[op]
        op = _UNARY_OP.get(op, op)
        aliases = {"torch.batch_norm": "batch_norm", "torch.dropout": "dropout", "constant_pad_nd": "pad"}
        return aliases.get(op, op)
