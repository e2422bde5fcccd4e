"""Post-training quantization: symmetric uniform fake-quant, weights per output channel, inputs per tensor (min-max)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.compress.layers import select_layers
from craft_deploy.compress.qmodules import ActQuantizer, attach_quantizers, quantized_layers
from craft_deploy.compress.registry import CalibLoop, MethodConfig, register_method


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """WxAy symmetric uniform PTQ; `a_bits` 16 leaves activations in float (weight-only)."""

    w_bits: int = 8
    a_bits: int = 8

    def __post_init__(self) -> None:
        if not 2 <= self.w_bits <= 8:
            raise CraftError(f"weight bits must be 2..8, got {self.w_bits}")
        if not (2 <= self.a_bits <= 8 or self.a_bits == 16):
            raise CraftError(f"activation bits must be 2..8 or 16 (float), got {self.a_bits}")

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


@register_method(QuantConfig)
@torch.no_grad()
def quantize_minmax(model: nn.Module, cfg: QuantConfig, calib: CalibLoop | None) -> dict[str, Any]:
    """Attach quantizers to every selected layer (stem and depthwise included), calibrate, freeze the scales."""
    layers, skipped = select_layers(model, cfg.include, cfg.exclude, skip_stem=False, skip_depthwise=False)
    spec = {name: {"w_bits": cfg.w_bits, "a_bits": cfg.a_bits} for name in layers}
    attach_quantizers(model, spec)
    for mod in quantized_layers(model).values():
        mod.parametrizations.weight[0].calibrate(mod.parametrizations.weight.original)
    act = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    if act:
        if calib is None:
            raise CraftError(f"--quant {cfg.name} quantizes activations and needs calibration data")
        for q in act:
            q.calibrating = True
        model.eval()
        calib(model)
        for q in act:
            q.finish_calibration()
    return {"config": cfg.name, "calibration": "minmax", "layers": spec, "skipped": skipped}
