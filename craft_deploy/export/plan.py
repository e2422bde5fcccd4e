"""The export plan: what a bundle exports as (precision, opset, weight and activation storage), settled and checked
before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_deploy import CraftError
from craft_deploy.config import EDGE_DEVICES, ExportConfig
from craft_deploy.toolkit.placement import placement_named
from craft_deploy.toolkit.registry import method_state
from craft_deploy.toolkit.spec import FLOAT_BITS, quant_specs

INT4_OPSET = 21
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear with FLOAT8E4M3FN


@dataclass(frozen=True)
class ExportPlan:
    """What a bundle exports as, settled before anything is written."""

    precision: str  # fp32 | fp16 | int8 (the bundle's Q/DQ graph, whatever its bit widths) | fp8 (E4M3 Q/DQ)
    opset: int
    weights: str  # fp32 | fp16 | int8 | int4 (storage; INT6/INT5 values sit in int8) | fp8
    activations: str  # fp32 | fp16 | int8 | uint8 | fp8

    @property
    def int4_weights(self) -> bool:
        return self.weights == "int4"

    @property
    def uint8_activations(self) -> bool:
        return self.activations == "uint8"


def plan_export(
    cfg: ExportConfig,
    manifest: dict[str, Any],
    bundle_path: str | Path,
    flavours: tuple[str, ...] | None = ("tensorrt",),
) -> ExportPlan:
    """Resolve --precision auto and the opset, and refuse combinations that cannot be exported, naming what can;
    `flavours` are the Q/DQ flavours (--target) the format's runtime takes (its registered target's; None: any)."""
    quant = method_state(manifest, "quantize") or {}
    name = quant.get("config", "")
    fp8 = quant.get("number_format") == "fp8"
    quantized = "fp8" if fp8 else "int8"
    precision = cfg.precision if cfg.precision != "auto" else (quantized if quant else "fp32")
    if quant and precision in ("int8", "fp8") and precision != quantized:
        raise CraftError(
            f"{bundle_path} is quantized to {name} and exports as {quantized} Q/DQ, not --precision {precision}: use "
            f"--precision {quantized} (or auto)"
        )
    if fp8:
        return _fp8_plan(cfg, quant, bundle_path)
    if precision in ("int8", "fp8") and not quant:
        raise CraftError(
            f"--precision {precision} needs a quantized bundle and {bundle_path} is float; quantize it first: "
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
    target = placement_named(cfg.target, "--target")
    if int4 and not target.int4_weights:
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
    if asymmetric and not target.asymmetric:
        raise CraftError(
            f"{bundle_path} has asymmetric activation ranges (--placement {quant.get('placement', 'tensorrt')}"
            f"{', --act-asymmetric' if quant.get('placement') != 'ort-cpu' else ''}); TensorRT's INT8 is symmetric "
            "(zero point 0): export it with --target ort-cpu, or quantize again with the default --placement tensorrt "
            "and without --act-asymmetric for TensorRT"
        )
    if flavours is not None and cfg.target not in flavours:
        raise CraftError(
            f"--format {cfg.format} takes --target {' or '.join(flavours)} Q/DQ, not --target {cfg.target}"
            + (" (it runs on TensorRT)" if flavours == ("tensorrt",) else "")
        )
    opset = cfg.opset or (INT4_OPSET if int4 else 17)
    if not quant:
        return ExportPlan(precision, opset, precision, precision)
    has_acts = any(s.quantizes_input for s in layers.values())
    activations = target.activations if has_acts else "fp32"
    return ExportPlan(precision, opset, "int4" if int4 else "int8", activations)


def _fp8_plan(cfg: ExportConfig, quant: dict[str, Any], bundle_path: str | Path) -> ExportPlan:
    """E4M3 Q/DQ at opset 19: TensorRT runs it on Hopper and Ada; ONNX Runtime's CPU kernels emulate it (checks)."""
    if cfg.target != "tensorrt":
        raise CraftError(
            f"{bundle_path} is FP8 (E4M3), which TensorRT runs on Hopper and Ada GPUs: export with --target tensorrt; "
            "for a CPU, quantize with --quant w7a8 --placement ort-cpu"
        )
    if cfg.device is not None and EDGE_DEVICES[cfg.device] < 8.9:
        raise CraftError(
            f"{bundle_path} is FP8 and --device {cfg.device} (SM {EDGE_DEVICES[cfg.device]}) has no FP8 tensor cores "
            "(Ada, Hopper and newer do): quantize to INT8 for it (craft-deploy compress ... --quant w8a8)"
        )
    if cfg.opset is not None and cfg.opset < FP8_OPSET:
        raise CraftError(f"FP8 Q/DQ needs opset >= {FP8_OPSET}; got --opset {cfg.opset}: drop --opset")
    layers, _, _ = quant_specs(quant)
    has_acts = any(s.quantizes_input for s in layers.values())
    return ExportPlan("fp8", cfg.opset or FP8_OPSET, "fp8", "fp8" if has_acts else "fp32")
