"""The structural gate: what an ONNX artifact computes in, read from the file, compared with its baseline's; no
timing, so its verdict is the same on every machine.

Per artifact: node counts per op type, QuantizeLinear / DequantizeLinear counts, the precision each weighted layer
(Conv, Gemm, MatMul) runs in (its weight's storage type and whether its input is quantized), file size and
multiply-adds at batch 1. A layer that falls back to float, or loses its quantized input, or a Q/DQ count that drops,
fails the gate; other changes are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from craft_deploy.runtimes.onnx_graph import initializers, producers

WEIGHTED = ("Conv", "Gemm", "MatMul")
THROUGH = ("Reshape", "Transpose", "Cast", "Identity")  # ops between a weight and its layer that keep its values


def onnx_structure(path: str | Path) -> dict[str, Any]:
    """The structure record of the ONNX file at `path`."""
    proto = onnx.load(str(path))
    graph = proto.graph
    inits, writers = initializers(graph), producers(graph)
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1

    def origin(name: str) -> onnx.NodeProto | None:
        node = writers.get(name)
        while node is not None and node.op_type in THROUGH + ("Pad", "Flatten", "Relu", "Clip", "MaxPool"):
            node = writers.get(node.input[0])
        return node

    layers: dict[str, dict[str, str]] = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        weight = writers.get(node.input[1])
        while weight is not None and weight.op_type in THROUGH:
            weight = writers.get(weight.input[0])
        if weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in inits:
            storage = TensorProto.DataType.Name(inits[weight.input[0]].data_type).lower()
        elif node.input[1] in inits:
            storage = TensorProto.DataType.Name(inits[node.input[1]].data_type).lower()
        else:
            continue  # an activation x activation MatMul (attention): no weight
        source = origin(node.input[0])
        layers[node.name or node.output[0]] = {
            "weights": storage,
            "input": "quantized" if source is not None and source.op_type == "DequantizeLinear" else "float",
        }
    return {
        "ops": ops,
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "layers": layers,
        "size_bytes": Path(path).stat().st_size,
        "macs": _macs(proto),
    }


def _macs(proto: onnx.ModelProto) -> int | None:
    """Multiply-adds of the weighted layers at batch 1, from ONNX shape inference (None where shapes are unknown)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:
        return None
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.output})
    inits = initializers(inferred.graph)
    writers = producers(inferred.graph)

    def weight_shape(name: str) -> list[int] | None:
        node = writers.get(name)
        while node is not None and node.op_type in THROUGH + ("DequantizeLinear",):
            name, node = node.input[0], writers.get(node.input[0])
        return list(inits[name].dims) if name in inits else shapes.get(name)

    total = 0
    for node in inferred.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        out, w = shapes.get(node.output[0]), weight_shape(node.input[1])
        if not out or not w or 0 in out:
            return None
        if node.op_type == "Conv":
            per_output = int(np.prod(w[1:]))  # (in / groups) x kh x kw
        else:  # MatMul [.., K] x [K, N]; Gemm's B is [N, K] when transB (as PyTorch writes it), else [K, N]
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            per_output = int(w[-1] if node.op_type == "Gemm" and trans_b else w[0])
        total += int(np.prod(out)) * per_output
    return total


def compare_structure(baseline: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Failures (a layer that falls back to float or loses its quantized input, fewer Q/DQ nodes) and other changes of
    `candidate` against `baseline`."""
    failures, changes = [], []
    for name, base in baseline["layers"].items():
        cand = candidate["layers"].get(name)
        if cand is None:
            changes.append(f"layer {name} is gone")
            continue
        if _integer(base["weights"]) and not _integer(cand["weights"]):
            failures.append(f"layer {name} falls back to float weights ({base['weights']} -> {cand['weights']})")
        if base["input"] == "quantized" and cand["input"] != "quantized":
            failures.append(f"layer {name} no longer has a quantized input")
    for key in ("quantize_linear", "dequantize_linear"):
        if candidate[key] < baseline[key]:
            failures.append(f"{key}: {baseline[key]} -> {candidate[key]} (a Q/DQ pair disappeared)")
    for op in sorted(set(baseline["ops"]) | set(candidate["ops"])):
        a, b = baseline["ops"].get(op, 0), candidate["ops"].get(op, 0)
        if a != b:
            changes.append(f"{op} {a} -> {b}")
    if baseline["macs"] and candidate["macs"] and baseline["macs"] != candidate["macs"]:
        changes.append(f"multiply-adds {baseline['macs']:,} -> {candidate['macs']:,}")
    if baseline["size_bytes"] != candidate["size_bytes"]:
        changes.append(f"size {baseline['size_bytes']:,} -> {candidate['size_bytes']:,} bytes")
    return {"failures": failures, "changes": changes}


def _integer(storage: str) -> bool:
    return storage.startswith(("int", "uint", "float8"))


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, or of every file of a directory in name order."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()
