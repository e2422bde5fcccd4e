"""GPTQ-style weight rounding (Frantar et al., 2023): round a layer's weights onto their quantization grid one input
column at a time, spreading each column's rounding error over the columns not yet rounded so that the layer's outputs
on the calibration inputs move as little as possible.

The machinery is SparseGPT's (craft_deploy.compress.sparsegpt): the damped Hessian H = X X^T of the layer's inputs,
the upper Cholesky factor U of H^-1, column blocks with lazy updates. Where SparseGPT sets a column's pruned weights to
zero, GPTQ sets every weight to its nearest grid point q = clamp(round(w / s), -qmax, qmax) * s, and the error
(w - q) / U[j, j] moves the later columns along U[j, j:].

Choices: the scales are the layer's weight quantizer's, calibrated (min-max or MSE clip) on the weights before
rounding and then held fixed (GPTQ's "static groups"), so per-channel and per-group grids are those the bundle records
and exports; columns are visited in storage order (no act-order, which would need a permutation at export). Weights
that are exactly zero stay zero (their error still moves the later columns), so GPTQ after pruning keeps every
pruning mask: prune (SparseGPT) then round is the two-pass form of the SparseGPT paper's joint prune-and-quantize.
"""

from __future__ import annotations

import torch

from craft_deploy.compress.sparsegpt import BLOCK_SIZE, DAMPENING, ColumnRule, obs_sweep
from craft_deploy.toolkit.qparams import fake_quant_symmetric


class _RoundRule(ColumnRule):
    """Each column to its nearest grid point with its own steps; exact zeros stay zero."""

    def __init__(self, w: torch.Tensor, scales: torch.Tensor, bits: int):
        self.scales = scales.double().expand_as(w)
        self.zero = w == 0
        self.bits = bits

    def target(self, j: int, i: int, w1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        q = fake_quant_symmetric(w1[:, i], self.scales[:, j], self.bits)
        return torch.where(self.zero[:, j], torch.zeros_like(q), q)


@torch.no_grad()
def gptq_round(
    w: torch.Tensor,
    h: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> torch.Tensor:
    """Round the (rows, columns) matrix `w` onto the symmetric `bits`-bit grid whose step for each weight is `scales`
    (same shape), with the OBS error feedback for input Hessian `h`. Exact zeros of `w` stay zero."""
    return obs_sweep(w, h, _RoundRule(w, scales, bits), block_size, dampening)


def weight_scales_matrix(quantizer, weight: torch.Tensor) -> torch.Tensor:
    """Each weight's grid step laid out like `sparsegpt.weight_matrix(weight)` (columns (kh, kw, C_in) for convs), from
    a WeightQuantizer's per-tensor, per-channel or per-group scales (groups run along the flattened (C_in, kh, kw))."""
    from craft_deploy.compress.sparsegpt import weight_matrix

    out = weight.shape[0]
    per_row = weight[0].numel()
    if quantizer.granularity == "group":
        position = weight_matrix(torch.arange(per_row).reshape(1, *weight.shape[1:]))[0]  # (C, kh, kw) index per column
        groups = quantizer.scale.reshape(out, per_row // quantizer.group_size)
        return groups[:, position // quantizer.group_size]
    if quantizer.scale.numel() == 1:
        return quantizer.scale.reshape(1, 1).expand(out, per_row)
    return quantizer.scale.reshape(out, 1).expand(out, per_row)
