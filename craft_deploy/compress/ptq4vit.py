"""PTQ4ViT's Hessian-guided scale search (Yuan et al., ECCV 2022), on quantizers already attached and min-max
initialised.

For every quantized op (Linear/Conv layer or attention matmul) the search picks, one quantizer at a time and
alternating over `search_rounds` rounds, the scale that minimises the op's output error weighted by the squared
gradient of the task loss with respect to that output: sum(g^2 * (O_hat - O)^2), a diagonal-Fisher approximation
of the loss change. Gradients come from the full-precision model with its own predictions as labels. Candidates:
uniform scales at `search_points` fractions (0.1..1.0 of the min-max scale); for twin-uniform post-softmax
quantizers the exponent m of delta1 = delta2 / 2^m; for post-GELU ones delta2, with delta1 the finest power-of-two
fraction that still covers the negative range. Inputs, outputs and gradients are kept for the first 32 calibration
images only (the paper's calibration set size), so memory stays bounded on large ViTs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from craft_deploy.toolkit.attention import QuantMatMul
from craft_deploy.toolkit.calibrators import Calibrator, RangeObserver, register_calibrator
from craft_deploy.toolkit.qmodules import (
    ActQuantizer,
    TwinActQuantizer,
    WeightQuantizer,
    activation_quantizers,
    quantized_layers,
)
from craft_deploy.toolkit.registry import CalibLoop

SEARCH_IMAGES = 32


def _all_quantizers(model: nn.Module) -> list[nn.Module]:
    weights = [m.parametrizations.weight[0] for m in quantized_layers(model).values()]
    return weights + list(activation_quantizers(model).values())


def _set_enabled(quantizers: list[nn.Module], on: bool) -> None:
    for q in quantizers:
        q.enabled = on


class _GradCapture(nn.Module):
    """Runs the wrapped model with gradients and back-propagates the loss against its own predictions."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.seen = model, limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seen >= self.limit:
            return torch.empty(0)
        x = x[: self.limit - self.seen]
        self.seen += len(x)
        with torch.enable_grad():
            logits = self.model(x)
            F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum").backward()
        return logits.detach()


def _capture(model: nn.Module, ops: dict[str, nn.Module], calib: CalibLoop) -> dict[str, dict[str, list]]:
    store: dict[str, dict[str, list]] = {n: {"args": [], "out": [], "g2": []} for n in ops}
    handles = []

    def make_hook(name: str):
        def hook(mod, args, out):
            store[name]["args"].append(tuple(a.detach() for a in args))
            store[name]["out"].append(out.detach())
            out.register_hook(lambda g: store[name]["g2"].append(g.detach().pow(2)))

        return hook

    for name, mod in ops.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        calib(_GradCapture(model, SEARCH_IMAGES))
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None
    return store


def _candidates(q: nn.Module, points: int) -> list[Callable[[], None]]:
    """Setters, one per candidate scale of quantizer `q`; the starting scale is among them."""
    fracs = np.linspace(1.0, 0.1, points)
    if isinstance(q, WeightQuantizer):
        base = q.scale.clone()
        return [lambda f=f: q.scale.copy_(base * float(f)) for f in fracs]
    if isinstance(q, ActQuantizer):
        lo, hi = q.range()
        return [lambda f=f: q.set_range(lo * float(f), hi * float(f)) for f in fracs]
    if isinstance(q, TwinActQuantizer):
        levels = 2 ** (q.bits - 1)
        if q.mode == "softmax":
            return [lambda m=m: q.set_deltas(1.0 / levels, m) for m in range(0, 2 * q.bits + 1)]
        d2 = float(q.delta2)
        lo = -float(q.delta1) * levels
        return [lambda f=f: q.set_deltas(d2 * float(f), q.gelu_m(d2 * float(f), lo)) for f in fracs]
    raise TypeError(type(q).__name__)


@torch.no_grad()
def _op_error(mod: nn.Module, data: dict[str, list]) -> float:
    total = 0.0
    for args, out, g2 in zip(data["args"], data["out"], data["g2"]):
        total += float((g2 * (mod(*args) - out).pow(2)).sum())
    return total


def hessian_guided_search(model: nn.Module, calib: CalibLoop, cfg: Any) -> dict[str, dict[str, float]]:
    """Search every op's quantizer scales in place; returns each op's weighted error before and after."""
    quantizers = _all_quantizers(model)
    ops: dict[str, nn.Module] = dict(quantized_layers(model))
    ops.update({n: m for n, m in model.named_modules() if isinstance(m, QuantMatMul)})
    _set_enabled(quantizers, False)
    try:
        model.eval()
        data = _capture(model, ops, calib)
        report: dict[str, dict[str, float]] = {}
        for name, mod in tqdm(ops.items(), desc="ptq4vit search", unit="op", leave=False, disable=None):
            if not data[name]["g2"]:
                continue
            own = _op_quantizers(mod)
            _set_enabled(own, True)
            before = best = _op_error(mod, data[name])
            cands = {id(q): _candidates(q, cfg.search_points) for q in own}
            for _ in range(cfg.search_rounds):
                for q in own:
                    errs = []
                    for setter in cands[id(q)]:
                        setter()
                        errs.append(_op_error(mod, data[name]))
                    i = int(np.argmin(errs))
                    cands[id(q)][i]()
                    best = errs[i]
            _set_enabled(own, False)
            report[name] = {"error_minmax": before, "error_searched": best}
            data[name] = {"args": [], "out": [], "g2": []}  # free as we go
        return report
    finally:
        _set_enabled(quantizers, True)


def _op_quantizers(mod: nn.Module) -> list[nn.Module]:
    if isinstance(mod, QuantMatMul):
        return [mod.a_quantizer, mod.b_quantizer]
    found = [mod.parametrizations.weight[0]]
    if hasattr(mod, "input_quantizer"):
        found.append(mod.input_quantizer)
    return found


@register_calibrator("ptq4vit")
class PTQ4ViT(Calibrator):
    """PTQ4ViT: min-max ranges, twin-uniform softmax/GELU quantizers, then the Hessian-guided scale search."""

    histogram = False
    symmetric_only = True
    twin_quantizers = True

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        return min(obs.lo, 0.0), max(obs.hi, 0.0)

    def refine(self, model, calib, cfg) -> list[str]:
        return [f"hessian-guided search over {len(hessian_guided_search(model, calib, cfg))} ops"]
