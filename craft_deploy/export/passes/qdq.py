"""Q/DQ passes that fit a quantized graph to its runtime: scalar activation qparams, U8S8 activations, requantization
pairs ONNX Runtime's CPU integer kernels need, Relu/Clip dropped before post-ReLU quantizers, INT4 weights.

Our own: each rewrite is exact only because of what craft-deploy's quantizers guarantee (symmetric weight grids,
activation grids that start at 0 after ReLU, narrow grids stored in int8), which a generic optimizer cannot know;
each has an exactness test with ONNX's reference evaluator.

- `to_uint8_activations`: ONNX Runtime on x86 runs U8S8 (uint8 activations, int8 weights) far faster than S8S8. A
  symmetric int8 activation grid [-128, 127] with zero point 0 is the uint8 grid [0, 255] with zero point 128, so
  the rewrite moves every activation zero point by 128 and the computed values do not change.
- `to_int4_weights`: weights of at most 4 bits stored as opset-21 INT4 initializers (two per byte), per channel or
  blocked (`block_size`) for per-group quantization.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from craft_deploy.runtimes.onnx_graph import (
    consumers,
    drop_unused_initializers,
    initializers,
    producers,
    topological_sort,
)


def _is_weight_dq(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return node.op_type == "DequantizeLinear" and node.input[0] in inits


def scalar_activation_qparams(proto: onnx.ModelProto) -> int:
    """Make one-element scale / zero-point tensors of activation Q/DQ nodes 0-d scalars, in place; returns how many.

    The exporter writes per-tensor activation quantizers with shape-[1] parameters; ONNX Runtime's integer kernels
    (QLinearAdd, QLinearGlobalAveragePool) require scalars. Weight (per-channel) parameters are left alone.
    """
    graph = proto.graph
    inits = initializers(graph)
    names = {
        name
        for node in graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not _is_weight_dq(node, inits)
        for name in node.input[1:]
    }
    changed = 0
    for name in sorted(names):
        t = inits.get(name)
        if t is None or len(t.dims) == 0 or int(np.prod(t.dims)) != 1:
            continue
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(()), name))
        changed += 1
    return changed


def to_uint8_activations(proto: onnx.ModelProto) -> int:
    """Rewrite every activation Q/DQ pair from int8 to uint8 (zero point + 128) in place; returns how many tensors.

    Weights stay int8 (U8S8). A zero point is shared by the QuantizeLinear and its DequantizeLinear, so both move.
    """
    graph = proto.graph
    inits = initializers(graph)
    zero_points: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not _is_weight_dq(node, inits):
            if len(node.input) < 3 or node.input[2] not in inits:
                raise ValueError(f"{node.op_type} {node.name!r} has no constant zero point to move")
            zero_points.add(node.input[2])
    moved = 0
    for name in sorted(zero_points):
        t = inits[name]
        if t.data_type == TensorProto.UINT8:
            continue
        if t.data_type != TensorProto.INT8:
            raise ValueError(f"activation zero point {name!r} has type {TensorProto.DataType.Name(t.data_type)}")
        zp = numpy_helper.to_array(t).astype(np.int16) + 128
        t.CopyFrom(numpy_helper.from_array(zp.astype(np.uint8), name))
        moved += 1
    # a QuantizeLinear's output takes its zero point's type: shape information recorded before (upgrade_opset's
    # inference, for one) still says int8 and would contradict the uint8 zero point its DequantizeLinear now reads
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in zero_points}
    for info in graph.value_info:
        if info.name in quantized and info.type.tensor_type.elem_type == TensorProto.INT8:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    return moved


def _constant(name: str, inits: dict[str, onnx.TensorProto]) -> float | None:
    """The value of a one-element initializer, or None when `name` is not one."""
    return float(numpy_helper.to_array(inits[name])) if name in inits else None


def _clamp_bounds(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float | None, float | None]:
    """(lower, upper) bound of a Relu (0, inf) or Clip (an absent bound is -inf / inf, a non-constant one None)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    bound = [node.input[i] if len(node.input) > i else "" for i in (1, 2)]
    lo = _constant(bound[0], inits) if bound[0] else float("-inf")
    hi = _constant(bound[1], inits) if bound[1] else float("inf")
    return lo, hi


def _qdq_pair(tensor: str, scale_zp: list[str], out: str, label: str) -> list[onnx.NodeProto]:
    """QuantizeLinear(tensor) -> DequantizeLinear -> `out`, on the grid `scale_zp` (scale, zero point names)."""
    q = helper.make_node("QuantizeLinear", [tensor, *scale_zp], [tensor + "_requant_q"], name=label + "_q")
    return [q, helper.make_node("DequantizeLinear", [q.output[0], *scale_zp], [out], name=label + "_dq")]


def drop_clamps_before_quantize(proto: onnx.ModelProto) -> int:
    """Remove each Relu / Clip(0, hi) whose every reader is a QuantizeLinear with the grid's lowest zero point (a
    post-ReLU grid [0, top], top <= hi), in place; returns how many were removed.

    Such a QuantizeLinear already maps every negative value to 0 and clamps at top, so Q(Relu(y)) = Q(y) exactly.
    ONNX Runtime drops these itself, but after its pass that removes the DequantizeLinear -> QuantizeLinear pairs, so
    a requantized Add -> Relu -> Q would keep a useless DQ -> Q pair per residual block; removing them first avoids it.
    """
    graph = proto.graph
    inits = initializers(graph)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}

    def post_relu_grid_within(q: onnx.NodeProto, hi: float) -> bool:
        """q's grid starts at 0 (zero point = the type's minimum) and its top is at most `hi`."""
        zp = numpy_helper.to_array(inits[q.input[2]])
        scale = _constant(q.input[1], inits)
        info = np.iinfo(zp.dtype)
        return zp.size == 1 and scale is not None and int(zp) == info.min and (info.max - info.min) * scale <= hi

    dropped = []
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        quants = readers.get(node.output[0], [])
        if not quants or any(
            q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in inits for q in quants
        ):
            continue
        lo, hi = _clamp_bounds(node, inits)
        if lo != 0.0 or hi is None or not all(post_relu_grid_within(q, hi) for q in quants):
            continue
        for q in quants:
            q.input[0] = node.input[0]
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    drop_unused_initializers(graph)
    return len(dropped)


PASS_THROUGH_OPS = ("Relu", "Clip", "MaxPool", "Flatten", "Reshape")


def _integer_source(node: onnx.NodeProto, writers: dict[str, onnx.NodeProto], inits: dict) -> bool:
    """Whether ONNX Runtime can run `node` as an integer kernel: a Conv/Gemm/MatMul with a DequantizeLinear weight,
    or an Add / average pool whose every input comes from a DequantizeLinear."""
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        weight = writers.get(node.input[1]) if len(node.input) > 1 else None
        return weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in inits
    if node.op_type in ("Add", "GlobalAveragePool", "AveragePool"):
        return all(n in writers and writers[n].op_type == "DequantizeLinear" for n in node.input)
    return False


def _commutes_with_rounding(node: onnx.NodeProto, inits: dict) -> bool:
    """Relu, Clip(0, hi), MaxPool, Flatten and Reshape give the same result before or after rounding onto a grid
    that contains 0 (they are monotone or move values); a Clip with another lower bound is not known to."""
    if node.op_type == "Clip":
        return _clamp_bounds(node, inits)[0] == 0.0
    return node.op_type in PASS_THROUGH_OPS


def requantize_layer_outputs(proto: onnx.ModelProto) -> int:
    """Give each op ONNX Runtime can run in integers (quantized Conv/Gemm/MatMul, Add or average pool of dequantized
    inputs) whose output reaches the next QuantizeLinear only through Relu, Clip(0, hi), MaxPool, Flatten or Reshape a
    Q/DQ pair of its own, with that QuantizeLinear's scale and zero point; returns how many were added.

    ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into one integer kernel (QLinearConv, QLinearAdd,
    ...) only when the op's output goes straight into a QuantizeLinear; TensorRT wants Q/DQ on inputs only and fuses
    the rest itself. The ops passed through commute with rounding onto a grid containing 0, so Q(f(DQ(Q(y)))) =
    Q(f(y)): the added pair changes no value (the export's verification checks it).
    """
    graph = proto.graph
    inits = initializers(graph)
    writers = producers(graph)
    readers = consumers(graph)
    added = 0
    for node in list(graph.node):
        if not _integer_source(node, writers, inits):
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or not _commutes_with_rounding(after[0], inits):
            continue
        first = tail = after[0]
        while True:  # follow the chain of single-reader pass-through ops
            nxt = readers.get(tail.output[0], [])
            if len(nxt) != 1 or not _commutes_with_rounding(nxt[0], inits):
                break
            tail = nxt[0]
        quants = readers.get(tail.output[0], [])
        if not quants or any(q.op_type != "QuantizeLinear" for q in quants):
            continue
        params = {tuple(q.input[1:]) for q in quants}
        if len(params) != 1:
            continue
        name = node.output[0]
        first.input[0] = name + "_requant"
        graph.node.extend(_qdq_pair(name, list(quants[0].input[1:]), name + "_requant", node.name + "_requant"))
        added += 1
    if added:
        topological_sort(graph)
    return added


GRID_PRESERVING_OPS = ("Pad", "MaxPool", "Flatten", "Reshape")


def _keeps_grid(node: onnx.NodeProto, inits: dict) -> bool:
    """Whether `node` maps values on a quantization grid that contains 0 to values on it: data movement, max pooling,
    and zero padding (constant mode, pad value 0 or none)."""
    if node.op_type == "Pad":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = node.input[2] if len(node.input) > 2 else ""
        return mode == b"constant" and (not value or (value in inits and not numpy_helper.to_array(inits[value]).any()))
    return node.op_type in GRID_PRESERVING_OPS


def requantize_grid_ops(proto: onnx.ModelProto) -> int:
    """Give each Pad / MaxPool / Flatten / Reshape that reads a DequantizeLinear output and feeds no QuantizeLinear a
    Q/DQ pair after it with that DequantizeLinear's scale and zero point; returns how many were added.

    Its output values already lie on that grid, so the pair changes nothing; ONNX Runtime then runs the op on uint8
    and the Conv after it (e.g. TensorFlow 'SAME' padding before a strided conv) as QLinearConv instead of in float.
    """
    graph = proto.graph
    inits = initializers(graph)
    writers = producers(graph)
    readers = consumers(graph)
    added = 0
    for node in list(graph.node):
        dq = writers.get(node.input[0]) if node.input else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits or not _keeps_grid(node, inits):
            continue
        after = readers.get(node.output[0], [])
        if not after or any(r.op_type == "QuantizeLinear" for r in after):
            continue
        name = node.output[0]
        node.output[0] = name + "_pre_requant"
        graph.node.extend(_qdq_pair(node.output[0], list(dq.input[1:]), name, (node.name or name) + "_requant"))
        added += 1
    if added:
        topological_sort(graph)
    return added


def to_int4_weights(proto: onnx.ModelProto, max_abs: int = 7) -> int:
    """Store int8 weight initializers whose values fit INT4 as INT4, in place; returns how many were converted.

    Per-channel DQ keeps its axis. A per-group weight is exported as rows of `group` values with one scale per row
    (DQ axis 0) and a Reshape after it; it becomes an [out, in] INT4 matrix with an [out, in / group] scale and DQ
    `block_size=group` along axis 1, which the Reshape still turns into the layer's weight. The model must already
    declare opset >= 21 (see `upgrade_opset`).
    """
    graph = proto.graph
    inits = initializers(graph)
    readers = consumers(graph)
    converted = 0
    for node in graph.node:
        if not _is_weight_dq(node, inits):
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype != np.int8 or np.abs(w.astype(np.int16)).max() > max_abs:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        users = readers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Reshape" and w.ndim == 2 and scale.size > 1:
            # per-group rows [out * groups, group] -> blocked [out, in] with scale [out, groups]
            shape_name = users[0].input[1]
            if shape_name not in inits:
                continue
            out_ch, group = int(numpy_helper.to_array(inits[shape_name])[0]), w.shape[1]
            w, scale = w.reshape(out_ch, -1), scale.reshape(out_ch, -1)
            for a in [a for a in node.attribute if a.name in ("axis", "block_size")]:
                node.attribute.remove(a)
            node.attribute.extend([helper.make_attribute("axis", 1), helper.make_attribute("block_size", group)])
            graph.initializer.append(numpy_helper.from_array(scale, node.input[1] + "_blocked"))
            node.input[1] += "_blocked"
            for stale in [v for v in graph.value_info if v.name == node.output[0]]:  # its shape is now [out, in]
                graph.value_info.remove(stale)
        int4 = helper.make_tensor(node.input[0] + "_int4", TensorProto.INT4, w.shape, w.flatten().tolist())
        zero = helper.make_tensor(node.input[1] + "_zp_int4", TensorProto.INT4, scale.shape, [0] * scale.size)
        graph.initializer.extend([int4, zero])
        node.input[0] = int4.name
        del node.input[2:]
        node.input.append(zero.name)
        converted += 1
    drop_unused_initializers(graph)
    return converted


def layer_name(node: onnx.NodeProto) -> str:
    """The PyTorch module a traced node came from ('/blocks/blocks.0/blocks.0.0/conv_pw/Conv' -> 'blocks.0.0.conv_pw'),
    or the node's own name when it carries no module scope."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) < 2:
        return node.name or node.output[0]
    scope = parts[:-1]
    parent = scope[-2] if len(scope) > 1 else ""
    return f"{parent}.{scope[-1]}" if parent and not scope[-1].startswith(parent + ".") else scope[-1]


def check_bias_range(proto: onnx.ModelProto, bound: float) -> int:
    """Refuse a Q/DQ Conv/Gemm whose float bias, in units of (input scale x weight scale), exceeds `bound`: a runtime
    that adds it to an int32 accumulator (ONNX Runtime fuses every such Conv so) would saturate it. Returns how many
    layers were checked; raises CraftError naming the first layer out of range."""
    from craft_deploy import CraftError

    graph = proto.graph
    inits = initializers(graph)
    writers = producers(graph)

    def dq_scale(name: str) -> np.ndarray | None:
        """The scale of the DequantizeLinear that `name` comes from, through ops that keep values (Pad, Flatten...),
        which the runtimes move the DequantizeLinear past."""
        dq = writers.get(name)
        while dq is not None and dq.op_type in ("Pad", *PASS_THROUGH_OPS):
            dq = writers.get(dq.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)

    checked = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        s_in, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
        if s_in is None or s_w is None or s_in.size != 1:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            units = np.abs(bias) / (s_in[0] * np.broadcast_to(s_w, bias.shape))
        units = np.where(bias == 0, 0.0, units)
        checked += 1
        worst = int(np.argmax(units))
        if not units[worst] <= bound:
            raise CraftError(
                f"layer {layer_name(node)}: output channel {worst}'s bias {bias[worst]:.4g} is "
                f"{units[worst]:.3g} x (input scale {s_in[0]:.3g} x weight scale "
                f"{float(np.broadcast_to(s_w, bias.shape)[worst]):.3g}), beyond the int32 accumulators' bound "
                f"{bound:.3g}; re-quantize the bundle with this craft-deploy (calibration keeps scales within it)"
            )
    return checked
