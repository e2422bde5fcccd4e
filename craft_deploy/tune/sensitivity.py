"""Per-layer sensitivity: the cost of one treatment (INT8, 4-bit weights, 2:4, ...) applied to one layer alone.

For every compressible layer (the layers `compress` selects by default) and every treatment, a copy of the dense model
gets the treatment on that layer only (the registered compression method with `include=(layer,)`, calibrated on the
calibration images), and its logits on those images are compared with the dense model's: the mean KL divergence
KL(dense || treated) of the softmax outputs, and the mean squared logit error. A sample of (layer, treatment) pairs
(the highest scores and a few drawn at random) is then checked on held-out test images: top-1 drop against the dense
model, and how well the KL score ranks those drops (Spearman's rho).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.compress.prune import PruneConfig
from craft_deploy.compress.quant import QuantConfig
from craft_deploy.evaluate import evaluate
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.toolkit.registry import MethodConfig, apply_method, calib_loop


def _int8(layer: str, prune_method: str) -> MethodConfig:
    return QuantConfig(w_bits=8, a_bits=8, calib_method="mse", include=(layer,))


def _w4(layer: str, prune_method: str) -> MethodConfig:
    return QuantConfig(w_bits=4, a_bits=16, include=(layer,))


def _nm24(layer: str, prune_method: str) -> MethodConfig:
    return PruneConfig(n=2, m=4, score=prune_method, include=(layer,))


TREATMENTS: dict[str, Callable[[str, str], MethodConfig]] = {"int8": _int8, "w4": _w4, "2:4": _nm24}
"""Treatment name -> the method config that applies it to one layer (layer name, the 2:4 treatment's score)."""


def check_treatments(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in TREATMENTS]
    if unknown:
        raise CraftError(f"--treatments {','.join(unknown)} is unknown; choose from {', '.join(TREATMENTS)}")


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x) for x in images.split(64)])


def _score(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean KL(softmax(ref) || softmax(got)) per image and the mean squared logit difference."""
    kl = F.kl_div(F.log_softmax(got, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return {"kl": float(kl), "logit_mse": float(((ref - got) ** 2).mean())}


def sensitivity_table(
    model: nn.Module, calib: Dataset, treatments: tuple[str, ...], prune_method: str = "magnitude"
) -> list[dict[str, Any]]:
    """One row per (layer, treatment) that applies: its KL and logit MSE against the dense model on `calib`. A
    treatment that does not apply to a layer (2:4 on a depthwise conv, ...) leaves no row."""
    check_treatments(treatments)
    layers, _ = select_layers(model)
    images = torch.cat([x for x, _ in DataLoader(calib, batch_size=64)])
    ref = _logits(model, images)
    rows = []
    pairs = [(name, t) for name in layers for t in treatments]
    for name, treatment in tqdm(pairs, desc="sensitivity", unit="pair", leave=False, disable=None):
        treated = copy.deepcopy(model)
        try:
            report = apply_method(treated, TREATMENTS[treatment](name, prune_method), calib_loop(calib))
        except CraftError as e:  # e.g. a group size or pattern the layer's shape does not take
            rows.append({"layer": name, "treatment": treatment, "skipped": str(e)})
            continue
        if not report.get("layers"):
            continue  # the method left this layer alone (not eligible)
        mod = layers[name]
        rows.append({
            "layer": name, "treatment": treatment, "params": int(mod.weight.numel()),
            **_score(ref, _logits(treated, images)),
        })  # fmt: skip
    return rows


def validate_rows(
    model: nn.Module, rows: list[dict[str, Any]], calib: Dataset, test: Dataset, k: int, prune_method: str, seed: int
) -> dict[str, Any]:
    """Top-1 drop on `test` for k scored rows (about two thirds the highest KL, the rest at random), recorded on the
    rows; returns the dense top-1 and Spearman's rho between KL and the measured drops."""
    scored = [r for r in rows if "kl" in r]
    if not scored or k == 0:
        return {"pairs": 0}
    top = sorted(scored, key=lambda r: -r["kl"])[: max(1, (2 * k) // 3)]
    rest = [r for r in scored if r not in top]
    picked = top + random.Random(seed).sample(rest, min(len(rest), k - len(top)))
    dense = evaluate(model, test, desc="test (dense)")["top1"]
    for r in tqdm(picked, desc="validate", unit="pair", leave=False, disable=None):
        treated = copy.deepcopy(model)
        apply_method(treated, TREATMENTS[r["treatment"]](r["layer"], prune_method), calib_loop(calib))
        r["test_top1_drop"] = dense - evaluate(treated, test, desc="test (treated)")["top1"]
    return {"pairs": len(picked), "dense_test_top1": dense, "spearman_kl_vs_drop": spearman(
        [r["kl"] for r in picked], [r["test_top1_drop"] for r in picked])}  # fmt: skip


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than three pairs or a constant side."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)
