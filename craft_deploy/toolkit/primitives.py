"""Pure functions behind pruning: the input-group layout of weights, and N:M, unstructured and per-row masks.

Quantization grids and fake-quant live in craft_deploy.toolkit.qparams.
"""

from __future__ import annotations

import torch


def as_input_groups(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear (O, I) or Conv (O, I, kh, kw) weight as rows whose last axis is the input dimension.

    Conv kernels are permuted to (O, kh, kw, I) so that N:M groups run along input channels, the layout NVIDIA's
    sparse tensor cores and TensorRT accept.
    """
    if weight.ndim == 2:
        return weight
    if weight.ndim == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")


def from_input_groups(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `as_input_groups`: back to the shape of `like`."""
    if like.ndim == 2:
        return rows.reshape(like.shape)
    o, i, kh, kw = like.shape
    return rows.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the `n` highest scores in every group of `m` consecutive entries of the last axis."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if score.shape[-1] % m:
        raise ValueError(f"last dimension {score.shape[-1]} is not a multiple of M={m}")
    groups = score.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(score.shape)


def unstructured_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask that prunes exactly round(ratio * numel) of the lowest scores."""
    k = int(round(ratio * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        keep[score.flatten().argsort()[:k]] = False
    return keep.reshape(score.shape)


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask pruning exactly round(ratio * cols) of the lowest scores in every row of a 2-D score."""
    k = int(round(ratio * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, score.argsort(dim=1)[:, :k], False)
    return keep
