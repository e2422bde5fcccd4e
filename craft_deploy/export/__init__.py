"""Export stage: bundle -> ONNX, TensorRT engine or torch-tensorrt program, each verified against PyTorch on real
images, and export.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx as onnx_lib  # aliased: the submodule craft_deploy.export.onnx rebinds `onnx` here
import torch
from torch.utils.data import DataLoader

from craft_deploy import CraftError, VerificationError
from craft_deploy.artifacts import atomic_write_bytes, atomic_write_json, check_out_dir, staged_dir
from craft_deploy.compress.quant import quant_specs
from craft_deploy.compress.registry import method_state
from craft_deploy.compress.spec import FLOAT_BITS
from craft_deploy.config import ExportConfig
from craft_deploy.data import splits_for_manifest
from craft_deploy.export.graph import initializers, producers
from craft_deploy.export.onnx import (
    bypass_constant_identities,
    export_metadata,
    export_model,
    fold_batchnorm,
    fold_shape_constants,
    fold_weight_quantizers,
    set_metadata,
)
from craft_deploy.export.precision import (
    drop_clamps_before_quantize,
    requantize_grid_ops,
    requantize_layer_outputs,
    scalar_activation_qparams,
    to_fp16,
    to_int4_weights,
    to_uint8_activations,
    upgrade_opset,
)
from craft_deploy.models import load_bundle
from craft_deploy.records import write_record

__all__ = ["compare_outputs", "plan_export", "run", "verify_onnx"]

# Tolerances against PyTorch on the same images, relative to the largest |logit|. Float graphs differ by accumulation
# order; FP16 by its 11-bit mantissa; Q/DQ graphs by values landing on the other side of a rounding boundary (one
# quantization step), so those are held to top-1 agreement.
FLOAT_ATOL = 1e-3
FP16_ATOL = 2e-2
MIN_TOP1_AGREEMENT = {"fp16": 0.98, "int8": 0.95}
QDQ_NEAR_TIE_ATOL = 0.1
INT4_OPSET = 21


@dataclass(frozen=True)
class ExportPlan:
    """What a bundle exports as, settled before anything is written."""

    precision: str  # fp32 | fp16 | int8 (the bundle's Q/DQ graph, whatever its bit widths)
    opset: int
    weights: str  # fp32 | fp16 | int8 | int4 (storage; INT6/INT5 values sit in int8)
    activations: str  # fp32 | fp16 | int8 | uint8

    @property
    def int4_weights(self) -> bool:
        return self.weights == "int4"

    @property
    def uint8_activations(self) -> bool:
        return self.activations == "uint8"


def plan_export(cfg: ExportConfig, manifest: dict[str, Any], bundle_path: str | Path) -> ExportPlan:
    """Resolve --precision auto and the opset, and refuse combinations that cannot be exported, naming what can."""
    quant = method_state(manifest, "quantize") or {}
    name = quant.get("config", "")
    precision = cfg.precision if cfg.precision != "auto" else ("int8" if quant else "fp32")
    if precision == "int8" and not quant:
        raise CraftError(
            f"--precision int8 needs a quantized bundle and {bundle_path} is float; quantize it first: "
            f"craft-deploy compress {bundle_path} --quant w8a8 --calib-samples 512 --out DIR"
        )
    if precision in ("fp32", "fp16") and quant:
        raise CraftError(
            f"{bundle_path} is quantized ({name}) and exports as Q/DQ: use --precision int8 (or auto), or export the "
            f"float bundle it came from with --precision {precision}"
        )
    if cfg.format == "torch-tensorrt" and quant:
        raise CraftError(
            f"--format torch-tensorrt compiles float models; {bundle_path} is quantized ({name}): use --format "
            "tensorrt, which builds INT8 kernels from the Q/DQ ONNX"
        )
    layers, matmuls, tensors = quant_specs(quant)
    twin = any(s.a_twin for s in layers.values()) or any(s.probs_twin for s in matmuls.values())
    if twin:
        raise CraftError(
            "this bundle uses PTQ4ViT's twin-uniform quantizers (two scales per tensor), which ONNX Q/DQ cannot "
            "express; quantize with --calib-method mse, percentile or entropy to export"
        )
    int4 = any(s.w_bits <= 4 for s in layers.values())
    if int4 and cfg.target == "tensorrt":
        raise CraftError(
            f"{bundle_path} has INT4 weights ({name}); TensorRT runs INT4 only as weight-only block quantization of "
            "MatMul/Gemm, not on convolutions, and craft-deploy does not target it: export with --target ort-cpu "
            "(INT4 DequantizeLinear, opset 21), or quantize with --quant w8a16 for TensorRT"
        )
    if int4 and cfg.opset is not None and cfg.opset < INT4_OPSET:
        raise CraftError(
            f"INT4 weights need opset >= {INT4_OPSET} (INT4 DequantizeLinear); got --opset {cfg.opset}: drop --opset "
            f"or pass --opset {INT4_OPSET}"
        )
    asymmetric = any(
        spec.a_bits < FLOAT_BITS and not spec.a_symmetric
        for group in (layers, matmuls, tensors)
        for spec in group.values()
    )
    if asymmetric and cfg.target == "tensorrt":
        raise CraftError(
            f"{bundle_path} has asymmetric activation ranges (--placement {quant.get('placement', 'tensorrt')}"
            f"{', --act-asymmetric' if quant.get('placement') != 'ort-cpu' else ''}); TensorRT's INT8 is symmetric "
            "(zero point 0): export it with --target ort-cpu, or quantize again with the default --placement tensorrt "
            "and without --act-asymmetric for TensorRT"
        )
    if cfg.format != "onnx" and cfg.target != "tensorrt":
        raise CraftError(f"--format {cfg.format} runs on TensorRT: use --target tensorrt (got --target {cfg.target})")
    opset = cfg.opset or (INT4_OPSET if int4 else 17)
    if not quant:
        return ExportPlan(precision, opset, precision, precision)
    has_acts = any(s.quantizes_input for s in layers.values())
    activations = ("uint8" if cfg.target == "ort-cpu" else "int8") if has_acts else "fp32"
    return ExportPlan(precision, opset, "int4" if int4 else "int8", activations)


def weight_zero_count(proto: onnx_lib.ModelProto) -> int:
    """Exact zeros in the weights of Conv/Gemm/MatMul nodes, read through DequantizeLinear, Reshape, Cast, Transpose."""
    inits = initializers(proto.graph)
    writers = producers(proto.graph)
    zeros = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        while name in writers and writers[name].op_type in ("DequantizeLinear", "Reshape", "Cast", "Transpose"):
            name = writers[name].input[0]
        if name in inits:
            zeros += int((onnx_lib.numpy_helper.to_array(inits[name]) == 0).sum())
    return zeros


def compare_outputs(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Max/mean abs difference and top-1 agreement of two logit arrays."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {
        "samples": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "reference_logit_absmax": float(np.abs(ref).max()),
    }


def verify_onnx(path: Path, images: torch.Tensor, ref: np.ndarray, fused: bool = False) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) on `images` and compare its logits with PyTorch's, `ref`.

    By default ONNX Runtime applies only its basic graph optimisations, so the check is of what the file computes.
    With `fused`, every optimisation runs: Q/DQ pairs become this CPU's integer kernels (QLinearConv, ...).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if fused else level.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"input": chunk.numpy()})[0] for chunk in images.split(32)])
    return compare_outputs(ref, got)


SATURATION_HINT = (
    "ONNX Runtime's fused integer kernels on this CPU disagree with the model (top-1 agreement {agree:.0%}) while the "
    "graph itself checks out. The usual cause: x86 CPUs without VNNI (AVX2 only) add uint8 x int8 products in pairs "
    "with 16-bit saturation, which full-range 8-bit weights overflow. For exact results on such CPUs quantize weights "
    "to 7 bits "
    "(craft-deploy compress --quant w7a8); CPUs with AVX-512 VNNI, AVX-VNNI or AMX, and TensorRT, are exact."
)


def _judge(check: dict[str, Any], precision: str, atol: float | None) -> bool:
    """Apply the tolerance of `precision` to a comparison, recording it; True when it passes."""
    scale = max(1.0, check["reference_logit_absmax"])
    if precision == "int8" and atol is None:
        # at least 95% top-1 agreement, or every logit within 10% of the logit scale: a class can then only flip
        # where PyTorch's own margin is under 20% of the scale (weak models' near-tied logits)
        check["tolerance"] = {
            "min_top1_agreement": MIN_TOP1_AGREEMENT["int8"],
            "or_max_abs_diff": QDQ_NEAR_TIE_ATOL * scale,
        }
        close = check["max_abs_diff"] <= QDQ_NEAR_TIE_ATOL * scale
        return check["top1_agreement"] >= MIN_TOP1_AGREEMENT["int8"] or close
    if precision == "int8":  # an explicit --atol replaces top-1 agreement (near-tied logits of untrained models)
        check["tolerance"] = {"max_abs_diff": atol}
        return check["max_abs_diff"] <= atol
    limit = atol if atol is not None else (FP16_ATOL if precision == "fp16" else FLOAT_ATOL) * scale
    check["tolerance"] = {"max_abs_diff": limit}
    ok = check["max_abs_diff"] <= limit
    if precision == "fp16":
        check["tolerance"]["min_top1_agreement"] = MIN_TOP1_AGREEMENT["fp16"]
        ok = ok and check["top1_agreement"] >= MIN_TOP1_AGREEMENT["fp16"]
    return ok


def build_onnx(bundle, plan: ExportPlan) -> tuple[onnx_lib.ModelProto, dict[str, int]]:
    """Trace the bundle and apply the plan's rewrites; returns the model and how many of each rewrite applied."""
    counts: dict[str, int] = {}
    proto = export_model(bundle.model, bundle.manifest["input_size"], min(plan.opset, 17))
    counts["shape_nodes_folded"] = fold_shape_constants(proto)
    if plan.precision == "int8":
        counts["weights_folded"] = fold_weight_quantizers(proto)
        counts["identities_bypassed"] = bypass_constant_identities(proto)
        counts["scalar_qparams"] = scalar_activation_qparams(proto)
    counts["batchnorm_folded"] = fold_batchnorm(proto)
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
    set_metadata(proto, export_metadata(bundle.manifest))
    return proto, counts


def run(cfg: ExportConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export the bundle at `bundle_path` into `out` (model.onnx, model.engine or model.ep), verify, export.json."""
    check_out_dir(out, overwrite)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    plan = plan_export(cfg, manifest, bundle_path)
    if cfg.format == "tensorrt":
        from craft_deploy.export.tensorrt import import_tensorrt

        import_tensorrt()  # the install hint before any file is written
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        splits = splits_for_manifest(manifest, cfg.data_root, eval_subset=cfg.verify_samples)
        images = next(iter(DataLoader(splits.test, batch_size=cfg.verify_samples)))[0]
        with torch.no_grad():  # PyTorch's logits, once: every check compares against them
            ref = bundle.model.eval()(images).numpy()
        if cfg.format == "torch-tensorrt":
            record = _export_torch_tensorrt(cfg, bundle, bundle_path, stage, plan, images, ref, t0)
        else:
            record = _export_onnx(cfg, bundle, bundle_path, stage, plan, images, ref, t0)
        failed = [k for k, v in record["verification"].items() if isinstance(v, dict) and v.get("passed") is False]
        if failed:
            raise VerificationError(
                f"{', '.join(failed)} disagrees with PyTorch beyond tolerance: "
                f"{ {k: record['verification'][k] for k in failed} }; nothing was written to {out}"
            )
    return record


def _export_onnx(cfg, bundle, bundle_path, stage: Path, plan: ExportPlan, images, ref, t0: float) -> dict[str, Any]:
    manifest = bundle.manifest
    proto, counts = build_onnx(bundle, plan)
    path = stage / "model.onnx"
    atomic_write_bytes(path, proto.SerializeToString())
    export_seconds = time.perf_counter() - t0
    try:
        onnx_lib.checker.check_model(str(path), full_check=True)
    except onnx_lib.checker.ValidationError as e:
        raise CraftError(f"the exported ONNX model fails onnx.checker: {str(e)[:400]}") from e
    check = verify_onnx(path, images, ref)
    # zeros of the pruned layers in the bundle: each must still be an exact zero in the ONNX weights
    pruned = method_state(manifest, "prune")
    check["weight_zeros_bundle"] = _pruned_zeros(bundle, pruned) if pruned else None
    check["weight_zeros_onnx"] = weight_zero_count(proto)
    check["passed"] = _judge(check, plan.precision, cfg.atol)
    if pruned and check["weight_zeros_onnx"] < check["weight_zeros_bundle"]:
        check["passed"] = False
        check["error"] = "pruned weights are not exactly zero in the exported initializers"
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    verification = {"onnxruntime": check}
    extra: dict[str, Any] = {}
    if plan.precision == "int8" and plan.activations != "fp32":
        fused = verify_onnx(path, images, ref, fused=True)
        fused["within_tolerance"] = _judge(fused, plan.precision, cfg.atol)  # recorded; this host's kernels only
        if not fused["within_tolerance"]:
            extra["warning"] = SATURATION_HINT.format(agree=fused["top1_agreement"])
        verification["onnxruntime_fused_kernels"] = fused
    timings = {"export_seconds": export_seconds}
    if cfg.format == "tensorrt":
        engine, verification["tensorrt"], timings["engine_build_seconds"] = _build_tensorrt(
            cfg, bundle, stage, plan, images, ref
        )
        extra.update(engine)
    quant = method_state(manifest, "quantize") or {}
    artifact = stage / ("model.engine" if cfg.format == "tensorrt" else "model.onnx")
    return _record(
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


def _build_tensorrt(cfg, bundle, stage: Path, plan: ExportPlan, images, ref) -> tuple[dict, dict, float]:
    """Build model.engine from the verified model.onnx, keep the log and metadata, and verify the engine."""
    from craft_deploy.bench.backends import TensorrtEngine
    from craft_deploy.export.tensorrt import build_engine

    t0 = time.perf_counter()
    engine, info, log = build_engine(
        stage / "model.onnx",
        bundle.manifest["input_size"],
        cfg.batch_sizes,
        sparse=cfg.sparse,
        workspace_gb=cfg.workspace_gb,
        timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
    )
    seconds = time.perf_counter() - t0
    atomic_write_bytes(stage / "model.engine", engine)
    atomic_write_bytes(stage / "build.log", "\n".join(log).encode())
    meta = {**export_metadata(bundle.manifest), "engine": {k: v for k, v in info.items() if k != "layers"}}
    meta["engine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    atomic_write_json(stage / "metadata.json", meta)
    runner = TensorrtEngine(stage / "model.engine")
    lo, hi = min(cfg.batch_sizes), max(cfg.batch_sizes)
    got = np.concatenate([runner.run(runner.prepare(c.numpy())) for c in images.split(hi) if len(c) >= lo])
    check = compare_outputs(ref[: len(got)], got)
    check["passed"] = _judge(check, plan.precision, cfg.atol)
    layers = info["layers"]
    extra = {
        "engine": {
            **{k: v for k, v in info.items() if k != "layers"},
            "layers": {k: v for k, v in layers.items() if k != "details"},
            "size_bytes": len(engine),
        }
    }
    if cfg.sparse and not layers["sparse_kernels"] and not info["sparsity"]["picked_sparse"]:
        extra["engine"]["warning"] = (
            "--sparse was set but TensorRT picked no sparse kernel: layers need 2:4 weights (craft-deploy compress "
            "--sparsity 2:4), INT8 or FP16 precision, and channel counts that are multiples of 32/64; dense was faster "
            "or no sparse tactic exists for these shapes on this GPU (see build.log)"
        )
    atomic_write_json(stage / "engine_layers.json", layers)
    return extra, check, seconds


def _export_torch_tensorrt(cfg, bundle, bundle_path, stage: Path, plan: ExportPlan, images, ref, t0) -> dict[str, Any]:
    from craft_deploy.export.torch_tensorrt import compile_and_save

    path = stage / "model.ep"
    info = compile_and_save(
        bundle.model, bundle.manifest["input_size"], cfg.batch_sizes, plan.precision == "fp16", path
    )
    atomic_write_json(stage / "metadata.json", {**export_metadata(bundle.manifest), "torch_tensorrt": info})
    seconds = time.perf_counter() - t0
    program = torch.export.load(str(path)).module()
    lo, hi = min(cfg.batch_sizes), max(cfg.batch_sizes)
    with torch.no_grad():
        got = np.concatenate([program(c.cuda()).float().cpu().numpy() for c in images.split(hi) if len(c) >= lo])
    check = compare_outputs(ref[: len(got)], got)
    check["passed"] = _judge(check, plan.precision, cfg.atol)
    return _record(
        stage,
        cfg,
        bundle_path,
        plan,
        path,
        compile=info,
        verification={"torch_tensorrt": check},
        timings={"compile_seconds": seconds, "total_seconds": time.perf_counter() - t0},
    )


def _record(stage: Path, cfg: ExportConfig, bundle_path, plan: ExportPlan, artifact: Path, **fields) -> dict[str, Any]:
    """export.json: the fields every format shares, then the format's own."""
    return write_record(
        stage,
        "export",
        cfg.to_dict(),
        source=str(bundle_path),
        format=cfg.format,
        target=cfg.target,
        precision=plan.precision,
        file=artifact.name,
        size_bytes=artifact.stat().st_size,
        **fields,
    )


def _pruned_zeros(bundle, pruned: dict[str, Any]) -> int:
    layers = pruned.get("layers", {})
    model = bundle.model
    total = 0
    for name in layers:
        mod = model.get_submodule(name)
        w = mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight
        total += int((w == 0).sum())
    return total
