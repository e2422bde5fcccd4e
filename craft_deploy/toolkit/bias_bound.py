"""Weight scales that keep every bias representable in int32, decided at calibration time.

A runtime that runs a quantized Conv/Gemm as an integer kernel (ONNX Runtime's QLinearConv, any int8 accumulator)
adds the bias into the int32 accumulator, as round(bias / (input scale x weight scale)). A channel whose weight scale
is tiny (its weights all or nearly zero after pruning and BatchNorm re-estimation) makes that integer overflow, and the
runtime saturates it at 2^31 while PyTorch's fake-quant, adding the bias in float, does not. ONNX Runtime's own
quantizer raises such weight scales; so do we, per output channel, at calibration, so that PyTorch and every runtime
compute the same thing:

    weight scale >= |folded bias| / (input scale x |k| x CALIBRATION_BOUND)

where the folded bias and k = gamma / sqrt(var + eps) are what export's BatchNorm fold will write (the conv's weight
scale becomes |k| x scale and its bias (b - mean) x k + beta). Raising a scale only coarsens a channel whose weights are
at most that scale's half, which round to zero. Then each folded bias is put on its int32 grid, so that the rounding a
runtime applies changes nothing (`fit_biases_to_int32`). Export refuses a file whose biases exceed `BIAS_INT32_BOUND`
(`check_bias_range` in export.passes.qdq), 64 times looser: that bound is about overflow, this one about exactness.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# What calibration floors the scales to: 2^18 units, where a float32 bias still resolves its grid to 1/64 of a unit
# (float32 carries 24 bits: at 2^22 units, where the floor first stood, the stored bias was off the grid by up to half
# a unit again, measured on the issue-25 EfficientNet). Export's bound, 2^24, is about overflow alone.
CALIBRATION_BOUND = 2**18


@contextmanager
def batchnorm_after(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[dict[str, nn.BatchNorm2d]]:
    """While the block runs forward passes, find the BatchNorm that reads each of `layers`' outputs directly.

    Yields the mapping it fills (layer name -> BatchNorm), found by tensor identity on the passes run inside, so it
    holds for any model structure without tracing: a BatchNorm counts only when its input is the very tensor the layer
    returned.
    """
    found: dict[str, nn.BatchNorm2d] = {}
    latest: dict[int, tuple[str, torch.Tensor]] = {}
    handles = [model.register_forward_pre_hook(lambda m, a: latest.clear())]  # one forward's outputs at a time

    def remember(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            latest[id(out)] = (name, out)

        return hook

    def match(module: nn.Module, args: tuple) -> None:
        hit = latest.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            found[hit[0]] = module

    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(remember(name)))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            handles.append(mod.register_forward_pre_hook(match))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        latest.clear()


def _fold_terms(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(folded bias, k) per output channel in float64, as export's BatchNorm fold computes them: bias (b - mean) x k +
    beta with k = gamma / sqrt(var + eps); k = 1 without a BatchNorm."""
    out_channels = layer.weight.shape[0]
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    if bn is None:
        return bias, torch.ones_like(bias)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    return (bias - mean) * k + beta, k


def _integer_layers(layers: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module, nn.Module, float]]:
    """(name, layer, weight quantizer, input scale) of every layer that a runtime can run as an integer kernel: integer
    weights (not per group) and a quantized input. Weight-only and FP8 layers keep their bias in float."""
    for name, mod in layers.items():
        wq = mod.parametrizations.weight[0]
        aq = getattr(mod, "input_quantizer", None)
        if wq.number_format != "int" or wq.granularity == "group" or aq is None or not hasattr(aq, "scale"):
            continue
        yield name, mod, wq, float(aq.scale.detach().reshape(-1)[0])


@torch.no_grad()
def fit_biases_to_int32(
    layers: dict[str, nn.Module], following: dict[str, nn.modules.batchnorm._BatchNorm]
) -> dict[str, Any]:
    """Make every integer layer's bias what an int32 accumulator holds; returns what changed.

    1. Each channel's weight scale is raised where |folded bias| / (input scale x |k| x weight scale) would exceed
       `CALIBRATION_BOUND` (a per-tensor scale to the largest floor of its channels).
    2. Each folded bias is moved to the nearest multiple of its grid unit, input scale x |k| x weight scale (float32,
       as the file stores them), by adjusting the BatchNorm's beta (or the layer's bias). A runtime that rounds the
       bias onto that grid (ONNX Runtime does) then computes what PyTorch computes; without this, rounding moved each
       channel by up to half a unit, which an ill-conditioned model amplifies (seen: 1.5 logits on a 2:4 + W8A8
       EfficientNet whose near-empty channels BatchNorm re-estimation scales up 30x).
    """
    raised: dict[str, int] = {}
    snapped = 0
    for name, mod, wq, input_scale in _integer_layers(layers):
        bn = following.get(name)
        folded, k = _fold_terms(mod, bn)
        gain = torch.where(k != 0, k.abs(), torch.ones_like(k))  # export keeps the scale of a channel with k = 0
        floor = folded.abs() / (input_scale * gain * CALIBRATION_BOUND)
        if wq.granularity == "tensor":
            floor = floor.max().expand(wq.scale.numel())
        low = wq.scale.double() < floor
        if low.any():
            wq.scale.copy_(torch.where(low, (floor * (1 + 1e-6)).to(wq.scale.dtype), wq.scale))
            raised[name] = int(low.sum())
        unit = _f32(input_scale) * _f32(wq.scale.double() * gain)  # what the exported file's scales multiply to
        delta = torch.round(folded / unit) * unit - folded
        target = bn.bias if bn is not None else mod.bias  # beta (or the bias itself) moves the folded bias 1:1
        if target is None or not delta.any():
            continue
        target.add_(delta.to(target.dtype))
        snapped += 1
    return {"weight_scales_raised": raised, "biases_on_int32_grid": snapped}


def _f32(x: torch.Tensor | float) -> torch.Tensor:
    """`x` rounded to float32, returned in float64."""
    return torch.as_tensor(x, dtype=torch.float64).float().double()
