"""The graph IR: :class:`Layer` (one annotated tensor node) and :class:`CNNGraph` (the DAG).

Built once by :func:`kql.planner.tracer.trace` (which uses the op tables of
:mod:`kql.planner.annotator`); the geometry, the cost model and the executors
only read it and never re-trace.

Kinds (Krypton section 3 calls them point / local / global transformations;
"merge" is its element-wise add and depth-wise concat, eqs. 35-38):

- ``point``: output pixel (y, x) depends only on input pixel (y, x) of the same
  tensor (ReLU, BatchNorm in eval, dropout in eval, arithmetic with constants,
  and the ops that only move or split the per-pixel axes: ConvNeXt's
  ``permute`` to channels-last and the LayerNorm and Linear that follow it,
  ShuffleNet's channel shuffle).
- ``local``: output pixel depends on a window of input pixels (conv, pooling,
  explicit padding); described by kernel/stride/padding/dilation.
- ``merge``: two or more spatial tensors from the graph combined pixel by pixel
  (add, mul, cat along channels): the changed region is the bounding box.
- ``global``: anything else (flatten, linear over the pixels, adaptive pooling
  that is not a plain window, unknown ops). Its output counts as changed
  everywhere, which is always safe.

**Layouts.** A feature map is ``(C, H, W)`` without the batch dimension
(channels first), unless a layer says otherwise: ``Layer.spatial_axes`` names
the axes of ``out_shape`` that are the image's rows and columns, in that order
(``(0, 1)`` for a channels-last ``(H, W, C)`` map, ``(2, 3)`` for the
``(groups, C/groups, H, W)`` of a channel shuffle). Every other axis is per
pixel. The geometry and the cost model only read the spatial sizes
(``out_hw``, ``input_hw``) and the per-pixel element count (``channels``);
an executor reads the axes to crop, paste and reshape patches.

Every ``local`` layer carries exactly what a crop executor needs to call the
functional op (``F.conv2d``, ``F.max_pool2d``, ``F.avg_pool2d``, ``F.pad``)
instead of the module: the input padded by ``padding`` with ``pad_value``,
then the op with padding 0 (conv weights in ``extra["weight"]`` and
``extra["bias"]``, ``extra["divisor_override"]`` for average pooling).
Average pooling with ``count_include_pad=False`` and ``ceil_mode`` with
padding are the two cases where explicit padding alone is not the same
thing: the executor must honour those flags. Local layers are channels first.

FLOPs are multiply-adds for one image (Krypton eq. 16 counts one per
multiplication of a fused multiply-add); see :func:`kql.planner.ops.flops`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import networkx as nx
import torch.fx
from torch.fx.node import Node

# Spatial axes of an image: (H, W). Feature maps without a layout of their own
# are (C, H, W), the spatial axes after the channels. A volume (a 3-D CNN's
# input) has three, (D, H, W) after the channels: ``Layer.ndim``.
SPATIAL_RANK = 2

#: The windowed ops by their number of spatial axes' suffix: ``conv2d`` and ``conv3d`` are one op.
CONV_OPS = ("conv2d", "conv3d")
MAX_POOL_OPS = ("max_pool2d", "max_pool3d")
AVG_POOL_OPS = ("avg_pool2d", "avg_pool3d")

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
            (``negative_slope``, ``min_val``...); ``dim`` of cat and softmax;
            ``normalized_shape`` of layer norm.
        spatial_axes: the axes of ``out_shape`` that are the image's rows and
            columns, in that order, when the layout is not channels first
            (``(0, 1)`` for a channels-last ``(H, W, C)`` map); ``None``, the
            default, is channels first (``(1, 2)`` for a rank-3 shape, none
            otherwise). ``()`` says the output has no spatial axes.
        in_spatial_axes: the same for each input (the producer's
            ``out_axes``); empty, or ``None`` entries, for channels first.
        ndim: spatial axes of the traced model's input: 2 for images, 3 for
            volumes ``(C, D, H, W)``. Channels-first maps have that many
            spatial axes after the channels; a local layer's ``kernel``,
            ``stride``, ``dilation`` and ``padding`` have one entry per axis,
            and ``out_hw`` / ``input_hw`` are ``ndim``-tuples.

    >>> relu = Layer("r", "relu", Kind.POINT, in_shapes=((8, 14, 14),), out_shape=(8, 14, 14))
    >>> relu.out_axes, relu.out_hw, relu.channels, relu.input_hw(0)
    ((1, 2), (14, 14), 8, (14, 14))
    >>> ln = Layer("n", "layer_norm", Kind.POINT, in_shapes=((14, 14, 8),), out_shape=(14, 14, 8),
    ...            spatial_axes=(0, 1), in_spatial_axes=((0, 1),))
    >>> ln.out_hw, ln.channels, ln.input_hw(0), ln.spatial
    ((14, 14), 8, (14, 14), True)
    >>> Layer("f", "flatten", Kind.GLOBAL, in_shapes=((8, 1, 1),), out_shape=(8,)).spatial
    False
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
    spatial_axes: Optional[tuple[int, ...]] = None
    in_spatial_axes: tuple[Optional[tuple[int, ...]], ...] = ()
    ndim: int = SPATIAL_RANK

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The spatial axes of ``out_shape`` (rows, then columns); ``()`` if none."""
        return _axes(self.out_shape, self.spatial_axes, self.ndim)

    def input_axes(self, i: int) -> tuple[int, ...]:
        """The spatial axes of input ``i``'s shape."""
        given = self.in_spatial_axes[i] if i < len(self.in_spatial_axes) else None
        return _axes(self.in_shapes[i], given, self.ndim)

    @property
    def spatial(self) -> bool:
        """True when the output is a feature map: ``(C, H, W)`` or another layout of it."""
        return bool(self.out_axes)

    @property
    def out_hw(self) -> Pair:
        """Spatial size of the output (``(H, W)``, ``(D, H, W)`` for a volume);
        all ones for a non-spatial output."""
        axes = self.out_axes
        return tuple(self.out_shape[a] for a in axes) if axes else (1,) * self.ndim  # type: ignore[return-value]

    def input_hw(self, i: int) -> Optional[Pair]:
        """Spatial size of input ``i``; ``None`` if it is not a feature map (or unknown)."""
        if i >= len(self.in_shapes):
            return None
        axes = self.input_axes(i)
        return tuple(self.in_shapes[i][a] for a in axes) if axes else None  # type: ignore[return-value]

    @property
    def in_hw(self) -> Pair:
        """Spatial size of the first input; all ones if it is not a feature map."""
        return self.input_hw(0) or (1,) * self.ndim

    @property
    def channels(self) -> int:
        """Elements per output pixel (``C`` of a ``(C, H, W)`` map, whatever the layout)."""
        return math.prod(self.out_shape) // math.prod(self.out_hw) if self.spatial else \
            math.prod(self.out_shape)

    def in_channels(self, i: int) -> int:
        """Elements per pixel of input ``i`` (all of it if it is not a feature map)."""
        hw = self.input_hw(i)
        return math.prod(self.in_shapes[i]) // (math.prod(hw) if hw else 1)


def channels_first_axes(shape: tuple[int, ...], ndim: int = SPATIAL_RANK) -> tuple[int, ...]:
    """The spatial axes of a channels-first map of this shape: all after the
    first when there are ``ndim`` of them (2 for images, 3 for volumes), none
    otherwise."""
    return tuple(range(1, ndim + 1)) if len(shape) == ndim + 1 else ()


def _axes(shape: tuple[int, ...], given: Optional[tuple[int, ...]], ndim: int = SPATIAL_RANK) -> tuple[int, ...]:
    return channels_first_axes(shape, ndim) if given is None else tuple(given)


def permuted_axes(axes: tuple[int, ...], dims: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """Spatial axes after ``x.permute(*dims)`` (``dims`` over the whole tensor,
    batch first) of a map whose spatial axes are ``axes`` (batch excluded).

    ``None`` when the permutation moves the batch axis: then it is not a
    per-pixel op. The row axis stays the row axis wherever it lands.

    >>> permuted_axes((1, 2), (0, 2, 3, 1))   # ConvNeXt: (C, H, W) -> (H, W, C)
    (0, 1)
    >>> permuted_axes((0, 1), (0, 3, 1, 2))   # and back
    (1, 2)
    >>> permuted_axes((2, 3), (0, 2, 1, 3, 4))  # channel shuffle: swap the two channel axes
    (2, 3)
    >>> permuted_axes((1, 2), (1, 0, 2, 3)) is None
    True
    """
    rank = len(dims)
    dims = tuple(d % rank for d in dims) if rank else ()
    if not dims or dims[0] != 0 or sorted(dims) != list(range(rank)):
        return None
    where = {d - 1: i - 1 for i, d in enumerate(dims) if i}  # input axis -> output axis
    return tuple(where[a] for a in axes)


def reshaped_axes(in_shape: tuple[int, ...], axes: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """Spatial axes after a reshape (batch kept, excluded from both shapes) that
    only splits or merges the per-pixel axes around the spatial ones; ``None``
    if it touches a spatial axis.

    Row-major, an element's flat index is ``(p * H + h) * S + s`` for the
    axes before (``p``) and after (``s``) a spatial axis of size ``H``; an
    output axis of size ``H`` whose preceding axes hold as many elements as
    ``p`` ranges over therefore has index ``h`` for every element: the pixel
    keeps its place, and only its per-pixel values are regrouped.

    >>> reshaped_axes((116, 28, 28), (1, 2), (2, 58, 28, 28))   # channel shuffle, split
    (2, 3)
    >>> reshaped_axes((58, 2, 28, 28), (2, 3), (116, 28, 28))   # and merge
    (1, 2)
    >>> reshaped_axes((8, 4, 4), (1, 2), (8, 16)) is None         # flattens the pixels
    True
    """
    if list(axes) != sorted(axes) or math.prod(in_shape) != math.prod(out_shape):
        return None
    out: list[int] = []
    for a in axes:
        before, size = math.prod(in_shape[:a]), in_shape[a]
        j = next((j for j in range(out[-1] + 1 if out else 0, len(out_shape))
                  if out_shape[j] == size and math.prod(out_shape[:j]) == before), None)
        if j is None:
            return None
        out.append(j)
    return tuple(out)


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
        input_shape: ``(C, H, W)`` the graph was traced for (``(C, D, H, W)``
            for a 3-D network).

    Iterating yields the layers in execution order; ``graph[name]`` is one
    layer and ``name in graph`` asks whether it exists.
    """

    def __init__(self, module: torch.fx.GraphModule, layers: list[Layer],
                 input_shape: tuple[int, ...]):
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
    def ndim(self) -> int:
        """Spatial axes of the input: 2 (an image) or 3 (a volume)."""
        return len(self.input_shape) - 1

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
        return (f"CNNGraph({type(self.module).__name__}, {len(self)} layers, input "
                f"{'x'.join(map(str, self.input_shape))}, "
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
            if self._by_name[src].out_axes != layer.input_axes(i):
                raise AssertionError(f"{where} input {i} {src!r} has spatial axes "
                                     f"{self._by_name[src].out_axes} but the layer expects "
                                     f"{layer.input_axes(i)}")
        axes = layer.out_axes
        if len(set(axes)) != len(axes) or any(not 0 <= a < len(layer.out_shape) for a in axes):
            raise AssertionError(f"{where} has spatial axes {axes} for shape {layer.out_shape}")
        if layer.kind is Kind.INPUT and layer.inputs:
            raise AssertionError(f"{where} is the input but reads {layer.inputs}")
        if layer.kind is not Kind.INPUT and not layer.inputs:
            raise AssertionError(f"{where} is {layer.kind} but reads no layer")
        if layer.kind is Kind.LOCAL:
            if len(layer.in_shapes) != 1 or not layer.spatial or \
                    layer.out_axes != channels_first_axes(layer.out_shape, layer.ndim) or \
                    layer.input_axes(0) != channels_first_axes(layer.in_shapes[0], layer.ndim):
                raise AssertionError(f"{where} is local but maps {layer.in_shapes} -> {layer.out_shape}, "
                                     f"not (C, H, W) -> (C, H, W)")
            expected = local_out_hw(layer)
            if expected != layer.out_hw:
                raise AssertionError(f"{where}: kernel {layer.kernel} stride {layer.stride} padding "
                                     f"{layer.padding} dilation {layer.dilation} ceil_mode {layer.ceil_mode} "
                                     f"on {layer.in_hw} give {expected}, the model produced {layer.out_hw}")
            if layer.op in CONV_OPS:
                w = layer.extra.get("weight")
                cin = layer.in_shapes[0][0]
                if w is None or tuple(w.shape[2:]) != tuple(layer.kernel) or \
                        w.shape[1] * layer.groups != cin or w.shape[0] != layer.out_shape[0]:
                    raise AssertionError(f"{where}: weight {None if w is None else tuple(w.shape)} with "
                                         f"groups {layer.groups} does not map {cin} -> "
                                         f"{layer.out_shape[0]} channels with kernel {layer.kernel}")


def local_out_hw(layer: Layer) -> Pair:
    """Output size a local layer's parameters imply (PyTorch's pooling_output_shape).

    Krypton eqs. 14-15 with asymmetric padding and dilation; ceil_mode drops a
    last window that would start in the bottom/right padding, as PyTorch does.
    """
    out = []
    for axis in range(len(layer.in_hw)):
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
    return tuple(out)


# ---------------------------------------------------------------------------
