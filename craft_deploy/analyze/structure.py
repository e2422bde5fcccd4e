"""Weight rank (CrAFT Figure 1), activation ranges (CrAFT Figure 2) and the size and compute cost of a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from craft_deploy.toolkit.layers import model_blocks
from craft_deploy.toolkit.registry import calibrate_with_hooks


@torch.no_grad()
def weight_rank(model: nn.Module, fractions: tuple[float, ...] = (0.8, 0.9)) -> dict[str, dict[str, Any]]:
    """Per Linear/Conv layer: how many principal components (singular directions) explain each fraction of the
    weight's energy, relative to its full rank, and the effective rank exp(entropy of the normalised spectrum)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or min(mod.weight.shape[0], mod.weight[0].numel()) < 2:
            continue
        w = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
        s2 = torch.linalg.svdvals(w).pow(2)
        p = s2 / s2.sum()
        cum = p.cumsum(0)
        full = len(s2)
        row: dict[str, Any] = {
            "shape": list(mod.weight.shape),
            "rank": full,
            "effective_rank": float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum())),
        }
        for f in fractions:
            k = int((cum < f).sum()) + 1
            row[f"components_{int(f * 100)}"] = k
            row[f"rank_fraction_{int(f * 100)}"] = k / full
        out[name] = row
    return out


@torch.no_grad()
def activation_ranges(model: nn.Module, calib: Callable[[nn.Module], None]) -> dict[str, dict[str, Any]]:
    """Per block output: per-channel min and max over the calibration data, and the outlier ratio
    (largest channel |range| over the median one: 1 is flat, large means a few channels dominate the scale)."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                return
            # channels: dim 1 for (N, C, H, W) feature maps, the last dim for (N, tokens, C) sequences
            x = output.transpose(1, -1) if output.ndim == 4 else output
            x = x.reshape(-1, x.shape[-1]).float()
            mn, mx = x.min(0).values, x.max(0).values
            lo[name] = torch.minimum(lo[name], mn) if name in lo else mn
            hi[name] = torch.maximum(hi[name], mx) if name in hi else mx

        return fn

    handles = [
        mod.register_forward_hook(hook(name))
        for name, mod in (model_blocks(model) or dict(model.named_children())).items()
    ]
    calibrate_with_hooks(model, calib, handles)
    out = {}
    for name in lo:
        absmax = torch.maximum(lo[name].abs(), hi[name].abs())
        out[name] = {
            "channels": len(absmax),
            "min": lo[name].tolist(),
            "max": hi[name].tolist(),
            "absmax": float(absmax.max()),
            "median_channel_absmax": float(absmax.median()),
            "outlier_ratio": float(absmax.max() / absmax.median().clamp(min=1e-12)),
        }
    return out


@torch.no_grad()
def model_cost(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Parameters and multiply-adds of one image through the model's Conv2d and Linear layers (attention's two
    matmuls and elementwise ops are not counted), each also counted over nonzero weights only: what a dense kernel
    computes, and what pruning removes (a factorised layer is two layers and counts as such)."""
    macs = {"dense": 0, "nonzero": 0}

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        w = mod.weight
        positions = (
            output[0].numel() // output.shape[1] if isinstance(mod, nn.Conv2d) else output[0].numel() // w.shape[0]
        )
        per_output = w[0].numel()  # (in / groups) x kernel for a conv, in_features for a Linear
        macs["dense"] += positions * w.shape[0] * per_output
        macs["nonzero"] += positions * int((w != 0).sum())

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = [m.weight for m in layers]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_weights": sum(w.numel() for w in weights),
        "nonzero_layer_weights": sum(int((w != 0).sum()) for w in weights),
        "multiply_adds": macs["dense"],
        "nonzero_multiply_adds": macs["nonzero"],
    }
