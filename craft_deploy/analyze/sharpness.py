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
) -> dict[str, Any]:
    """lambda_max of the mean training loss over a fixed set of batches, with the model in eval mode.

    Eval mode fixes BatchNorm to its running statistics, so the loss is one deterministic function of the weights.
    """
    batches = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()

    def hvp(v: Vector) -> Vector:
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
            hv = torch.autograd.grad(_dot(grads, v), params)
            total = [t + h.detach() / len(batches) for t, h in zip(total, hv)]
        return total

    result = power_iteration(hvp, [p.detach() for p in params], iters, tol, seed)
    result["batches"] = len(batches)
    result["images"] = sum(len(y) for _, y in batches)
    return result
