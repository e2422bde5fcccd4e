"""BatchNorm re-estimation after compression: the cheapest fix for the shift pruning or quantization causes.

Zeroed or rounded weights move every output channel's mean and variance, and the running statistics frozen at
fine-tuning time no longer normalise them. Re-estimating them on calibration data (under the compressed forward pass)
corrects each channel's offset and scale. At deployment BatchNorm folds into the preceding conv: the folded weight of a
per-channel quantized conv is still on an integer grid (scale times gamma / sigma per channel), so nothing is lost.
"""

from __future__ import annotations

import torch
from torch import nn

from craft_deploy.toolkit.registry import CalibLoop


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calib: CalibLoop) -> int:
    """Re-estimate every BatchNorm's running statistics on the calibration data (cumulative average)."""
    bns = batchnorms(model)
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        calib(model)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        model.eval()
    return len(bns)
