"""Folding passes on the traced graph: weight quantizers onto INT8 initializers, constant Identity nodes, BatchNorm into
the convs before it (Q/DQ convs included), and small shape arithmetic into constants.

Our own, not a library's: the BatchNorm fold must rescale the per-channel Q/DQ scales of a quantized conv and keep its
integers (negating a channel for a negative gamma), which no generic optimizer does; the weight-quantizer fold turns
QuantizeLinear(constant) into stored integers, and the shape fold bounds the size of what it folds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from craft_deploy.runtimes.onnx_graph import (
    consumers,
    drop_unused_initializers,
    initializers,
    producers,
)


def fold_weight_quantizers(proto: onnx.ModelProto) -> int:
    """Replace QuantizeLinear on constant weights by INT8 initializers feeding the DequantizeLinear directly.

    This is the layout TensorRT's explicit quantization and ONNX Runtime expect (weights stored as int8, a quarter of
    the size). Returns how many weights were folded.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}  # deduplicated constants

    def const(name: str) -> np.ndarray | None:
        while name in identity:
            name = identity[name]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    readers = consumers(graph)
    folded, drop = 0, []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        w, scale = const(node.input[0]), const(node.input[1])
        zp = const(node.input[2]) if len(node.input) > 2 else np.zeros((), np.int8)
        if w is None or scale is None or zp is None:
            continue  # an activation quantizer
        w, scale = w.astype(np.float64), scale.astype(np.float64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zp_b = scale.reshape(shape), zp.astype(np.int64).reshape(shape)
        else:
            zp_b = zp.astype(np.int64)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale) + zp_b, info.min, info.max).astype(zp.dtype)
        qname = node.input[0] + "_quantized"
        graph.initializer.append(numpy_helper.from_array(q, qname))
        for c in readers.get(node.output[0], []):
            for i, name in enumerate(c.input):
                if name == node.output[0]:
                    c.input[i] = qname
        drop.append(node)
        folded += 1
    for node in drop:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]:
        graph.node.remove(node)
    drop_unused_initializers(graph)
    return folded


def bypass_constant_identities(proto: onnx.ModelProto) -> int:
    """Remove Identity nodes that only rename an initializer (the exporter's deduplicated constants); returns how many.

    Consumers then read the initializer itself, which the BatchNorm fold and the Q/DQ rewrites need to see.
    """
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    alias = {k: v for k, v in alias.items() if k not in outputs}
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in alias]:
        graph.node.remove(node)
    return len(alias)


def fold_batchnorm(proto: onnx.ModelProto) -> int:
    """Fold every BatchNormalization that follows a Conv into the Conv, in place; returns how many were folded.

    The exporter folds BatchNorm into float convs itself, but not into convs whose weight is DequantizeLinear(int8),
    and a BatchNormalization between a Conv and the next QuantizeLinear keeps ONNX Runtime from fusing the Q/DQ conv
    into one integer kernel. Per output channel k = gamma / sqrt(var + eps): a DQ weight keeps its integers and takes
    scale |k| * scale (a channel with k < 0 has its integers negated, exact on the symmetric grid; one with k = 0 has
    them zeroed and keeps its scale), a float weight is multiplied by k, and the bias becomes (b - mean) * k + beta.
    """
    graph = proto.graph
    inits = initializers(graph)
    writers = producers(graph)
    readers = consumers(graph)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> str:
        """A fresh initializer (the old one may be shared)."""
        new = f"{name}_bnfold"
        while new in inits:
            new += "_"
        inits[new] = numpy_helper.from_array(value, new)
        graph.initializer.append(inits[new])
        return new

    folded = []
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = writers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(readers.get(conv.output[0], [])) != 1 or len(bn.output) != 1:
            continue
        if not all(name in inits for name in bn.input[1:5]) or (len(conv.input) > 2 and conv.input[2] not in inits):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (array(n).astype(np.float64) for n in bn.input[1:5])
        k = gamma / np.sqrt(var + eps)
        weight = conv.input[1]
        dq = writers.get(weight)
        if weight in inits:
            w = array(weight)
            conv.input[1] = put(weight, (w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype))
        elif dq is not None and dq.op_type == "DequantizeLinear" and all(n in inits for n in dq.input):
            if len(readers.get(dq.output[0], [])) != 1:
                continue
            q, scale = array(dq.input[0]), array(dq.input[1])
            zp = array(dq.input[2]) if len(dq.input) > 2 else np.zeros_like(scale, dtype=q.dtype)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if (scale.size > 1 and axis != 0) or np.any(zp != 0) or q.dtype != np.int8 or (q == -128).any():
                continue
            sign = np.sign(k).astype(np.int8)  # a channel with k = 0 (gamma 0) computes beta alone: integers 0
            dq.input[0] = put(dq.input[0], q * sign.reshape(-1, *[1] * (q.ndim - 1)))
            scale = np.broadcast_to(scale, k.shape)
            new_scale = np.where(k != 0, scale * np.abs(k), scale).astype(scale.dtype)  # never a zero scale
            dq.input[1] = put(dq.input[1], new_scale)
            zp_name = put(dq.input[2] if len(dq.input) > 2 else dq.output[0] + "_zp", np.zeros(k.shape, q.dtype))
            del dq.input[2:]
            dq.input.append(zp_name)
            for a in [a for a in dq.attribute if a.name == "axis"]:
                dq.attribute.remove(a)
            dq.attribute.append(helper.make_attribute("axis", 0))
        else:
            continue
        bias = array(conv.input[2]).astype(np.float64) if len(conv.input) > 2 else np.zeros_like(k)
        dtype = array(bn.input[1]).dtype
        new_bias = put(f"{conv.name or conv.output[0]}_bias", ((bias - mean) * k + beta).astype(dtype))
        if len(conv.input) > 2:
            conv.input[2] = new_bias
        else:
            conv.input.append(new_bias)
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    used = drop_unused_initializers(graph)
    for stale in [v for v in graph.value_info if v.name not in used]:
        graph.value_info.remove(stale)
    return len(folded)


def fold_shape_constants(proto: onnx.ModelProto, max_elements: int = 1024) -> int:
    """Evaluate nodes whose inputs are all small constants (shape and padding arithmetic) into initializers.

    The exporter writes even a constant Pad as ConstantOfShape/Concat/Slice/Transpose/Cast chains; folding them leaves
    a plain Pad with constant pads that every runtime fuses. Quantize/Dequantize nodes and anything with more than
    `max_elements` values are kept as they are. Returns how many nodes were folded.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if int(np.prod(t.dims)) <= max_elements}
    opset = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if not all(name in values for name in node.input if name):
            continue
        feeds = {name: values[name] for name in node.input if name}
        sub = helper.make_graph(
            [node],
            "fold",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for n, v in feeds.items()
            ],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
        )
        outs = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset)).run(None, feeds)
        if any(np.asarray(o).size > max_elements for o in outs):
            continue
        for name, out in zip(node.output, outs):
            values[name] = np.asarray(out)
        folded.append(node)
    if not folded:
        return 0
    consumed = {name for node in graph.node if node not in folded for name in node.input}
    consumed |= {o.name for o in graph.output}
    existing = {t.name for t in graph.initializer}
    for node in folded:
        graph.node.remove(node)
        for name in node.output:
            if name in consumed and name not in existing:
                graph.initializer.append(numpy_helper.from_array(values[name], name))
    drop_unused_initializers(graph)
    return len(folded)
