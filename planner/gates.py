"""Global gates (squeeze-and-excitation) and how approximate plans treat them.

A gate is a 1x1 map pooled from a larger one and broadcast back onto a larger
map (global pool -> FC -> sigmoid -> multiply). ``geometry.propagate`` reads
:data:`GATE_MODES` to decide how far a gate's change spreads.
"""
from __future__ import annotations

from kql.planner.ir import Kind


#: How an approximate plan treats global gates (squeeze-and-excitation:
#: global pool -> FC -> sigmoid -> multiply). A gate reads the whole map, so
#: when a patch changes it, every later layer changes entirely and IVM gains
#: nothing (efficientnet_b0: R 1.04).
#:
#: - ``exact``: the gate's change spans the map (exact inference);
#: - ``local``: the gate is recomputed for the occluded image, but applied only
#:   inside the region the patch changes; outside it the map keeps its view
#:   (the gate's unoccluded value);
#: - ``frozen``: the gate keeps its unoccluded value everywhere.
GATE_MODES = ("exact", "local", "frozen")


def gate_sources(graph) -> frozenset:
    """Layers where a global gate starts: a 1x1 map pooled from a larger one
    whose every use, through further 1x1 layers, ends in a merge that
    broadcasts it onto a larger map. The classifier's global pool (which
    ends in the output) is not a gate.
    """
    layers = {layer.name: layer for layer in graph.layers()}

    def one_by_one(layer) -> bool:   # a 1x1 map (1x1x1 on a volume)
        return layer.spatial and all(n == 1 for n in layer.out_hw)

    memo: dict[str, bool] = {}

    def ends_in_broadcast(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # a cycle cannot occur in a DAG; guard anyway
            consumers = graph.consumers(name)
            ok = bool(consumers)
            for c in consumers:
                layer = layers[c]
                if layer.kind == Kind.MERGE and layer.spatial and not one_by_one(layer):
                    continue
                if one_by_one(layer) and layer.kind in (Kind.POINT, Kind.LOCAL, Kind.MERGE, Kind.GLOBAL) \
                        and ends_in_broadcast(c):
                    continue
                ok = False
            memo[name] = ok
        return memo[name]

    out = set()
    for layer in layers.values():
        if not one_by_one(layer) or not layer.inputs or layer.kind == Kind.INPUT:
            continue
        src = layers.get(layer.inputs[0])
        if src is None or not src.spatial or one_by_one(src):
            continue
        if ends_in_broadcast(layer.name):
            out.add(layer.name)
    return frozenset(out)
