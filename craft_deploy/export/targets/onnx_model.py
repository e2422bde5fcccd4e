"""The ONNX target: trace, apply the plan's passes, check with onnx.checker, and verify in ONNX Runtime against PyTorch
(basic optimisations, and this host's fused integer kernels for Q/DQ models). The TensorRT and edge targets start
from the verified file this target writes (`verified_onnx`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes
from craft_deploy.export.diagnose import diagnose
from craft_deploy.export.passes import apply_passes
from craft_deploy.export.plan import ExportPlan
from craft_deploy.export.prepare import export_model
from craft_deploy.export.targets.base import ExportJob, record, register_target
from craft_deploy.export.verify import pruned_zeros, weight_zero_count
from craft_deploy.runtimes.metadata import export_metadata, set_metadata
from craft_deploy.runtimes.onnx_session import onnx_logits
from craft_deploy.runtimes.tolerance import SATURATION_HINT, compare_outputs, judge_export
from craft_deploy.toolkit.registry import method_state


def build_onnx(bundle, plan: ExportPlan) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Trace the bundle and apply the plan's rewrites; returns the model and how many of each rewrite applied."""
    # traced at opset 17 and upgraded after the passes; E4M3 Q/DQ exists from opset 19 only, so FP8 traces there
    trace_opset = plan.opset if plan.precision == "fp8" else min(plan.opset, 17)
    proto = export_model(bundle.model, bundle.manifest["input_size"], trace_opset)
    proto, counts = apply_passes(proto, plan)
    set_metadata(proto, export_metadata(bundle.manifest))
    return proto, counts


@dataclass
class VerifiedOnnx:
    """model.onnx in the staging directory, checked; what its record says about it."""

    path: Path
    fields: dict[str, Any]
    verification: dict[str, Any]
    extra: dict[str, Any]
    timings: dict[str, float]


def verified_onnx(job: ExportJob) -> VerifiedOnnx:
    """Trace, rewrite, write and check model.onnx; run it in ONNX Runtime against PyTorch (and in this host's fused
    integer kernels for a Q/DQ model, recorded, not gated)."""
    cfg, bundle, stage, plan, images, ref, t0 = job.cfg, job.bundle, job.stage, job.plan, job.images, job.ref, job.t0
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
    quant = method_state(manifest, "quantize") or {}
    fields = {
        "quantization": quant.get("config"),
        "weights": plan.weights,
        "activations": plan.activations,
        "opset": plan.opset,
        "onnx_size_bytes": path.stat().st_size,
        "rewrites": counts,
        "ops": ops,
    }
    return VerifiedOnnx(path, fields, verification, extra, {"export_seconds": export_seconds})


def onnx_record(job: ExportJob, onnx_file: VerifiedOnnx, artifact: Path) -> dict[str, Any]:
    """export.json of a target built on the verified ONNX (`artifact`: the file it leaves in --out)."""
    return record(
        job,
        artifact,
        **onnx_file.fields,
        verification=onnx_file.verification,
        **onnx_file.extra,
        timings={**onnx_file.timings, "total_seconds": time.perf_counter() - job.t0},
    )


@register_target(
    "onnx",
    artifact="model.onnx",
    feeds="onnx",
    flavours=None,  # ONNX Runtime runs every standard Q/DQ graph (S8S8 slowly on x86: docs/cpu-speed.md)
    help="onnx (FP32/FP16, Q/DQ INT8/FP8, INT4 weights; verified in ONNX Runtime)",
)
def export(job: ExportJob) -> dict[str, Any]:
    """model.onnx, verified, and its record."""
    onnx_file = verified_onnx(job)
    return onnx_record(job, onnx_file, onnx_file.path)
