"""Graph passes on the traced ONNX model, in the order the export plan applies them; each pass is one function that
edits the model in place (or returns a new one) and reports how many places it changed, and each has an exactness
test."""

from __future__ import annotations

import onnx

from craft_deploy.export.passes.folding import (
    bypass_constant_identities,
    fold_batchnorm,
    fold_shape_constants,
    fold_weight_quantizers,
)
from craft_deploy.export.passes.precision import to_fp16, upgrade_opset
from craft_deploy.export.passes.qdq import (
    check_bias_range,
    drop_clamps_before_quantize,
    requantize_grid_ops,
    requantize_layer_outputs,
    scalar_activation_qparams,
    to_int4_weights,
    to_uint8_activations,
)
from craft_deploy.export.plan import ExportPlan
from craft_deploy.toolkit.qparams import BIAS_INT32_BOUND

__all__ = ["apply_passes"]


def apply_passes(proto: onnx.ModelProto, plan: ExportPlan) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Run the passes `plan` calls for; returns the model and how many places each pass changed."""
    counts: dict[str, int] = {}
    counts["shape_nodes_folded"] = fold_shape_constants(proto)
    if plan.precision == "int8":
        counts["weights_folded"] = fold_weight_quantizers(proto)
        counts["identities_bypassed"] = bypass_constant_identities(proto)
        counts["scalar_qparams"] = scalar_activation_qparams(proto)
    counts["batchnorm_folded"] = fold_batchnorm(proto)
    if plan.precision == "int8" and plan.activations != "fp32":
        counts["bias_range_checked"] = check_bias_range(proto, BIAS_INT32_BOUND)
    proto = upgrade_opset(proto, plan.opset)
    if plan.int4_weights:
        counts["int4_weights"] = to_int4_weights(proto)
    if plan.uint8_activations:
        counts["clamps_dropped"] = drop_clamps_before_quantize(proto)
        counts["requantized_outputs"] = requantize_layer_outputs(proto)
        counts["requantized_grid_ops"] = requantize_grid_ops(proto)
        counts["uint8_activations"] = to_uint8_activations(proto)
    if plan.precision == "fp16":
        proto = to_fp16(proto)
    return proto, counts
