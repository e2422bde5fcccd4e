"""Per-layer sensitivity: the cost of one treatment (INT8, 4-bit weights, 2:4, ...) applied to one layer alone.

For every compressible layer (every Linear/Conv but the classifier head) and every treatment, a copy of the dense model
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
from craft_deploy.compress.recipe import LayerRecipe, Treatment, parse_treatment
from craft_deploy.evaluate import evaluate
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.toolkit.registry import MethodConfig, apply_method, calib_loop


def treatment_methods(
    layer: str, treatment: str, prune_method: str, placement: str = "tensorrt"
) -> tuple[MethodConfig, ...]:
    """The method configs that apply `treatment` to `layer` alone: what a recipe naming only that layer compiles to
    (compress.recipe), without the BatchNorm re-estimation (a per-layer score is the layer's own cost)."""
    recipe = LayerRecipe(layers={layer: parse_treatment(treatment)}, prune_method=prune_method, bn_recalibrate=False,
                         placement=placement)  # fmt: skip
    return recipe.compress_config().methods


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv layer but the classifier head: what quantize selects by default. The stem and depthwise convs
    are candidates too (pruning skips them by default; an N:M treatment they cannot take leaves a skipped row)."""
    return select_layers(model, skip_stem=False, skip_depthwise=False)[0]


def check_treatments(names: tuple[str, ...]) -> tuple[str, ...]:
    """The treatments by their canonical names (w8a8 -> int8, w4a16 -> w4); a CraftError for one that is not a
    treatment, float, or N:M patterns that differ (a recipe prunes all its N:M layers with one pattern)."""
    parsed = [parse_treatment(n, "--treatments") for n in names]
    if any(t == Treatment() for t in parsed):
        raise CraftError("--treatments float: every layer can stay float already; name treatments that compress")
    patterns = sorted({t.nm for t in parsed if t.nm})
    if len(patterns) > 1:
        got = ", ".join(f"{n}:{m}" for n, m in patterns)
        raise CraftError(f"--treatments takes one N:M pattern (a recipe prunes with one), got {got}")
    return tuple(dict.fromkeys(t.name for t in parsed))


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x) for x in images.split(64)])


def _score(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean KL(softmax(ref) || softmax(got)) per image and the mean squared logit difference."""
    kl = F.kl_div(F.log_softmax(got, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return {"kl": float(kl), "logit_mse": float(((ref - got) ** 2).mean())}


def sensitivity_table(
    model: nn.Module,
    calib: Dataset,
    treatments: tuple[str, ...],
    prune_method: str = "magnitude",
    done: list[dict[str, Any]] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    placement: str = "tensorrt",
) -> list[dict[str, Any]]:
    """One row per (layer, treatment) that applies: its KL and logit MSE against the dense model on `calib`; a
    treatment that does not apply to a layer (2:4 on a depthwise conv, ...) leaves a row without a score. Pairs in
    `done` (rows of an interrupted run) are kept, not scored again; `on_row` sees every new row as it is scored."""
    treatments = check_treatments(treatments)
    layers = candidate_layers(model)
    images = torch.cat([x for x, _ in DataLoader(calib, batch_size=64)])
    ref = _logits(model, images)
    have = {(r["layer"], r["treatment"]): r for r in done or []}
    rows = []
    pairs = [(name, t) for name in layers for t in treatments]
    for name, treatment in tqdm(pairs, desc="sensitivity", unit="pair", leave=False, disable=None):
        if (name, treatment) in have:
            rows.append(have[name, treatment])
            continue
        treated = copy.deepcopy(model)
        try:
            reports = [
                apply_method(treated, m, calib_loop(calib))
                for m in treatment_methods(name, treatment, prune_method, placement)
            ]
        except CraftError as e:  # e.g. a group size or pattern the layer's shape does not take
            row = {"layer": name, "treatment": treatment, "skipped": str(e)}
        else:
            row = {"layer": name, "treatment": treatment, "params": int(layers[name].weight.numel())}
            if all(r.get("layers") for r in reports):
                row.update(_score(ref, _logits(treated, images)))
            else:
                row["skipped"] = "the method leaves this layer alone"
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def validate_rows(
    model: nn.Module,
    rows: list[dict[str, Any]],
    calib: Dataset,
    test: Dataset,
    k: int,
    prune_method: str,
    seed: int,
    placement: str = "tensorrt",
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
        for m in treatment_methods(r["layer"], r["treatment"], prune_method, placement):
            apply_method(treated, m, calib_loop(calib))
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
