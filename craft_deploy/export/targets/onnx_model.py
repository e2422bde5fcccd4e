"""The ONNX target: trace, apply the plan's passes, check with onnx.checker, and verify in ONNX Runtime against PyTorch
(basic optimisations, and this host's fused integer kernels for Q/DQ models); `--format tensorrt` then builds an engine
from the verified file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes
from craft_deploy.export.diagnose import diagnose
from craft_deploy.export.metadata import export_metadata, set_metadata
from craft_deploy.export.passes import apply_passes
from craft_deploy.export.plan import ExportPlan
from craft_deploy.export.prepare import export_model
from craft_deploy.export.targets import record, tensorrt_engine
from craft_deploy.export.verify import (
    SATURATION_HINT,
    compare_outputs,
    judge_export,
    onnx_logits,
    pruned_zeros,
    weight_zero_count,
)
from craft_deploy.toolkit.registry import method_state


def build_onnx(bundle, plan: ExportPlan) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Trace the bundle and apply the plan's rewrites; returns the model and how many of each rewrite applied."""
    # traced at opset 17 and upgraded after the passes; E4M3 Q/DQ exists from opset 19 only, so FP8 traces there
    trace_opset = plan.opset if plan.precision == "fp8" else min(plan.opset, 17)
    proto = export_model(bundle.model, bundle.manifest["input_size"], trace_opset)
    proto, counts = apply_passes(proto, plan)
    set_metadata(proto, export_metadata(bundle.manifest))
    return proto, counts


def export(cfg, bundle, bundle_path, stage: Path, plan: ExportPlan, images, ref, t0: float) -> dict[str, Any]:
    manifest = bundle.manifest
    proto, counts = build_onnx(bundle, plan)
    path = stage / "model.onnx"
    atomic_write_bytes(path, proto.SerializeToString())
    export_seconds = time.perf_counter() - t0
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise CraftError(f"the exported ONNX model fails onnx.checker: {str(e)[:400]}") from e
    got = onnx_logits(path, images)
    check = compare_outputs(ref, got)
    # zeros of the pruned layers in the bundle: each must still be an exact zero in the ONNX weights
    pruned = method_state(manifest, "prune")
    check["weight_zeros_bundle"] = pruned_zeros(bundle, pruned) if pruned else None
    check["weight_zeros_onnx"] = weight_zero_count(proto)
    check["passed"] = judge_export(check, plan.precision, cfg.atol, bundle.model, images, ref, got)
    if pruned and check["weight_zeros_onnx"] < check["weight_zeros_bundle"]:
        check["passed"] = False
        check["error"] = "pruned weights are not exactly zero in the exported initializers"
    elif not check["passed"]:  # the file, or this runtime? and where do they part?
        check["diagnosis"] = diagnose(path, bundle.model, images)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    verification = {"onnxruntime": check}
    extra: dict[str, Any] = {}
    if plan.precision == "int8" and plan.activations != "fp32":
        got_fused = onnx_logits(path, images, fused=True)
        fused = compare_outputs(ref, got_fused)
        # recorded, not gated: this host's kernels only
        fused["within_tolerance"] = judge_export(fused, plan.precision, cfg.atol, bundle.model, images, ref, got_fused)
        if not fused["within_tolerance"]:
            fused["diagnosis"] = diagnose(path, bundle.model, images, fused=True)
            extra["warning"] = SATURATION_HINT.format(agree=fused["top1_agreement"])
            if "summary" in fused["diagnosis"]:
                extra["warning"] += f" Measured: {fused['diagnosis']['summary']}."
        verification["onnxruntime_fused_kernels"] = fused
    timings = {"export_seconds": export_seconds}
    if cfg.format == "tensorrt":
        engine, verification["tensorrt"], timings["engine_build_seconds"] = tensorrt_engine.build_and_verify(
            cfg, bundle, stage, plan, images, ref
        )
        extra.update(engine)
    quant = method_state(manifest, "quantize") or {}
    artifact = stage / ("model.engine" if cfg.format == "tensorrt" else "model.onnx")
    return record(
        stage,
        cfg,
        bundle_path,
        plan,
        artifact,
        quantization=quant.get("config"),
        weights=plan.weights,
        activations=plan.activations,
        opset=plan.opset,
        onnx_size_bytes=path.stat().st_size,
        rewrites=counts,
        ops=ops,
        verification=verification,
        **extra,
        timings={**timings, "total_seconds": time.perf_counter() - t0},
    )
