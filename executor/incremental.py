"""Exact incremental inference (Krypton's IVM with MQO batching), over any DAG
that ``planner.graph.trace`` produces.

The unoccluded image is run once with every needed layer output kept: the
materialized *views*. For a batch of patch positions each layer then holds one
of three states:

- ``None``: unchanged for every position of the batch; readers use the view.
- :class:`Patch`: ``values (B, C, h, w)`` recomputed over one rectangle per
  position, all of the same size ``h x w`` (MQO: one conv call per layer per
  batch), with per-position origins ``oy, ox`` in the layer's output
  coordinates. The rectangle contains the position's changed region and is
  shifted inward at the borders (Krypton eqs. 29-34), so everything outside it
  equals the view.
- :class:`Full`: the whole output ``(B, ...)``, as in naive inference.

How each kind of layer updates (``planner.graph.Kind``):

- point: the op runs on the patch values only, same origins. A patch keeps
  its layer's layout (``Layer.out_axes``): inside a channels-last block
  (ConvNeXt) it is ``(B, h, w, C)``, after a channel split ``(B, g, C/g, h, w)``;
  the geometry is the same, only the axes differ. A reshape runs as a reshape
  to the layer's shape with the patch's spatial sizes, and a value that is
  not a tensor (the tuple of ``x.chunk(2, 1)``) is evaluated when a layer reads
  it, on patches for a point layer, in full otherwise.
- local: the output rectangle's read-in window (``geometry.read_region``) is
  gathered from the input's view with the input's patch superimposed and the
  layer's padding value outside the image (one ``kernels.gather`` call), and
  the op runs on it with zero padding. When the input's patch is that window
  for every position (a 1x1 convolution after a point op), it runs on the
  patch: nothing is gathered.
- merge: each input is gathered over the bounding box of the changed regions
  (eqs. 35-38) and the op runs on those.
- global, or a layer the plan computes in full (``plan.full_layers``, from
  the cost-based cutoff): inputs in patch state are pasted into copies of
  their views and the op runs normally; everything after it is full too.

The heatmap equals the naive one up to float rounding (the tests hold it to
1e-5 on probabilities over every position).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx.node import Node, map_arg

from kql import kernels
from kql.executor import common
from kql.executor.common import box_values, probabilities, run_batches
from kql.planner.geometry import Rects, read_region, thresholded
from kql.planner.ir import AVG_POOL_OPS, CONV_OPS, MAX_POOL_OPS, Kind


@dataclass
class Patch:
    values: torch.Tensor      # (B, C, h, w), or the layer's layout with h x w pixels ((B, C, d, h, w) on a volume)
    origin: tuple             # per spatial axis, (B,) int64: the box's first index in the layer's output

    @property
    def oy(self) -> torch.Tensor:
        """Top row of each position's box."""
        return self.origin[-2]

    @property
    def ox(self) -> torch.Tensor:
        """Left column of each position's box."""
        return self.origin[-1]


@dataclass
class Full:
    values: Any               # (B, ...) tensor


@dataclass
class _Lazy:
    node: Node                # a non-tensor value read from layers (a chunk's tuple), computed on use


class IncrementalRunner:
    """Holds the views of one plan and runs batches of positions."""

    def __init__(self, plan, model, regions: dict[str, Rects], full_layers: frozenset = frozenset(),
                 backend: str = "auto"):
        self.plan = plan
        self.graph = plan.graph
        self.gm = plan.graph.module
        self.regions = regions
        self.full_layers = full_layers
        self.backend = backend
        self._dep: dict[str, bool] = {}  # node -> depends on the image (_depends_on_input)
        self._inv: dict[str, torch.Tensor] = {}  # avg-pool layer -> 1/divisor map (_inv_divisor)
        self.device = torch.device(plan.device)
        if self.gm is not model:
            self.gm = self.gm.to(self.device)
        self.layers = {layer.name: layer for layer in self.graph.layers()}
        # Approximate plans: conv/pool layers whose regions the threshold caps.
        # Computed in full (past the cutoff, or after a global layer), their
        # output outside the capped region is reset to the view, so the
        # heatmap does not depend on where the cost model put the cutoff.
        tau = plan.tau
        self.capped = frozenset(name for name, layer in self.layers.items()
                                if tau is not None and tau < 1 and thresholded(layer))
        self._point_ok = {name: self._point_is_pixelwise(name) for name, layer in self.layers.items()
                          if layer.kind == Kind.POINT}
        # What _step asks of every layer on every batch, decided once here.
        self._global_means = frozenset(name for name, layer in self.layers.items()
                                       if self._is_global_mean(layer))
        self._gates = {name: frozenset(i for i in layer.inputs if self._broadcast_into(layer, i))
                       for name, layer in self.layers.items() if layer.kind == Kind.MERGE}
        # Positions for which a layer never changes (a frozen gate), for the layers that have any.
        self._unchanged = {name: r.is_empty for name, r in regions.items() if r.is_empty.any()}
        self.last_use = self._last_use()
        self.views, self.consts = self._materialize()
        self._starts = plan.positions()          # every grid position's corner, per axis
        self._views_cf: dict[str, torch.Tensor] = {}  # views as the kernels take them (_view_cf)

    # -- materialization ------------------------------------------------------
    def _needs_view(self, name: str) -> bool:
        """A view is kept when some consumer reads around or beyond the patch:
        everything but point layers (which read the patch only). A layer past
        the IVM cutoff is always computed in full, so nothing reads its view."""
        if name in self.capped or name in self._global_means:
            return True  # _cap_full and _global_mean read the layer's own view
        if self.regions[name].is_empty.all() and self.graph.consumers(name):
            return True  # never changes (a frozen gate): its readers read the view
        if name in self.full_layers:
            return False
        if self._gates.get(name):
            return True  # a gate applied locally keeps the view outside the region (_outside_to_view)
        for consumer in self.graph.consumers(name):
            kind = self.layers[consumer].kind
            if kind != Kind.POINT or not self._point_ok.get(consumer, False) or consumer in self.full_layers:
                return True
        return False

    def _materialize(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run the unoccluded image once; keep the views later layers read and
        every value that does not depend on the image (weights, constants).
        Within :func:`shared_forward`, take them from the pass the reference
        inference made (:func:`reference`) instead."""
        keep = {name for name in self.layers if self._needs_view(name)}
        shared = _SHARED.get()
        if shared is not None and shared.get("gm") is self.gm and shared.get("input") is self.plan.input:
            views = {name: shared["views"][name] for name in keep}
            consts = shared["consts"]
            shared["runners"] -= 1
            if shared["runners"] <= 0:
                shared.clear()  # the last runner of this execution has its views: free the rest
            return views, consts
        views, consts, _ = _unoccluded(self.gm, self.plan.input.to(self.device)[None], keep, self.last_use)
        return views, consts

    def _last_use(self) -> dict[str, int]:
        """Index of the last node that reads each value. A layer reads its
        ``inputs`` (looked through ``chunk`` tuples); a value that is not a
        tensor is computed when read (``_Lazy``), so what it reads lives as long."""
        nodes = list(self.gm.graph.nodes)
        last: dict[str, int] = {}
        for i, node in enumerate(nodes):
            layer = self.layers.get(node.name)
            for name in [a.name for a in node.all_input_nodes] + list(layer.inputs if layer else ()):
                last[name] = max(last.get(name, -1), i)
        for node in reversed(nodes):
            if node.name not in self.layers and node.name in last:
                for arg in node.all_input_nodes:
                    last[arg.name] = max(last[arg.name], last[node.name])
        return last

    def _depends_on_input(self, node: Node) -> bool:
        cache = self._dep
        if node.name not in cache:
            cache[node.name] = node.op == "placeholder" or any(
                self._depends_on_input(a) for a in node.all_input_nodes)
        return cache[node.name]

    def _point_is_pixelwise(self, name: str) -> bool:
        """A point layer may run on a patch unless a constant operand has a
        spatial extent (it would have to be cropped like the patch): broadcast
        against the output, its axes along the output's spatial ones are 1."""
        node = self.graph.fx_node(name)
        layer = self.layers[name]
        rank = len(layer.out_shape) + 1
        for arg in node.all_input_nodes:
            if self._depends_on_input(arg):
                continue
            meta = arg.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is None:
                continue
            lead = rank - len(shape)  # right-aligned broadcasting
            if any(a + 1 - lead >= 0 and shape[a + 1 - lead] != 1 for a in layer.out_axes):
                return False
        return True

    # -- running a batch ------------------------------------------------------
    def run(self, idx: np.ndarray, label: int) -> np.ndarray:
        """Probability of ``label`` for the positions ``idx`` of the grid."""
        return probabilities(self.outputs(idx))[:, label].float().cpu().numpy()

    def outputs(self, idx: np.ndarray):
        """The model's raw output for the positions ``idx`` of the grid, as
        naive inference of the occluded images would return it."""
        B = len(idx)
        starts = [a[idx] for a in self._starts]   # (ys, xs), or (zs, ys, xs) on a volume
        origin = tuple(_index(a, self.device) for a in starts)
        C = self.plan.input.shape[0]
        patch = box_values(self.plan.fill, starts, self.plan.patch, C, self.device)
        state: dict[str, Any] = {self.graph.input: Patch(patch, origin)}
        last_use = self.last_use
        out = None
        for i, node in enumerate(self.gm.graph.nodes):
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = self._full(node.args[0], state, B)
                break
            if node.name in self.consts:
                continue
            if node.name in self.layers:
                state[node.name] = self._step(self.layers[node.name], node, state, idx, B)
            elif self._reads_pixels(node, state):  # the tuple of x.chunk(2, 1), ...
                state[node.name] = _Lazy(node)
            else:  # a non-tensor value computed from tensors' shapes (x.size(0), ...)
                state[node.name] = self._call(node, lambda n: self._full(n, state, B, shape_only=True))
            for arg in node.all_input_nodes:
                if last_use.get(arg.name) == i:
                    state.pop(arg.name, None)
        return out

    def _reads_pixels(self, node: Node, state) -> bool:
        """Whether a non-tensor node reads a layer's values, not just its shape."""
        if node.op == "call_method" and node.target in _SHAPE_METHODS or \
                node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
            return False
        return any(a.name in self.layers or isinstance(state.get(a.name), _Lazy)
                   for a in node.all_input_nodes)

    def _step(self, layer, node, state, idx, B):
        ins = [state.get(name) for name in layer.inputs]
        if all(s is None for s in ins):
            return None  # nothing upstream changed for this batch
        unchanged = self._unchanged.get(layer.name)
        if unchanged is not None and unchanged[idx].all():
            return None  # e.g. a gate an approximate plan freezes (geometry.GATE_MODES)
        if layer.name in self._global_means and isinstance(ins[0], Patch):
            return Full(self._global_mean(layer, ins[0]))
        gates = self._gates.get(layer.name, ())
        full_mode = (layer.kind in (Kind.GLOBAL, Kind.OUTPUT) or layer.name in self.full_layers
                     or any(isinstance(s, Full) and name not in gates for s, name in zip(ins, layer.inputs))
                     or (layer.kind == Kind.POINT and not self._point_ok[layer.name]))
        if not full_mode:
            region = self.regions[layer.name][idx]
            box = tuple(int(n.max()) for n in region.sizes)   # the batch's patch size, per axis
            if box == tuple(layer.out_hw) and layer.kind != Kind.POINT:
                full_mode = True
        if full_mode:
            values = self._call(node, lambda n: self._full(n, state, B))
            if layer.name in self.capped:
                values = self._cap_full(layer, values, idx)
            return Full(values)
        if layer.kind == Kind.POINT:
            (src,) = [s for s in ins if s is not None]
            if layer.op == "reshape":  # to the layer's shape, with the patch's pixels
                shape = list(layer.out_shape)
                for a, n in zip(layer.out_axes, (src.values.shape[a + 1] for a in layer.input_axes(0))):
                    shape[a] = n
                return Patch(src.values.reshape(B, *shape), src.origin)
            values = self._call(node, lambda n: self._value_patch(n, state, src))
            return Patch(values, src.origin)
        placed = _place(region, box, layer.out_hw)
        origin = tuple(_index(a, self.device) for a in placed.lo)
        if layer.kind == Kind.LOCAL:
            return Patch(self._local(layer, state, placed, origin, box), origin)
        # merge: every input over the same boxes
        values = self._call(node, lambda n: self._value_over(n, state, origin, box, B))
        if any(isinstance(s, Full) and name in gates for s, name in zip(ins, layer.inputs)):
            # A changed gate applied only inside each position's region (gates
            # 'local'): the rest of the batch's box keeps the view, so the
            # result does not depend on how positions are batched.
            values = self._outside_to_view(layer, values, region, placed, origin, box)
        return Patch(values, origin)

    def _outside_to_view(self, layer, values, region: Rects, placed: Rects, origin, box) -> torch.Tensor:
        inside = _inside(region.shift(*(-a for a in placed.lo)), box, values.device)
        if bool(inside.all()):
            return values
        view = kernels.gather_nd(self.views[layer.name], origin, box, backend=self.backend)
        return torch.where(inside, values, view)

    def _broadcast_into(self, layer, name: str) -> bool:
        """``name`` is a 1x1 map (a gate) that the merge ``layer`` broadcasts
        onto a larger map: being computed in full (it is 1x1) does not make
        the merge full, which runs over its region with the gate's new values."""
        src = self.layers.get(name)
        return (layer.kind == Kind.MERGE and src is not None and src.spatial and _ones(src.out_hw)
                and not _ones(layer.out_hw))

    def _is_global_mean(self, layer) -> bool:
        """An average pool whose one window is the whole unpadded input (the
        squeeze of squeeze-and-excitation, ``adaptive_avg_pool2d(x, 1)``)."""
        return (layer.kind == Kind.LOCAL and layer.op in AVG_POOL_OPS and layer.spatial
                and _ones(layer.out_hw) and tuple(layer.kernel) == tuple(layer.in_hw)
                and all(p == (0, 0) for p in layer.padding) and not layer.extra.get("divisor_override")
                and layer.name not in self.full_layers and layer.name not in self.capped
                and self.layers[layer.inputs[0]].spatial_axes is None)  # channels first

    def _global_mean(self, layer, src: Patch) -> torch.Tensor:
        """The mean of the occluded map, updated from the view's by the patch
        alone: mean + (sum of new values - sum of old values under the patch) / HW.
        Reads the patch instead of pasting it into a copy of the whole map."""
        name = layer.inputs[0]
        nd = len(src.origin)
        box = tuple(src.values.shape[-nd:])
        old = kernels.gather_nd(self.views[name], src.origin, box, backend=self.backend)
        axes = tuple(range(2, 2 + nd))
        delta = (src.values.sum(dim=axes, dtype=torch.float64) - old.sum(dim=axes, dtype=torch.float64))
        view = self.views[layer.name].to(torch.float64).reshape(1, -1)
        mean = view + delta / math.prod(layer.in_hw)
        return mean.to(src.values.dtype).reshape(*mean.shape, *(1,) * nd)

    def _cap_full(self, layer, values: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """A thresholded layer computed in full: its values outside each
        position's capped region become the view's (projective-field
        thresholding, as when the layer runs incrementally)."""
        r = self.regions[layer.name][idx]
        if all((n == m).all() for n, m in zip(r.sizes, layer.out_hw)):
            return values
        inside = _inside(r, tuple(layer.out_hw), values.device)
        return torch.where(inside, values, self.views[layer.name])

    def _local(self, layer, state, placed: Rects, origin, box) -> torch.Tensor:
        """Recompute a conv/pool/pad over the output boxes ``placed`` (their
        first corners also given as device tensors ``origin``, their size
        ``box``) from a gathered window."""
        src_name = layer.inputs[0]
        src = state.get(src_name)
        base = self.views[src_name]
        read = read_region(layer, placed)
        sizes = tuple(int(n[0]) for n in read.sizes)
        starts = [_index(a, self.device) for a in read.lo]
        if (src is not None and layer.op != "pad" and tuple(src.values.shape[2:]) == sizes
                and all(torch.equal(a, b) for a, b in zip(starts, src.origin))):
            # The input's patch is the window itself (a 1x1 convolution after a
            # point op, e.g. each dense layer's bottleneck): nothing to gather.
            return self._apply_local(layer, src.values, origin, box)
        window = kernels.gather_nd(base, starts, sizes,
                                   None if src is None else src.values,
                                   None if src is None else src.origin,
                                   pad_value=float(layer.pad_value), backend=self._backend(layer))
        return self._apply_local(layer, window, origin, box)

    def _backend(self, layer) -> str:
        return self.plan.layer_backends.get(layer.name, self.backend)

    def _apply_local(self, layer, window, origin, box) -> torch.Tensor:
        op = layer.op
        if op == "pad":
            return window
        three = len(box) == 3   # a volume: the 3-D functional op
        if op in CONV_OPS:
            return (F.conv3d if three else F.conv2d)(window, layer.extra["weight"], layer.extra.get("bias"),
                                                     layer.stride, 0, layer.dilation, layer.groups)
        if op in MAX_POOL_OPS:
            return (F.max_pool3d if three else F.max_pool2d)(window, layer.kernel, layer.stride, 0,
                                                             layer.dilation)
        if op in AVG_POOL_OPS:
            divisor = layer.extra.get("divisor_override")
            summed = (F.avg_pool3d if three else F.avg_pool2d)(window, layer.kernel, layer.stride, 0,
                                                               divisor_override=1)
            if divisor:
                return summed / divisor
            # The divisor depends on where the window sits (padding, ceil_mode):
            # read it from a per-layer map of 1/divisor, cropped like the output.
            inv = self._inv_divisor(layer)
            return summed * kernels.gather_nd(inv, origin, box, backend=self._backend(layer))
        raise NotImplementedError(f"incremental {op} is not implemented")  # planner marks such layers full

    def _inv_divisor(self, layer) -> torch.Tensor:
        cache = self._inv
        if layer.name not in cache:
            size = tuple(layer.in_shapes[0][1:])
            ones = torch.ones(1, 1, *size, device=self.device)
            padding = tuple(before for before, _ in layer.padding)
            ceil = layer.ceil_mode
            pool = F.avg_pool3d if len(size) == 3 else F.avg_pool2d
            mean = pool(ones, layer.kernel, layer.stride, padding, ceil, layer.count_include_pad)
            count = pool(ones, layer.kernel, layer.stride, padding, ceil, True, divisor_override=1)
            cache[layer.name] = (mean / count)[0].contiguous()
        return cache[layer.name]

    # -- values of inputs in the shape a consumer needs -----------------------
    def _value_patch(self, n: Node, state, src: Patch):
        """Arguments of a point op running on ``src``'s patch."""
        if n.name in self.consts:
            return self.consts[n.name]
        s = state[n.name]
        if isinstance(s, _Lazy):
            return self._call(s.node, lambda m: self._value_patch(m, state, src))
        return s.values if isinstance(s, Patch) else s

    def _value_over(self, n: Node, state, origin, box, B):
        """An input of a merge gathered over the output boxes."""
        if n.name in self.consts:
            return self.consts[n.name]
        s = state.get(n.name)
        base = self.views.get(n.name)
        layer = self.layers[n.name]
        if base is not None and layer.spatial and _ones(layer.out_hw):
            return base.expand(B, *base.shape) if s is None else s.values  # a broadcast gate
        if isinstance(s, Full):
            return s.values
        axes = layer.out_axes
        shape = [B, *layer.out_shape]
        for a, size in zip(axes, box):
            shape[a + 1] = size
        values = kernels.gather_nd(self._view_cf(n.name, axes), origin, box,
                                   None if s is None else _channels_first(s.values, axes, 1),
                                   None if s is None else s.origin, backend=self.backend)
        return _in_layout(values, axes, shape)

    def _full(self, n, state, B, shape_only: bool = False):
        """The whole tensor of node ``n`` for the batch (pasting patches into views)."""
        if not isinstance(n, Node):
            return map_arg(n, lambda m: self._full(m, state, B, shape_only)) if isinstance(n, (tuple, list, dict)) else n
        if n.name in self.consts:
            return self.consts[n.name]
        s = state.get(n.name)
        if isinstance(s, Full):
            return s.values
        if isinstance(s, _Lazy):
            return self._call(s.node, lambda m: self._full(m, state, B, shape_only))
        if n.name not in self.layers:  # a non-tensor value (an int from x.size(0) ...)
            return s
        if shape_only:
            return _ShapeOnly((B,) + tuple(self.layers[n.name].out_shape), self.views.get(n.name))
        base = self.views[n.name]
        if s is None:
            return base.expand(B, *base.shape)
        axes = self.layers[n.name].out_axes
        out = kernels.paste_nd(self._view_cf(n.name, axes), _channels_first(s.values, axes, 1),
                               s.origin, backend=self.backend)
        return _in_layout(out, axes, (B, *base.shape))

    def _view_cf(self, name: str, axes) -> torch.Tensor:
        """The view of ``name`` channels first (:func:`_channels_first`), laid out
        once: a channels-last view would otherwise be copied on every batch."""
        view = self._views_cf.get(name)
        if view is None:
            view = self._views_cf[name] = _channels_first(self.views[name], axes, 0)
        return view

    # -- fx plumbing ----------------------------------------------------------
    def _call(self, node: Node, lookup):
        return _call(self.gm, node, lookup)


def _call(gm, node: Node, lookup):
    """Evaluate one fx ``node`` of ``gm``, its arguments looked up by ``lookup(node)``."""
    args = map_arg(node.args, lookup)
    kwargs = map_arg(node.kwargs, lookup)
    if isinstance(args, tuple) and any(isinstance(a, _ShapeOnly) for a in args):
        return _shape_call(node, args, kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise NotImplementedError(node.op)


# One unoccluded forward pass per execution: the reference inference keeps
# every layer's output, and the runners of the execution (one, or drill-down's
# two stages) take their views from it instead of running the image again.
_SHARED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("kql_shared_forward", default=None)


@contextlib.contextmanager
def shared_forward(runners: int):
    """Within it, :func:`reference` keeps every layer's unoccluded output and
    the next ``runners`` :class:`IncrementalRunner` of the same plan input and
    graph take their views from it (the last one frees the rest).

    A query on a small ``REGION`` otherwise paid three full forward passes
    (reference, and one materialization per drill-down stage) before its
    first position."""
    shared = {"runners": runners}
    token = _SHARED.set(shared)
    try:
        yield shared  # the caller may lower "runners" once it knows how many will run
    finally:
        _SHARED.get().clear()
        _SHARED.reset(token)


def reference(plan, model, score):
    """``executor.common.reference`` through the traced graph, keeping every
    layer's output for the runners of :func:`shared_forward` (outside one it
    is ``common.reference``)."""
    shared = _SHARED.get()
    if shared is None:
        return common.reference(plan, model, score)
    gm = plan.graph.module
    device = torch.device(plan.device)
    if gm is not model:
        gm = gm.to(device)
    layers = {layer.name for layer in plan.graph.layers()}
    last_use = {a.name: i for i, node in enumerate(gm.graph.nodes) for a in node.all_input_nodes}

    def forward(x):
        views, consts, output = _unoccluded(gm, x, layers, last_use)
        shared.update(gm=gm, input=plan.input, views=views, consts=consts)
        return output

    with torch.inference_mode():
        return common.reference(plan, forward, score)


def _unoccluded(gm, x, keep, last_use: dict[str, int]):
    """One pass of ``gm`` over the unoccluded input ``x`` (batch 1):
    ``(views, consts, output)``, the outputs of the tensor nodes in ``keep``
    without their batch axis, every value that does not depend on the input
    (weights, constants) and the graph's output. A value is freed after the
    node ``last_use`` names as its last reader."""
    env: dict[str, Any] = {}
    views, consts, dependent = {}, {}, set()
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "output":
            return views, consts, map_arg(node.args[0], lambda n: env[n.name])
        value = x if node.op == "placeholder" else _call(gm, node, lambda n: env[n.name])
        env[node.name] = value
        if node.name in keep and isinstance(value, torch.Tensor):
            views[node.name] = value[0]
        if node.op == "placeholder" or any(a.name in dependent for a in node.all_input_nodes):
            dependent.add(node.name)
        else:
            consts[node.name] = value
        for arg in node.all_input_nodes:
            if last_use.get(arg.name) == i:
                env.pop(arg.name, None)
    raise AssertionError("a traced graph ends with an output node")


def _channels_first(t: torch.Tensor, axes: tuple[int, ...], batch: int) -> torch.Tensor:
    """A map (``batch`` leading axes, then the layer's shape, spatial ``axes``
    among it) as ``(..., C, H, W)``: every per-pixel axis folded into one
    channel axis before the spatial ones, as the kernels take it. A
    channels-first ``(C, H, W)`` map is returned as it is."""
    rank = t.dim() - batch
    if tuple(axes) == tuple(range(rank - len(axes), rank)) and rank == len(axes) + 1:
        return t
    moved = t.movedim([a + batch for a in axes], list(range(t.dim() - len(axes), t.dim())))
    return moved.reshape(*moved.shape[:batch], -1, *moved.shape[t.dim() - len(axes):]).contiguous()


def _in_layout(t: torch.Tensor, axes: tuple[int, ...], shape) -> torch.Tensor:
    """Inverse of :func:`_channels_first` for a batched ``(B, C, H, W)`` ``t``:
    the batch of maps of ``shape`` (batch first) in the layer's layout."""
    shape = tuple(shape)
    rank = len(shape) - 1
    if tuple(axes) == tuple(range(rank - len(axes), rank)) and rank == len(axes) + 1:
        return t
    spatial = [a + 1 for a in axes]
    others = [d for d in range(len(shape)) if d not in spatial]
    moved = t.reshape(*(shape[d] for d in others), *(shape[d] for d in spatial))
    return moved.movedim(list(range(len(others), len(shape))), spatial)


_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}


class _ShapeOnly:
    """Stands in for a tensor when only its shape is read (``x.size(0)``)."""

    def __init__(self, shape, view):
        self.shape = torch.Size(shape)
        self.view = view


def _shape_call(node, args, kwargs):
    obj = args[0]
    if node.op == "call_method" and node.target == "size":
        return obj.shape if len(args) == 1 and not kwargs else obj.shape[args[1] if len(args) > 1 else kwargs["dim"]]
    if node.op == "call_method" and node.target == "dim":
        return len(obj.shape)
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" and args[1] == "shape":
        return obj.shape
    raise NotImplementedError(f"cannot evaluate {node.format_node()} on a shape")


def _place(region: Rects, box, out_hw) -> Rects:
    """Boxes of size ``box`` (``(h, w)``, or ``(d, h, w)``) that contain each
    position's changed region and lie inside the output, shifted inward at the
    borders (Krypton eqs. 29-34, along every axis)."""
    lo = [np.clip(np.minimum(a, m - n), 0, None) for a, n, m in zip(region.lo, box, out_hw)]
    return Rects(*lo, *(a + n for a, n in zip(lo, box)))


def _ones(size) -> bool:
    """A map of one pixel (voxel): a gate or a global mean."""
    return all(n == 1 for n in size)


def _inside(r: Rects, shape, device) -> torch.Tensor:
    """``(B, 1, *shape)`` bool: the cells of a ``shape`` map inside each box of ``r``."""
    nd = len(shape)
    inside = None
    for a, n in enumerate(shape):
        idx = torch.arange(n, device=device)
        lo, hi = _index(r.lo[a], device)[:, None], _index(r.hi[a], device)[:, None]
        along = ((idx >= lo) & (idx < hi)).view(len(r), 1, *(n if b == a else 1 for b in range(nd)))
        inside = along if inside is None else inside & along
    return inside


def _index(a, device) -> torch.Tensor:
    """An int64 tensor holding a copy of ``a`` (numpy arrays may be read-only views)."""
    return torch.tensor(np.asarray(a, dtype=np.int64), device=device)


def occlusion_probabilities(plan, model, label: int, progress: str = "auto",
                            batches: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, float]:
    """Probability of ``label`` at every grid position (flat, row-major) by
    incremental inference, and the seconds it took (materialization included).

    The positions run in the plan's batches (``plan.batches()``), or in
    ``batches`` = ``(order, bounds)`` when given (drill-down's stage two,
    scheduled by the planner at run time); the positions not run are NaN.
    """
    values, seconds = occlusion_scores(plan, model, lambda out: probabilities(out)[:, [label]],
                                       progress, batches)
    return (values[:, 0] if values.shape[1] else np.full(len(values), np.nan, np.float32)), seconds


def occlusion_scores(plan, model, reduce, progress: str = "auto",
                     batches: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, float]:
    """``reduce(raw model output)`` -- a ``(B, T)`` tensor, e.g. the
    probabilities of T labels -- at every grid position: ``(positions, T)``
    float32 (row-major grid order), and the seconds it took. One incremental
    run serves every column: the model's whole output is computed anyway.

    The positions run in the plan's batches, or in ``batches`` =
    ``(order, bounds)``; the rows not run are NaN.
    """
    import time
    start = time.perf_counter()
    n = plan.n_positions
    order, bounds = plan.batches() if batches is None else batches
    out = None
    if len(order) == 0:
        return np.full((n, 0), np.nan, dtype=np.float32), time.perf_counter() - start
    with torch.inference_mode():
        runner = IncrementalRunner(plan, model, plan.regions, plan.full_layers, plan.gather_backend)

        def step(sl: slice) -> None:
            nonlocal out
            idx = order[sl]
            values = reduce(runner.outputs(idx)).float().cpu().numpy()
            if out is None:
                out = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
            out[idx] = values

        run_batches(len(order), bounds, step, progress=progress, plan=plan)
    return out, time.perf_counter() - start
