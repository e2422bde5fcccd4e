"""One-shot magnitude pruning, unstructured or N:M, with masks baked permanently into the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.compress.layers import select_layers
from craft_deploy.compress.primitives import as_input_groups, from_input_groups, nm_mask, unstructured_mask
from craft_deploy.compress.registry import CalibLoop, MethodConfig, register_method


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """Magnitude pruning: `ratio` of each layer's weights (unstructured), or N of every M along the input dim."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.n is None):
            raise CraftError("give either a sparsity ratio (e.g. 0.5) or an N:M pattern (e.g. 2:4), not both")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise CraftError(f"--sparsity ratio must be in (0, 1), e.g. 0.5, got {self.ratio}")
        if self.n is not None and (self.m is None or not 0 < self.n < self.m):
            raise CraftError(f"--sparsity N:M needs 0 < N < M, got {self.n}:{self.m}; try --sparsity 2:4")

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"unstructured {self.ratio:g}"


@register_method(PruneConfig)
@torch.no_grad()
def prune_magnitude(model: nn.Module, cfg: PruneConfig, calib: CalibLoop | None = None) -> dict[str, Any]:
    """Zero the lowest-|W| weights of every selected layer; returns the per-layer sparsity report."""
    layers, skipped = select_layers(model, cfg.include, cfg.exclude)
    report: dict[str, Any] = {"pattern": cfg.pattern, "layers": {}, "skipped": dict(skipped)}
    for name, mod in layers.items():
        w = mod.weight
        rows = as_input_groups(w)
        if cfg.n is not None and rows.shape[-1] % cfg.m:
            report["skipped"][name] = f"input dim {rows.shape[-1]} is not a multiple of M={cfg.m}"
            continue
        score = rows.abs()
        keep = nm_mask(score, cfg.n, cfg.m) if cfg.n is not None else unstructured_mask(score, cfg.ratio)
        w.copy_(from_input_groups(rows * keep, w))
        target = 1 - cfg.n / cfg.m if cfg.n is not None else cfg.ratio
        report["layers"][name] = {"target": target, "achieved": float((w == 0).float().mean()), "shape": list(w.shape)}
    if not report["layers"]:
        raise CraftError(f"no layer could be pruned with {cfg.pattern}: {report['skipped']}")
    return report


def sparsity_report(model: nn.Module, layers: dict[str, Any], n: int | None, m: int | None) -> dict[str, Any]:
    """Achieved sparsity per pruned layer, N:M validity, and the whole model's fraction of zero weights."""
    total = zeros = 0
    for p in model.parameters():
        if p.ndim > 1:
            total += p.numel()
            zeros += int((p == 0).sum())
    out: dict[str, Any] = {"model_zero_fraction": zeros / max(total, 1), "layers": {}}
    for name, info in layers.items():
        w = model.get_submodule(name).weight
        row = dict(info, achieved=float((w == 0).float().mean()))
        if n is not None:
            zero_per_group = (as_input_groups(w) == 0).reshape(-1, m).sum(1)
            row["nm_valid"] = bool((zero_per_group >= m - n).all())
        out["layers"][name] = row
    return out
