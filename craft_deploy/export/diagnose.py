"""What is wrong when an exported file and PyTorch disagree: the file, or the runtime's kernels on this CPU, and the
first node where the computation parts.

ONNX's reference evaluator (numpy, op by op, as the standard defines them) runs the file on a few images. If it agrees
with PyTorch, the file is right and the runtime differs: the node outputs of the runtime and the reference evaluator
are compared, first to last. If it does not, the file is wrong: for a Q/DQ file the integers each activation
quantizer writes are compared with PyTorch's own, quantizer by quantizer in execution order, and the first one that
parts by more than one quantization step is named together with the weighted layer that feeds it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from craft_deploy.runtimes.onnx_graph import initializers, producers

IMAGES = 4  # the reference evaluator runs convolutions in numpy: a few images say enough
REFERENCE_OPSET = 19  # the reference evaluator implements Q/DQ from opset 19 on
WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def diagnose(path: Path, model: torch.nn.Module, images: torch.Tensor, fused: bool = False) -> dict[str, Any]:
    """Say whether the file at `path` or the runtime is what differs from `model`, and where; never raises."""
    try:
        return _diagnose(path, model, images[:IMAGES], fused)
    except Exception as e:  # a diagnosis must never hide the verification failure it explains
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _diagnose(path: Path, model: torch.nn.Module, images: torch.Tensor, fused: bool) -> dict[str, Any]:
    from craft_deploy.runtimes.tolerance import compare_outputs, judge_export

    proto = onnx.load(str(path))
    precision = "int8" if any(n.op_type == "QuantizeLinear" for n in proto.graph.node) else "fp32"
    reference = _reference_values(proto, images.numpy())
    with torch.no_grad():
        ref = model.eval()(images).numpy()
    got = reference[proto.graph.output[0].name]
    check = compare_outputs(ref, got)
    file_ok = judge_export(check, precision, None, model, images, ref, got)
    out: dict[str, Any] = {
        "images": len(images),
        "reference_evaluator_vs_pytorch": {k: check[k] for k in ("max_abs_diff", "top1_agreement")},
        "wrong": "runtime" if file_ok else "file",
    }
    if file_ok:
        runtime = _runtime_values(proto, images.numpy(), fused, only_quantizers=precision == "int8")
        out["first_divergence"] = _first_divergence(proto, reference, runtime)
        out["summary"] = (
            "the file computes what PyTorch computes (ONNX's reference evaluator agrees); ONNX Runtime's kernels on "
            "this CPU differ" + _where(out["first_divergence"])
        )
    else:
        out["first_divergence"] = (
            _first_quantizer_divergence(proto, model, images, reference) if precision == "int8" else None
        )
        out["summary"] = "the file itself differs from PyTorch (ONNX's reference evaluator agrees with the runtime)" + (
            _where(out["first_divergence"]) if out["first_divergence"] else ": a float file, not localised further"
        )
    return out


def _where(div: dict[str, Any] | None) -> str:
    if not div:
        return ", though no node output parts beyond its tolerance"
    fed = f", fed by {div['fed_by']['op_type']} {div['fed_by']['node']}" if div.get("fed_by") else ""
    return (
        f"; first divergence at {div['op_type']} {div['node']} (max |diff| {div['max_abs_diff']:.3g}"
        f"{', ' + str(div['max_steps']) + ' quantization steps' if 'max_steps' in div else ''}){fed}"
    )


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `proto` that also outputs the tensors `names` (types left to inference)."""
    m = copy.deepcopy(proto)
    have = {o.name for o in m.graph.output}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for name in names:
        if name not in have and name in types:
            m.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    return m


def _node_outputs(proto: onnx.ModelProto, only_quantizers: bool) -> list[str]:
    ops = ("QuantizeLinear",) if only_quantizers else None
    return [n.output[0] for n in proto.graph.node if ops is None or n.op_type in ops]


def _reference_values(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every node output of the file, computed by ONNX's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    from craft_deploy.export.passes.precision import upgrade_opset

    m = upgrade_opset(copy.deepcopy(proto), REFERENCE_OPSET)
    names = [o.name for o in m.graph.output] + _node_outputs(m, only_quantizers=False)
    names = list(dict.fromkeys(names))
    values = ReferenceEvaluator(m).run(names, {m.graph.input[0].name: x})
    return dict(zip(names, values))


def _runtime_values(proto: onnx.ModelProto, x: np.ndarray, fused: bool, only_quantizers: bool) -> dict[str, Any]:
    """Node outputs in ONNX Runtime at the verification's optimisation level. For a Q/DQ file only what the
    QuantizeLinear nodes write is exposed: exposing a Conv's float output would keep ONNX Runtime from fusing it."""
    import onnxruntime as ort

    names = _node_outputs(proto, only_quantizers)
    m = _with_outputs(proto, names)
    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if fused else level.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    return dict(zip(outs, sess.run(outs, {m.graph.input[0].name: x})))


def _qparams(proto: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, float] | None:
    inits = initializers(proto.graph)
    if node.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)
    return (float(scale[0]), 0.0) if scale.size == 1 else None


def _first_divergence(proto: onnx.ModelProto, reference: dict, runtime: dict) -> dict[str, Any] | None:
    """The first node (in graph order) whose runtime output parts from the reference evaluator's: a QuantizeLinear by
    more than one step, a float output by more than 1e-3 of its magnitude."""
    for node in proto.graph.node:
        name = node.output[0]
        if name not in runtime or name not in reference:
            continue
        a, b = np.asarray(reference[name]), np.asarray(runtime[name])
        if a.shape != b.shape:
            continue
        if node.op_type == "QuantizeLinear":
            steps = np.abs(a.astype(np.int64) - b.astype(np.int64))
            if steps.max() > 1:
                return _divergence(proto, node, steps.max(), int(steps.max()))
        else:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if diff.max() > 1e-3 * max(1.0, float(np.abs(a).max())):
                return _divergence(proto, node, float(diff.max()))
    return None


def _first_quantizer_divergence(
    proto: onnx.ModelProto, model: torch.nn.Module, images: torch.Tensor, reference: dict
) -> dict[str, Any] | None:
    """The first activation quantizer whose integers in the file part from PyTorch's by more than one step, matched in
    execution order (PyTorch's quantizer modules, the file's QuantizeLinear nodes other than the requantization pairs
    export adds), with the weighted node feeding it."""
    from craft_deploy.toolkit.qmodules import ActQuantizer

    seen: list[tuple[str, np.ndarray]] = []  # (quantizer, its output in steps from its zero point)

    def hook(module, args, out, name):
        seen.append((name, (out.detach().double() / module.scale.detach().double()).round().numpy()))

    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
        for n, m in model.named_modules()
        if isinstance(m, ActQuantizer) and m.number_format == "int"
    ]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    quants = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and not n.name.endswith("_requant_q")]
    if len(quants) != len(seen):
        return {
            "error": f"{len(seen)} activation quantizers in PyTorch, {len(quants)} QuantizeLinear nodes in the file"
        }
    for (module, ints), node in zip(seen, quants):
        got = np.asarray(reference[node.output[0]]).astype(np.int64)
        zero = _zero_point(proto, node)
        steps = np.abs((got - zero) - ints.astype(np.int64))
        if steps.max() > 1:
            div = _divergence(proto, node, float(steps.max()), int(steps.max()))
            div["pytorch_quantizer"] = module
            return div
    return None


def _zero_point(proto: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = initializers(proto.graph)
    if len(node.input) < 3 or node.input[2] not in inits:
        return 0
    return int(numpy_helper.to_array(inits[node.input[2]]).reshape(-1)[0])


def _divergence(proto: onnx.ModelProto, node: onnx.NodeProto, diff: float, steps: int | None = None) -> dict[str, Any]:
    """A divergence record for `node`, with the nearest weighted node upstream of it (what usually carries the
    fault: its weights, scales or bias)."""
    rec: dict[str, Any] = {"node": node.name or node.output[0], "op_type": node.op_type, "max_abs_diff": diff}
    if steps is not None:
        rec["max_steps"] = steps
    writers = producers(proto.graph)
    queue, seen = list(node.input[:1]), set()
    while queue:
        name = queue.pop(0)
        if name in seen or name not in writers:
            continue
        seen.add(name)
        up = writers[name]
        if up.op_type in WEIGHTED:
            rec["fed_by"] = {"node": up.name or up.output[0], "op_type": up.op_type}
            break
        queue.extend(i for i in up.input if i)
    return rec
