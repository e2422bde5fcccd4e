"""SparseGPT (Frantar & Alistarh, 2023): prune a layer's weights and update the ones kept so that its outputs on the
calibration inputs move as little as possible.

For a layer computing W X (rows of W = output channels, columns = input features), the squared output error of every
row is a quadratic in that row with Hessian H = X X^T, shared by all rows. Columns are visited left to right; a pruned
column's weight is set to zero and its error is spread over the columns not yet visited along the row of the inverse
Hessian of those columns (the optimal brain surgeon update). All those successive inverse Hessians are read off one
upper Cholesky factor U of H^-1: the row U[j, j:] / U[j, j] is the OBS update direction after columns < j are fixed,
and U[j, j]^2 is the denominator of the OBS saliency w_j^2 / [H_j^-1]_00. Updates inside a block of columns are applied
eagerly, to the columns after the block once per block (lazy batch updates), which gives the same result with
matrix-matrix products.

Masks: N:M picks, at the first column of every group of M, the M - N columns of lowest saliency in each row, with the
weights as updated so far; an unstructured ratio prunes, in every block of columns, that fraction of the block's
weights of lowest saliency (the reference's adaptive mask selection; the layer's total is the sum over blocks).

Convolutions are linear maps of their unfolded inputs (im2col with the conv's own padding, stride and dilation; timm's
Conv2dSame padding applied first). Columns are ordered (kh, kw, C_in), so that N:M groups run along input channels as
everywhere else in craft-deploy (`as_input_groups`). Grouped (depthwise) convs are refused.

Choices where the paper leaves room: dampening 1% of the mean diagonal (the reference's default); input features that
calibration never activated (zero diagonal) get a unit diagonal, and their weights are left to the saliency like any
other (the reference zeroes them, which changes the layer for inputs calibration did not cover).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from craft_deploy import CraftError
from craft_deploy.toolkit.registry import CalibLoop, calibrate_with_hooks

DAMPENING = 0.01
BLOCK_SIZE = 128


def _conv_same():
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same

    return Conv2dSame, pad_same


def layer_columns(mod: nn.Module, x: torch.Tensor, grouped: bool = False) -> torch.Tensor:
    """A layer's input as columns (features, samples) in the column order of `weight_matrix(mod)`. A grouped conv
    (depthwise included) gives (groups, features of one group, samples) with `grouped`, and is refused without."""
    x = x.detach().float()
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 and not grouped:
            raise CraftError(f"SparseGPT prunes dense convs only; a grouped conv (groups={mod.groups}) was selected")
        conv_same, pad_same = _conv_same()
        padding = mod.padding
        if isinstance(mod, conv_same):
            x, padding = pad_same(x, mod.kernel_size, mod.stride, mod.dilation), 0
        if isinstance(padding, str):
            raise CraftError(f"SparseGPT needs explicit conv padding, got padding={padding!r}")
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
        n, _, length = cols.shape
        kk = mod.kernel_size[0] * mod.kernel_size[1]
        g, c = mod.groups, mod.in_channels // mod.groups
        cols = cols.reshape(n, g, c, kk, length).permute(1, 3, 2, 0, 4)  # per group: (C, kh*kw) -> (kh*kw, C)
        cols = cols.reshape(g, kk * c, n * length)
        return cols if grouped else cols[0]
    raise CraftError(f"SparseGPT prunes Linear and Conv2d layers, got {type(mod).__name__}")


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) for Linear; (out, kh*kw*C_in) for Conv, columns ordered (kh, kw, C_in)."""
    return weight if weight.ndim == 2 else weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def from_weight_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `weight_matrix`."""
    if like.ndim == 2:
        return matrix.reshape(like.shape)
    o, i, kh, kw = like.shape
    return matrix.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


class HessianAccumulator:
    """X X^T over every calibration batch a layer sees, normalised by the number of samples; with `grouped`, one per
    group of a grouped conv, stacked (groups, features, features)."""

    def __init__(self, mod: nn.Module, grouped: bool = False):
        self.mod, self.grouped = mod, grouped
        self.h: torch.Tensor | None = None
        self.samples = 0

    def __call__(self, mod: nn.Module, args: tuple) -> None:
        cols = layer_columns(mod, args[0], self.grouped).double()
        n = cols.shape[-1]
        xxt = cols @ cols.transpose(-1, -2)
        self.h = xxt if self.h is None else self.h + xxt
        self.samples += n

    def hessian(self) -> torch.Tensor:
        if self.h is None:
            raise CraftError("calibration never reached a layer selected for SparseGPT")
        return self.h / max(self.samples, 1)


def inverse_hessian_factor(h: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + dampening * mean(diag H) * I)^-1 (float64)."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    h += dampening * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        chol = torch.linalg.cholesky(h)
    except RuntimeError as e:  # pragma: no cover - dampening makes H positive definite
        raise CraftError(f"SparseGPT: the layer's input Hessian is not positive definite ({e}); raise dampening") from e
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


class ColumnRule:
    """What the OBS sweep sets each column to: SparseGPT zeroes the pruned weights, GPTQ rounds onto the grid."""

    def start_block(self, i1: int, w1: torch.Tensor, d1: torch.Tensor) -> None:
        """Called with each block's current weights and diag(U) before its columns are visited."""

    def target(self, j: int, i: int, w1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """The value column `j` (the block's column `i`, weights as updated so far in `w1`) is fixed to."""
        raise NotImplementedError


@torch.no_grad()
def obs_sweep(
    w: torch.Tensor, h: torch.Tensor, rule: ColumnRule, block_size: int = BLOCK_SIZE, dampening: float = DAMPENING
) -> torch.Tensor:
    """Fix the columns of the (rows, columns) matrix `w` left to right to `rule`'s targets, moving each column's error
    onto the columns not yet fixed along U[j, j:] (U: upper Cholesky factor of the damped H^-1); lazy updates across
    blocks. Returns the new weights (float64)."""
    u = inverse_hessian_factor(h, dampening)
    w = w.double().clone()
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d1 = torch.diagonal(u1)
        rule.start_block(i1, w1, d1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = rule.target(i1 + i, i, w1, d1)
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


class _PruneRule(ColumnRule):
    """SparseGPT's masks: N:M at the first column of each group of M, or an unstructured ratio per block, chosen by
    the OBS saliency w^2 / U_jj^2 with the weights as updated so far."""

    def __init__(self, shape: torch.Size, n: int | None, m: int | None, ratio: float | None):
        self.n, self.m, self.ratio = n, m, ratio
        self.pruned = torch.zeros(shape, dtype=torch.bool)

    def start_block(self, i1: int, w1: torch.Tensor, d1: torch.Tensor) -> None:
        self.i1 = i1
        if self.ratio is not None:
            saliency = w1.pow(2) / d1.pow(2)[None, :]
            k = int(round(self.ratio * saliency.numel()))
            block = torch.zeros(saliency.numel(), dtype=torch.bool)
            if k:
                block[saliency.flatten().topk(k, largest=False).indices] = True
            self.pruned[:, i1 : i1 + w1.shape[1]] = block.reshape(saliency.shape)

    def target(self, j: int, i: int, w1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        if self.n is not None and i % self.m == 0:
            saliency = w1[:, i : i + self.m].pow(2) / d1[i : i + self.m].pow(2)[None, :]
            drop = saliency.topk(self.m - self.n, dim=1, largest=False).indices
            self.pruned[:, j : j + self.m].scatter_(1, drop, True)
        col = w1[:, i]
        return torch.where(self.pruned[:, j], torch.zeros_like(col), col)


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    n: int | None = None,
    m: int | None = None,
    ratio: float | None = None,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the (rows, columns) matrix `w` to N:M (keep n of every m columns in a row) or to an unstructured `ratio`,
    with the OBS updates of the kept weights for input Hessian `h`. Returns (new weights, keep mask)."""
    if (ratio is None) == (n is None):
        raise ValueError("give either n and m or ratio")
    cols = w.shape[1]
    if n is not None and (m is None or cols % m or block_size % m):
        raise ValueError(f"columns {cols} and block size {block_size} must be multiples of M={m}")
    rule = _PruneRule(w.shape, n, m, ratio)
    new = obs_sweep(w, h, rule, block_size, dampening)
    new[rule.pruned] = 0.0
    return new, ~rule.pruned


def input_hessians(
    model: nn.Module, layers: dict[str, nn.Module], calib: CalibLoop, grouped: bool = False
) -> dict[str, torch.Tensor]:
    """X X^T / samples of every layer's unfolded inputs over the calibration set (SparseGPT's Hessian); with
    `grouped`, (groups, f, f) for every layer (1 group for Linear and dense convs)."""
    accs = {name: HessianAccumulator(mod, grouped) for name, mod in layers.items()}
    handles = [mod.register_forward_pre_hook(accs[name]) for name, mod in layers.items()]
    calibrate_with_hooks(model, calib, handles)
    hessians = {name: acc.hessian() for name, acc in accs.items()}
    return {name: h[None] if grouped and h.ndim == 2 else h for name, h in hessians.items()}
