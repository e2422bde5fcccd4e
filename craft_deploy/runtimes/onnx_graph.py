"""Small ONNX graph helpers shared by the export passes: who produces and who reads a tensor, dead initializers,
node order.

Why not onnx_ir's TopologicalSortPass / RemoveUnusedNodesPass: our passes edit the GraphProto in place and call these
between rewrites. Backing them with onnx_ir (GraphProto -> ir.Model -> pass -> GraphProto) was tried: it is as fast,
but the round trip writes value_info for every intermediate tensor, which then contradicts ONNX shape inference once a
later pass changes a shape (scalar Q/DQ parameters: "Inferred shape and existing shape differ"), so the W7A8
ort-cpu export of the default failed. Twenty lines of our own keep the passes independent of that.
"""

from __future__ import annotations

import onnx


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name."""
    return {t.name: t for t in graph.initializer}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node that writes each tensor."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, in graph order (a node reading a tensor twice is listed twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def drop_unused_initializers(graph: onnx.GraphProto) -> set[str]:
    """Remove initializers that no node reads and that are no graph output; returns the names still in use."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return used


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder the graph's nodes so that every node comes after the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or a dangling input at {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
