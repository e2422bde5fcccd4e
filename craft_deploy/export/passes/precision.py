"""Precision passes: the opset upgrade, and FP16 weights and compute with LayerNormalization, Softmax and reductions
kept in FP32 (decomposed or not, LayerNorm's variance overflows FP16 on ViTs) and FP32 input/output so callers feed
the same arrays. Our own FP16 converter: onnxruntime.transformers' wrote duplicate Cast outputs and unsorted nodes on
timm's ViT graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from craft_deploy.runtimes.onnx_graph import (
    consumers,
    topological_sort,
)

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Erf")


def to_fp16(proto: onnx.ModelProto, keep_fp32: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    """FP16 copy of a float model: FP16 weights and activations; `keep_fp32` ops, the input and the output in FP32.

    Every FP32 tensor becomes FP16 under its own name. A kept op reads FP32 through a Cast in front of each float
    input and hands FP16 on through a Cast after each output; initializers only kept ops read stay FP32 (LayerNorm's
    scale and bias). Weights beyond FP16's range are clipped to +-65504.
    """
    proto = onnx.shape_inference.infer_shapes(proto)
    graph = proto.graph
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    readers = consumers(graph)
    fp32_inits = {
        t.name
        for t in graph.initializer
        if t.data_type == F32 and all(c.op_type in keep_fp32 for c in readers.get(t.name, []))
    }
    for t in graph.initializer:
        if t.data_type == F32 and t.name not in fp32_inits:
            w = np.clip(numpy_helper.to_array(t), -65504, 65504).astype(np.float16)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    nodes: list[onnx.NodeProto] = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == F32:
            for c in readers.get(inp.name, []):
                c.input[:] = [inp.name + "_fp16" if n == inp.name else n for n in c.input]
            nodes.append(helper.make_node("Cast", [inp.name], [inp.name + "_fp16"], to=F16))
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == F32}
    for node in graph.node:
        if node.op_type in keep_fp32:
            for i, name in enumerate(node.input):
                if types.get(name) == F32 and name not in fp32_inits:
                    nodes.append(helper.make_node("Cast", [name], [f"{name}_fp32_{node.name}_{i}"], to=F32))
                    node.input[i] = f"{name}_fp32_{node.name}_{i}"
            nodes.append(node)
            for i, name in enumerate(node.output):
                if types.get(name) == F32:
                    node.output[i] = name + "_fp32"
                    nodes.append(helper.make_node("Cast", [name + "_fp32"], [name], to=F16))
            continue
        if node.op_type == "Cast" and next(a.i for a in node.attribute if a.name == "to") == F32:
            next(a for a in node.attribute if a.name == "to").i = F16
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None and value.t.data_type == F32:
                value.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value.t).astype(np.float16)))
        nodes.append(node)
    for node in list(nodes):
        for i, name in enumerate(node.output):
            if name in outputs:
                node.output[i] = name + "_fp16"
                nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=F32))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    topological_sort(graph)
    return proto


def upgrade_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset (adapting ops whose signature changed, e.g. ReduceMean's axes at 18)."""
    from onnx import version_converter

    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return proto
    converted = version_converter.convert_version(proto, opset)
    converted.ir_version = max(converted.ir_version, 10)  # INT4 tensors need IR version 10
    return converted
