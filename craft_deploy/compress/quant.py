"""Post-training quantization: WxAy uniform fake-quant with min-max, percentile, MSE, entropy or PTQ4ViT calibration.

Weights are symmetric per output channel (default), per tensor or per group; layer inputs per tensor, static,
symmetric by default. With `quant_attention` a ViT's attention matmuls get input quantizers too. `placement` ort-cpu
adds the quantizers ONNX Runtime's CPU integer kernels need (residual adds, pooling; asymmetric ranges).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.compress.attention import attention_modules
from craft_deploy.compress.batchnorm import batchnorms, recalibrate_batchnorm
from craft_deploy.compress.calibrators import CALIB_METHODS, RangeObserver, compute_range
from craft_deploy.compress.layers import select_layers
from craft_deploy.compress.placement import PLACEMENTS, ort_cpu_tensors
from craft_deploy.compress.qmodules import ActQuantizer, activation_quantizers, attach_quantizers, quantized_layers
from craft_deploy.compress.registry import CalibLoop, MethodConfig, register_method

WEIGHT_GRANULARITIES = ("channel", "tensor", "group")


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """WxAy uniform PTQ; `a_bits` 16 leaves activations in float (weight-only)."""

    w_bits: int = 8
    a_bits: int = 8
    calib_method: str = "minmax"
    percentile: float = 99.99
    weight_calib: str | None = None
    w_granularity: str = "channel"
    group_size: int = 0
    act_asymmetric: bool = False
    quant_attention: bool = False
    search_points: int = 24
    search_rounds: int = 2
    bn_recalibrate: bool = False
    placement: str = "tensorrt"

    def __post_init__(self) -> None:
        if not 2 <= self.w_bits <= 8:
            raise CraftError(f"weight bits must be 2..8, got {self.w_bits}")
        if not (2 <= self.a_bits <= 8 or self.a_bits == 16):
            raise CraftError(f"activation bits must be 2..8 or 16 (float), got {self.a_bits}")
        if self.calib_method not in CALIB_METHODS:
            raise CraftError(
                f"--calib-method {self.calib_method!r} is unknown; choose one of {', '.join(CALIB_METHODS)}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise CraftError(f"--percentile must be in (50, 100], e.g. 99.99, got {self.percentile}")
        if self.weight_calib not in (None, "minmax", "mse"):
            raise CraftError(f"--weight-calib must be minmax or mse, got {self.weight_calib!r}")
        if self.w_granularity not in WEIGHT_GRANULARITIES:
            raise CraftError(
                f"--weight-granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, got {self.w_granularity!r}"
            )
        if (self.w_granularity == "group") != (self.group_size > 0):
            raise CraftError(f"--group-size {self.group_size} goes with weight granularity 'group' and vice versa")
        if self.group_size and self.a_bits != 16:
            raise CraftError(
                f"--group-size is for weight-only quantization (wXa16), got {self.name}; drop it or use e.g. w4a16"
            )
        if self.group_size < 0 or self.group_size == 1:
            raise CraftError(f"--group-size must be >= 2 (e.g. 64 or 128), got {self.group_size}")
        if self.calib_method == "entropy" and self.act_asymmetric:
            raise CraftError("--calib-method entropy calibrates symmetric ranges; drop --act-asymmetric or use mse")
        if self.placement not in PLACEMENTS:
            raise CraftError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.placement == "ort-cpu" and (self.a_bits == 16 or self.calib_method in ("entropy", "ptq4vit")):
            raise CraftError(
                f"--placement ort-cpu adds asymmetric activation quantizers; got --quant {self.name} with "
                f"--calib-method {self.calib_method}: quantize activations (e.g. --quant w7a8, not wXa16) and "
                "calibrate with minmax, percentile or mse"
            )
        if self.search_points < 2 or self.search_rounds < 1:
            raise CraftError(f"search needs >= 2 points and >= 1 round, got {self.search_points}, {self.search_rounds}")

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @property
    def act_symmetric(self) -> bool:
        """ONNX Runtime's CPU placement uses asymmetric activations (post-ReLU ranges from 0, any zero point)."""
        return not (self.act_asymmetric or self.placement == "ort-cpu")

    @property
    def weight_method(self) -> str:
        """Weights are known exactly, so only min-max and MSE clipping apply; every calibrator but min-max uses MSE."""
        return self.weight_calib or ("minmax" if self.calib_method == "minmax" else "mse")


@register_method(QuantConfig)
@torch.no_grad()
def quantize(model: nn.Module, cfg: QuantConfig, calib: CalibLoop | None) -> dict[str, Any]:
    """Attach quantizers to every selected layer (stem and depthwise included), calibrate, freeze the scales.

    With `bn_recalibrate`, BatchNorm statistics are then re-estimated under the fully quantized forward pass.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    method = cfg.calib_method
    notes: list[str] = []
    attn = attention_modules(model) if (cfg.quant_attention or method == "ptq4vit") and cfg.a_bits < 16 else {}
    if method == "ptq4vit" and not attn:
        method = "mse"
        notes.append("ptq4vit needs a ViT (timm Attention blocks) and quantized activations; calibrated with mse")
    layers, skipped = select_layers(model, cfg.include, cfg.exclude, skip_stem=False, skip_depthwise=False)
    spec: dict[str, dict[str, Any]] = {}
    for name, mod in layers.items():
        per_row = mod.weight[0].numel()
        if cfg.group_size and per_row % cfg.group_size:
            skipped[name] = f"{per_row} weights per output channel are not a multiple of --group-size {cfg.group_size}"
            continue
        spec[name] = {
            "w_bits": cfg.w_bits,
            "a_bits": cfg.a_bits,
            "w_granularity": cfg.w_granularity,
            "group_size": cfg.group_size,
            "a_symmetric": cfg.act_symmetric,
            "a_twin": "gelu" if method == "ptq4vit" and _after_gelu(name, model) else None,
        }
    matmuls = {
        name: {"a_bits": cfg.a_bits, "a_symmetric": cfg.act_symmetric, "probs_twin": method == "ptq4vit"}
        for name in attn
    }
    tensors = {}
    if cfg.placement == "ort-cpu":
        tensors = {
            name: {"a_bits": cfg.a_bits, "a_symmetric": False, "sides": sides}
            for name, sides in ort_cpu_tensors(model).items()
        }
        if not tensors:
            notes.append("--placement ort-cpu: no timm residual CNN blocks found; only layer inputs are quantized")
    attach_quantizers(model, spec, matmuls, tensors)
    for mod in quantized_layers(model).values():
        mod.parametrizations.weight[0].calibrate(mod.parametrizations.weight.original, cfg.weight_method)
    timings["weights_seconds"] = time.perf_counter() - t0
    act = activation_quantizers(model)
    ranges: dict[str, list[float]] = {}
    if act:
        if calib is None:
            raise CraftError(f"--quant {cfg.name} quantizes activations and needs calibration data")
        t1 = time.perf_counter()
        observe_ranges(model, act, calib, "minmax" if method == "ptq4vit" else method, cfg)
        timings["activations_seconds"] = time.perf_counter() - t1
        if method == "ptq4vit":
            from craft_deploy.compress.ptq4vit import hessian_guided_search

            t2 = time.perf_counter()
            search = hessian_guided_search(model, calib, cfg)
            timings["hessian_search_seconds"] = time.perf_counter() - t2
            notes.append(f"hessian-guided search over {len(search)} ops")
        ranges = {n: [round(v, 6) for v in q.range()] for n, q in act.items() if isinstance(q, ActQuantizer)}
    bn_count = 0
    if cfg.bn_recalibrate and batchnorms(model):
        if calib is None:
            raise CraftError("--bn-recalibrate re-estimates BatchNorm statistics and needs --calib-samples N")
        t3 = time.perf_counter()
        bn_count = recalibrate_batchnorm(model, calib)
        timings["bn_recalibrate_seconds"] = time.perf_counter() - t3
    elif cfg.bn_recalibrate:
        notes.append("--bn-recalibrate: the model has no BatchNorm; nothing re-estimated")
    timings["total_seconds"] = time.perf_counter() - t0
    return {
        "config": cfg.name,
        "calibration": method,
        "weight_calibration": cfg.weight_method,
        "layers": spec,
        "matmuls": matmuls,
        "tensors": tensors,
        "placement": cfg.placement,
        "skipped": skipped,
        "activation_ranges": ranges,
        "bn_recalibrated": bn_count,
        "notes": notes,
        "timings": timings,
    }


def observe_ranges(
    model: nn.Module, act: dict[str, nn.Module], calib: CalibLoop, method: str, cfg: QuantConfig
) -> None:
    """Calibrate every activation quantizer: a range pass, then (for histogram methods) a histogram pass."""
    observers = {name: RangeObserver(getattr(q, "symmetric", False)) for name, q in act.items()}
    for name, q in act.items():
        q.observer = observers[name]
    try:
        model.eval()
        calib(model)
        if method != "minmax":
            for obs in observers.values():
                obs.start_histogram()
            calib(model)
    finally:
        for q in act.values():
            q.observer = None
    for name, q in act.items():
        q.set_range(*compute_range(observers[name], method, q.bits, cfg.percentile))


def _after_gelu(name: str, model: nn.Module) -> bool:
    """Whether a layer's input is a GELU output: the second Linear of a timm Mlp (`...mlp.fc2`)."""
    if not name.endswith(".fc2"):
        return False
    mlp = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(getattr(mlp, "act", None), nn.GELU)
