"""Export stage: bundle -> deployable model (ONNX), verified against PyTorch on real images, and export.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx as onnx_lib  # aliased: the submodule craft_deploy.export.onnx rebinds `onnx` here
import torch
from torch.utils.data import DataLoader

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes, check_out_dir, staged_dir
from craft_deploy.config import ExportConfig
from craft_deploy.data import splits_for_manifest
from craft_deploy.export.onnx import export_model, fold_weight_quantizers, set_metadata
from craft_deploy.models import load_bundle
from craft_deploy.records import write_record

__all__ = ["run", "verify_onnx"]

# Tolerances for ONNX Runtime vs PyTorch on the same images. Float graphs differ only by accumulation order; Q/DQ
# graphs also by a value landing on the other side of a rounding boundary, which moves it one quantization step.
FLOAT_ATOL = 1e-3
QUANT_MIN_TOP1_AGREEMENT = 0.95


def weight_zero_count(proto: onnx_lib.ModelProto) -> int:
    """Exact zeros in the weights of Conv/Gemm/MatMul nodes (read through DequantizeLinear)."""
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    zeros = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in producers and producers[name].op_type == "DequantizeLinear":
            name = producers[name].input[0]
        if name in inits:
            zeros += int((onnx_lib.numpy_helper.to_array(inits[name]) == 0).sum())
    return zeros


def verify_onnx(path: Path, model: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) and PyTorch on `images`; max/mean abs diff and top-1 agreement."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(images).numpy()
    got = np.concatenate([sess.run(None, {"input": chunk.numpy()})[0] for chunk in images.split(32)])
    diff = np.abs(ref - got)
    return {
        "samples": len(images),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "reference_logit_absmax": float(np.abs(ref).max()),
    }


def check_exportable(manifest: dict[str, Any]) -> None:
    """Refuse quantizers that ONNX Q/DQ cannot express, before any file is written."""
    quant = manifest.get("quantization") or {}
    twin = any(s.get("a_twin") for s in quant.get("layers", {}).values()) or any(
        s.get("probs_twin") for s in (quant.get("matmuls") or {}).values()
    )
    if twin:
        raise CraftError(
            "this bundle uses PTQ4ViT's twin-uniform quantizers (two scales per tensor), which ONNX Q/DQ cannot "
            "express; quantize with --calib-method mse, percentile or entropy to export"
        )


def run(cfg: ExportConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export the bundle at `bundle_path` to `out/model.onnx`, verify it, and write `out/export.json`."""
    check_out_dir(out, overwrite)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    quantized = bool(manifest.get("quantization"))
    check_exportable(manifest)
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        proto = export_model(bundle.model, manifest["input_size"], cfg.opset)
        folded = fold_weight_quantizers(proto) if quantized else 0
        set_metadata(proto, manifest)
        path = stage / "model.onnx"
        atomic_write_bytes(path, proto.SerializeToString())
        export_seconds = time.perf_counter() - t0
        try:
            onnx_lib.checker.check_model(str(path), full_check=True)
        except onnx_lib.checker.ValidationError as e:
            raise CraftError(f"the exported ONNX model fails onnx_lib.checker: {str(e)[:400]}") from e

        splits = splits_for_manifest(manifest, cfg.data_root, eval_subset=cfg.verify_samples)
        images = next(iter(DataLoader(splits.test, batch_size=cfg.verify_samples)))[0]
        check = verify_onnx(path, bundle.model, images)
        ops: dict[str, int] = {}
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        # zeros of the pruned layers in the bundle: each must still be an exact zero in the ONNX weights
        check["weight_zeros_bundle"] = _pruned_zeros(bundle) if manifest.get("sparsity") else None
        check["weight_zeros_onnx"] = weight_zero_count(proto)
        atol = cfg.atol if cfg.atol is not None else FLOAT_ATOL * max(1.0, check["reference_logit_absmax"])
        if quantized:
            ok = check["top1_agreement"] >= QUANT_MIN_TOP1_AGREEMENT
            check["tolerance"] = {"min_top1_agreement": QUANT_MIN_TOP1_AGREEMENT}
        else:
            ok = check["max_abs_diff"] <= atol
            check["tolerance"] = {"max_abs_diff": atol}
        if manifest.get("sparsity") and check["weight_zeros_onnx"] < check["weight_zeros_bundle"]:
            ok = False
            check["error"] = "pruned weights are not exactly zero in the exported initializers"
        check["passed"] = ok
        record = write_record(
            stage,
            "export",
            cfg.to_dict(),
            source=str(bundle_path),
            format="onnx",
            precision="int8-qdq" if quantized else "fp32",
            file="model.onnx",
            size_bytes=path.stat().st_size,
            weights_folded_to_int8=folded,
            ops=ops,
            verification=check,
            timings={"export_seconds": export_seconds, "total_seconds": time.perf_counter() - t0},
        )
        if not ok:
            raise CraftError(
                f"ONNX Runtime disagrees with PyTorch beyond tolerance: {check}; nothing was written to {out}"
            )
    return record


def _pruned_zeros(bundle) -> int:
    layers = (bundle.manifest.get("sparsity") or {}).get("layers", {})
    model = bundle.model
    total = 0
    for name in layers:
        mod = model.get_submodule(name)
        w = mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight
        total += int((w == 0).sum())
    return total
