"""lambda_max: the largest eigenvalue of the loss Hessian, by power iteration on Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

Vector = list[torch.Tensor]


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: Vector) -> Vector:
    norm = torch.sqrt(_dot(v, v))
    return [x / (norm + 1e-30) for x in v]


def power_iteration(
    hvp: Callable[[Vector], Vector], like: Vector, iters: int = 20, tol: float = 1e-3, seed: int = 0
) -> dict[str, Any]:
    """Dominant eigenvalue of the symmetric operator `hvp` on vectors shaped like `like`.

    Stops when the Rayleigh quotient changes by less than `tol` (relative) or after `iters` iterations; returns the
    estimate, the iterations used, whether it converged, and the estimate after each iteration.
    """
    gen = torch.Generator().manual_seed(seed)
    v = _normalize([torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in like])
    trace: list[float] = []
    eig = 0.0
    for i in range(1, iters + 1):
        hv = hvp(v)
        eig = float(_dot(hv, v))
        trace.append(eig)
        v = _normalize([x.detach() for x in hv])
        if i > 1 and abs(trace[-1] - trace[-2]) <= tol * abs(trace[-1]):
            return {"lambda_max": eig, "iterations": i, "converged": True, "trace": trace}
    return {"lambda_max": eig, "iterations": iters, "converged": False, "trace": trace}


def lambda_max(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    batchnorm: str = "eval",
) -> dict[str, Any]:
    """lambda_max of the mean training loss over a fixed set of batches; dropout and drop-path are off.

    `batchnorm="eval"` fixes BatchNorm to its running statistics (the deployed function of the weights);
    `batchnorm="batch"` normalises each batch by its own statistics, as the loss SAM and Adam actually descend does
    (running statistics are left untouched). Both are deterministic for fixed batches; they can differ a lot, since
    batch statistics make the loss invariant to the scale of the weights in front of each BatchNorm.
    """
    if batchnorm not in ("eval", "batch"):
        raise ValueError(f"batchnorm must be 'eval' or 'batch', got {batchnorm!r}")
    batches = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batchnorm == "batch" else []
    saved = [m.momentum for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0  # running stats stay as they are

    def hvp(v: Vector) -> Vector:
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
            hv = torch.autograd.grad(_dot(grads, v), params)
            total = [t + h.detach() / len(batches) for t, h in zip(total, hv)]
        return total

    try:
        result = power_iteration(hvp, [p.detach() for p in params], iters, tol, seed)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
            m.eval()
    result["batches"] = len(batches)
    result["images"] = sum(len(y) for _, y in batches)
    result["batchnorm"] = batchnorm
    return result
