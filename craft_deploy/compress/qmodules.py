"""Quantizer modules attached to Conv/Linear layers; they trace to ONNX QuantizeLinear/DequantizeLinear pairs.

Weights get a parametrization (per-output-channel symmetric fake-quant), inputs a forward pre-hook running an
activation quantizer (per-tensor symmetric, static scale from calibration). Both use torch's fake_quantize ops on
the int8 range, which the TorchScript ONNX exporter writes as Q/DQ; narrower grids (INT6, INT5, ...) are exact on it
because weights never leave [-qmax, qmax] and activations are clamped to the narrow range first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_deploy.compress.primitives import choose_qparams, qmax_for


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric fake-quant of a weight (axis 0)."""

    def __init__(self, channels: int, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        self.scale.copy_(choose_qparams(amax, self.bits))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(weight, self.scale, self.zero_point, 0, -128, 127)


class ActQuantizer(nn.Module):
    """Per-tensor symmetric fake-quant of a layer's input, with min-max calibration."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.calibrating = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("amax", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.amax.copy_(torch.maximum(self.amax, x.detach().abs().amax()))
            return x
        if self.bits < 8:  # keep the narrow grid exact when it is written as int8 Q/DQ
            lim = self.scale * qmax_for(self.bits)
            x = torch.clamp(x, -lim - self.scale, lim)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)

    def finish_calibration(self) -> None:
        self.calibrating = False
        self.scale.copy_(choose_qparams(self.amax, self.bits))


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def attach_quantizers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Attach weight/input quantizers to the named layers: `{name: {"w_bits": 8, "a_bits": 8}}` (a_bits 16 = float)."""
    for name, spec in layers.items():
        mod = model.get_submodule(name)
        parametrize.register_parametrization(mod, "weight", WeightQuantizer(mod.weight.shape[0], spec["w_bits"]))
        if spec["a_bits"] < 16:
            mod.input_quantizer = ActQuantizer(spec["a_bits"])
            mod.register_forward_pre_hook(_quantize_input)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` that carry a weight quantizer."""
    return {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}
