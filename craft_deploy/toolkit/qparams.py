"""Integer grids, the FP8 (E4M3) format and quantization parameters: the only place grid maths lives.

Weights are symmetric on [-qmax, qmax] (qmax = 2^(b-1) - 1); activations use the full signed grid
[-2^(b-1), 2^(b-1) - 1], symmetric scales mapping amax to 2^(b-1) - 1. Narrower grids (INT6, INT5, ...) are stored
on the int8 grid of ONNX Q/DQ, clamped to their own range first, which keeps them exact. Rounding is half-to-even, as
torch.round and ONNX QuantizeLinear do.

FP8 E4M3 (`torch.float8_e4m3fn`, ONNX FLOAT8E4M3FN): symmetric, scale = amax / 448 (the format's largest finite
value), zero point 0; x / scale is rounded to the nearest E4M3 value (ties to even) and saturated at +-448, which is
what a cast to float8_e4m3fn and ONNX QuantizeLinear (saturate=1) both do. It traces to opset-19 Q/DQ.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_SCALE = 1e-8  # a scale is never zero, so empty channels and constant tensors stay valid
FP8_E4M3_MAX = 448.0
NUMBER_FORMATS = ("int", "fp8")
# largest |bias| / (input scale x weight scale) an exported integer layer may hold: int32 accumulators add it, and 2^24
# leaves 2^7 of headroom for the products summed beside it (compress.bias_bound keeps calibrated scales within it)
BIAS_INT32_BOUND = 2**24


def qmax_for(bits: int) -> int:
    """Largest integer of a signed `bits`-bit grid: 127 for 8 bits, 31 for 6, 7 for 4."""
    return 2 ** (bits - 1) - 1


def int_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed integer grid of a `bits`-bit quantizer: [-qmax, qmax] (symmetric) or [-2^(b-1), 2^(b-1) - 1]."""
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def act_grid(bits: int) -> tuple[int, int]:
    """Activations use the full signed grid whether their range is symmetric or not."""
    return int_grid(bits, symmetric=False)


def choose_qparams(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale mapping [-amax, amax] onto [-qmax, qmax]."""
    return amax.clamp(min=MIN_SCALE) / qmax_for(bits)


def symmetric_act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero point 0) of a symmetric activation range: max(|lo|, |hi|) maps to 2^(b-1) - 1."""
    return max(abs(lo), abs(hi), MIN_SCALE) / act_grid(bits)[1], 0


def asymmetric_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero point) mapping [lo, hi], widened to hold 0 exactly, onto the full signed grid."""
    qmin, qmax = act_grid(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, MIN_SCALE) / (qmax - qmin)
    return scale, int(min(max(qmin - round(lo / scale), qmin), qmax))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Reference symmetric fake-quant: clamp(round(x / s), -qmax - 1, qmax) * s, with s per `axis` if given."""
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    q = torch.clamp(torch.round(x / scale), -qmax_for(bits) - 1, qmax_for(bits))
    return q * scale


def fake_quant_symmetric(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Fake-quant onto the symmetric weight grid: clamp(round(x / s), -qmax, qmax) * s (`scale` broadcasts)."""
    qmax = qmax_for(bits)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def fake_quant_range_np(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    """Fake-quant of values `x` for the calibrated range [lo, hi] (symmetric: [-hi, hi]), as calibrators score it."""
    qmin, qmax = int_grid(bits, symmetric)
    if symmetric:
        scale, zp = max(hi, 1e-12) / qmax, 0.0
    else:
        scale = max(hi - lo, 1e-12) / (qmax - qmin)
        zp = float(np.clip(qmin - np.round(lo / scale), qmin, qmax))
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp(min=1e-30)))


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """E4M3 scale mapping [-amax, amax] onto [-448, 448]."""
    return amax.clamp(min=MIN_SCALE) / FP8_E4M3_MAX


def _fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


class Fp8QuantDequant(torch.autograd.Function):
    """x -> E4M3(x / s) * s (per tensor, or per channel along `axis`); the gradient passes straight through inside
    the representable range and is zero where x saturates; exports as QuantizeLinear/DequantizeLinear (opset 19)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
        s = _broadcast(scale, x, axis)
        ctx.save_for_backward((x / s).abs() <= FP8_E4M3_MAX)
        return _fp8_round(x, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None

    @staticmethod
    def symbolic(g, x, scale, axis):
        sizes = scale.type().sizes()
        zero = g.op("Constant", value_t=torch.zeros(sizes if sizes else (), dtype=torch.float8_e4m3fn))
        kw = {"axis_i": axis} if axis is not None else {}
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero, **kw), scale, zero, **kw)


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale.reshape(()) if scale.numel() == 1 else scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """FP8 E4M3 fake-quant with scale `scale` (per tensor, or per channel along `axis`)."""
    return Fp8QuantDequant.apply(x, scale, axis)


def fake_quant_fp8_range_np(x: np.ndarray, amax: float) -> np.ndarray:
    """E4M3 fake-quant of values `x` for the symmetric range [-amax, amax], as calibrators score it."""
    scale = torch.tensor(max(amax, 1e-12) / FP8_E4M3_MAX, dtype=torch.float32)
    return _fp8_round(torch.from_numpy(np.asarray(x, dtype=np.float32)), scale).numpy()
