"""Quantizer modules attached to Conv/Linear layers and attention matmuls; uniform ones trace to ONNX Q/DQ pairs.

Weights get a parametrization (symmetric fake-quant per output channel, per tensor, or per group of input weights),
layer inputs a forward pre-hook running an activation quantizer (per tensor, static scale from calibration; symmetric
or asymmetric). Both use torch's fake_quantize ops on the int8 range, which the TorchScript ONNX exporter writes as
Q/DQ; narrower grids (INT6, INT5, ...) are exact on it because values are clamped to the narrow grid first.
PTQ4ViT's twin-uniform quantizer (two scales, one for small values) has no Q/DQ equivalent and is simulation only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_deploy import CraftError
from craft_deploy.toolkit.calibrators import RangeObserver, mse_weight_scale
from craft_deploy.toolkit.qparams import (
    FP8_E4M3_MAX,
    act_grid,
    asymmetric_qparams,
    choose_qparams,
    fake_quant_fp8,
    fp8_scale,
    qmax_for,
    symmetric_act_qparams,
)


class WeightQuantizer(nn.Module):
    """Symmetric fake-quant of a weight on [-qmax, qmax]: per output channel, per tensor, or per group; or, with
    `number_format` fp8, E4M3 per output channel or per tensor.

    Groups are `group_size` consecutive weights of an output channel's flattened (in, kh, kw) weights.
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        bits: int,
        granularity: str = "channel",
        group_size: int = 0,
        number_format: str = "int",
    ):
        super().__init__()
        self.bits, self.granularity, self.group_size = bits, granularity, group_size
        self.number_format = number_format
        per_row = math.prod(shape[1:])
        if granularity == "group":
            if group_size <= 0 or per_row % group_size:
                raise CraftError(f"group size {group_size} does not divide the {per_row} weights per output channel")
            rows = shape[0] * (per_row // group_size)
        else:
            rows = shape[0]
        self.enabled = True
        self.pre_clamped = False  # set by export once the weight itself holds only values inside the grid
        self.register_buffer("scale", torch.ones(rows))
        self.register_buffer("zero_point", torch.zeros(rows, dtype=torch.int32))

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.scale.numel(), -1)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor, method: str = "minmax") -> None:
        rows = self.rows(weight.detach().float())
        if method == "mse":
            rows = rows if self.granularity != "tensor" else rows.reshape(1, -1)
            scale = mse_weight_scale(rows, self.bits, number_format=self.number_format)
        else:
            amax = rows.abs().amax(dim=1) if self.granularity != "tensor" else rows.abs().amax().reshape(1)
            scale = fp8_scale(amax) if self.number_format == "fp8" else choose_qparams(amax, self.bits)
        scale = scale.expand_as(self.scale).clone()
        empty = (rows == 0).all(dim=1) if self.granularity != "tensor" else (rows == 0).all().expand(scale.numel())
        if empty.all():  # any scale holds zeros exactly: that of amax 1
            unit = torch.ones(1)
            scale.fill_(float(fp8_scale(unit) if self.number_format == "fp8" else choose_qparams(unit, self.bits)))
        elif empty.any():  # the layer's largest, not 1e-8 / qmax: integer kernels rescale and add biases by it
            scale[empty] = scale[~empty].max()
        self.scale.copy_(scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.number_format == "fp8":  # E4M3 saturates by itself: no clamp needed
            if self.granularity == "channel":
                return fake_quant_fp8(weight, self.scale, 0)
            return fake_quant_fp8(weight, self.scale[0], None)  # per tensor: every row holds the same scale
        if self.granularity == "group":  # one scale per row of (channels * groups, group_size)
            rows = self.rows(weight)
            rows = rows if self.pre_clamped else self.clamp(rows)
            return _per_channel(rows, self.scale, self.zero_point).reshape(weight.shape)
        weight = weight if self.pre_clamped else self.clamp(weight)  # no reshape: DQ feeds the Conv/Gemm directly
        return _per_channel(weight, self.scale, self.zero_point)

    def clamp(self, w: torch.Tensor) -> torch.Tensor:
        """Clip weights (or weight rows) to [-qmax, qmax] steps: a clipped (MSE) or narrow (INT6, INT4) grid stays
        exact."""
        top = FP8_E4M3_MAX if self.number_format == "fp8" else qmax_for(self.bits)
        lim = (self.scale * top).reshape(-1, *[1] * (w.ndim - 1))
        return torch.clamp(w, -lim, lim)


def _int8_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(clamp(round(x / s) + zp, -128, 127) - zp) * s, what torch's fake_quantize ops compute, in x's own dtype."""
    return (torch.clamp(torch.round(x / scale) + zero_point, -128, 127) - zero_point) * scale


def _per_channel(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 fake-quant of `w` (rows along dim 0); in float64 too, which torch's op refuses."""
    if w.dtype != torch.float64:
        return torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, -128, 127)
    shape = (-1, *[1] * (w.ndim - 1))
    return _int8_grid(w, scale.double().reshape(shape), zero_point.double().reshape(shape))


class _ActivationQuantizer(nn.Module):
    """Shared behaviour: pass values through to a calibration observer, or untouched while disabled."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.observer: RangeObserver | None = None
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        return self.quantize(x) if self.enabled else x

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ActQuantizer(_ActivationQuantizer):
    """Per-tensor fake-quant of an activation with a static, calibrated range; symmetric or asymmetric."""

    def __init__(self, bits: int, symmetric: bool = True, number_format: str = "int"):
        super().__init__(bits)
        self.symmetric = symmetric
        self.number_format = number_format
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.number_format == "fp8":
            return fake_quant_fp8(x, self.scale)
        qmin, qmax = act_grid(self.bits)
        if self.bits < 8:  # keep a narrower grid exact when it is written as int8 Q/DQ
            zp = self.zero_point.to(x.dtype)
            x = torch.clamp(x, (qmin - zp) * self.scale, (qmax - zp) * self.scale)
        if isinstance(self.scale, nn.Parameter):  # LSQ: the scale learns, its gradient scaled by 1/sqrt(N * qmax)
            factor = 1.0 / math.sqrt(x.numel() / max(x.shape[0], 1) * qmax)
            zp = self.zero_point.to(x.dtype)
            return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, zp, -128, 127, factor)
        if x.dtype == torch.float64:  # the exact reference export verification compares with
            return _int8_grid(x, self.scale.double(), self.zero_point.double())
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)

    def learn_scale(self) -> nn.Parameter:
        """Make the scale a trainable parameter (LSQ, Esser et al. 2020); same name in the state dict."""
        scale = nn.Parameter(self.scale.detach().clone())
        del self._buffers["scale"]
        self.scale = scale
        return scale

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        """Scale (and zero point) mapping [lo, hi] onto the integer grid; symmetric uses max(|lo|, |hi|); E4M3 maps
        max(|lo|, |hi|) to 448."""
        if self.number_format == "fp8":
            scale, zero_point = float(fp8_scale(torch.tensor(max(abs(lo), abs(hi))))), 0
        else:
            scale, zero_point = (symmetric_act_qparams if self.symmetric else asymmetric_qparams)(lo, hi, self.bits)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)

    def range(self) -> tuple[float, float]:
        """The calibrated range: (-amax, amax) when symmetric, else the grid's ends."""
        if self.number_format == "fp8":
            return (-FP8_E4M3_MAX * float(self.scale), FP8_E4M3_MAX * float(self.scale))
        qmin, qmax = act_grid(self.bits)
        s, zp = float(self.scale), int(self.zero_point)
        return (-qmax * s, qmax * s) if self.symmetric else ((qmin - zp) * s, (qmax - zp) * s)


class TwinActQuantizer(_ActivationQuantizer):
    """PTQ4ViT's twin-uniform quantizer: two grids of 2^(b-1) levels, a fine one (delta1) for small values.

    `softmax` (post-softmax values in [0, 1]): values below 2^(b-1) * delta1 use delta1, the rest delta2 (fixed at
    1 / 2^(b-1) so the coarse grid spans [0, 1)). `gelu` (post-GELU values): negatives use delta1, positives delta2.
    The sign / range bit takes one of the b bits. delta2 = 2^m * delta1, as the paper requires for cheap rescaling.
    """

    def __init__(self, bits: int, mode: str):
        super().__init__(bits)
        if mode not in ("softmax", "gelu"):
            raise ValueError(f"twin-uniform mode must be softmax or gelu, got {mode!r}")
        self.mode = mode
        self.register_buffer("delta1", torch.full((1,), 1.0 / 2 ** (bits + 4)))
        self.register_buffer("delta2", torch.full((1,), 1.0 / 2 ** (bits - 1)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2 ** (self.bits - 1)
        d1, d2 = self.delta1, self.delta2
        if self.mode == "softmax":
            fine = torch.clamp(torch.round(x / d1), 0, levels - 1) * d1
            coarse = torch.clamp(torch.round(x / d2), 0, levels - 1) * d2
            return torch.where(x < levels * d1, fine, coarse)
        fine = torch.clamp(torch.round(x / d1), -levels, 0) * d1
        coarse = torch.clamp(torch.round(x / d2), 0, levels - 1) * d2
        return torch.where(x < 0, fine, coarse)

    @torch.no_grad()
    def set_deltas(self, delta2: float, m: int) -> None:
        self.delta2.fill_(delta2)
        self.delta1.fill_(delta2 / 2**m)

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        """Initial deltas from a min-max range: the coarse grid covers `hi`, the fine one the negatives (gelu)."""
        levels = 2 ** (self.bits - 1)
        if self.mode == "softmax":
            self.set_deltas(1.0 / levels, 4)
        else:
            d2 = max(hi, 1e-8) / (levels - 1)
            self.set_deltas(d2, self.gelu_m(d2, lo))

    def gelu_m(self, delta2: float, lo: float) -> int:
        """The finest delta1 = delta2 / 2^m whose 2^(b-1) levels still reach the most negative value `lo`."""
        levels = 2 ** (self.bits - 1)
        if lo >= 0:
            return 0
        return max(0, math.floor(math.log2(delta2 * levels / -lo)))


def quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input through its `input_quantizer`."""
    return (module.input_quantizer(args[0]), *args[1:])


def quantize_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output through its `output_quantizer`."""
    return module.output_quantizer(out)


def make_act_quantizer(bits: int, symmetric: bool, twin: str | None = None, number_format: str = "int") -> nn.Module:
    """An activation quantizer: twin-uniform where `twin` names the tensor kind, uniform otherwise."""
    return TwinActQuantizer(bits, twin) if twin else ActQuantizer(bits, symmetric, number_format)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` that carry a weight quantizer."""
    return {n: m for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Every activation quantizer of `model` (layer inputs and attention matmul inputs) by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (ActQuantizer, TwinActQuantizer))}
