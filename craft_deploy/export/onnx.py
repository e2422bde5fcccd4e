"""ONNX export: FP32 for dense/pruned bundles, Q/DQ INT8 for quantized ones; metadata so consumers need no flags."""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

META_KEY = "craft_deploy"


@torch.no_grad()
def pre_clamp_weights(model: nn.Module) -> None:
    """Clip every quantized weight onto its grid in place, so the exported graph is Q/DQ on a constant (foldable)."""
    from craft_deploy.compress.qmodules import quantized_layers

    for mod in quantized_layers(model).values():
        wq = mod.parametrizations.weight[0]
        w = mod.parametrizations.weight.original
        w.copy_(wq.clamp(wq.rows(w)).reshape(w.shape) if wq.granularity == "group" else wq.clamp(w))
        wq.pre_clamped = True


def export_model(model: nn.Module, input_size: list[int], opset: int) -> onnx.ModelProto:
    """Trace a copy of `model` to ONNX with a dynamic batch axis (input "input", output "logits")."""
    model = copy.deepcopy(model).eval()
    pre_clamp_weights(model)
    dummy = torch.zeros(1, *input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it is the one that writes Q/DQ
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


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

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
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
        for c in consumers.get(node.output[0], []):
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
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return folded


def set_metadata(proto: onnx.ModelProto, manifest: dict[str, Any]) -> None:
    """Store what a consumer needs (input size, mean/std, classes, data) in the model's metadata_props."""
    keep = (
        "architecture",
        "num_classes",
        "input_size",
        "mean",
        "std",
        "class_names",
        "dataset",
        "data",
        "quantization",
        "sparsity",
    )
    meta = {k: manifest.get(k) for k in keep}
    stages = manifest.get("stages") or []
    meta["producer_git_sha"] = stages[-1].get("git_sha") if stages else None
    if meta.get("quantization"):
        meta["quantization"] = {k: v for k, v in meta["quantization"].items() if k != "layers"}
    if meta.get("sparsity"):
        meta["sparsity"] = {"pattern": meta["sparsity"]["pattern"], "layers": len(meta["sparsity"]["layers"])}
    helper.set_model_props(proto, {META_KEY: json.dumps(meta)})


def read_metadata(proto_or_path: onnx.ModelProto | str) -> dict[str, Any] | None:
    """The craft-deploy metadata of an ONNX model, or None if it has none."""
    proto = proto_or_path
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(proto_or_path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    return None
