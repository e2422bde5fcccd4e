"""`--budget-minutes`: trim a study's remaining cells to fit, in a stated order, with costs measured as it runs.

A cell's cost is estimated from the cells of the same kind this study has already finished (median seconds; a
compression with a Hessian solver, SparseGPT or GPTQ, is its own kind); a kind with none finished yet uses its prior
below, scaled by how much faster or slower than the priors the finished cells ran. The priors are seconds on the
offline default (tf_efficientnet_lite0 at 64 px, 2 epochs of 6000 images, 2000 test images) on a 2-vCPU EPYC. With
`--jobs N`, N cell-seconds are spent per second of the budget.

When the estimate of what is left exceeds what is left of the budget, cells are dropped in this order until it fits:

1. deployments of every seed but the first (latency is a property of the recipe, and the PyTorch accuracy of
   every seed is still measured by its compress cell);
2. TuneComp cells, last seed first;
3. recovery cells, last seed first;
4. compression recipes, from the end of the grid backwards, every fine-tuning's cell of a recipe together (so that
   what is left is still a paired comparison), together with their deployments;
5. diagnostics (lambda_max), last seed first.

Fine-tunings, the first grid recipe and the FP32 deployments of the first seed are never dropped, nor the round-robin
timing of what was deployed (phase 5: about `speed_rounds` x recipes x batch sizes x `bench_seconds`). A trimmed cell is
listed in study.json with the reason; a later run with a larger budget runs it.
"""

from __future__ import annotations

import statistics
from typing import Any

PRIOR_SECONDS = {  # medians of the default study's cells (docs/study.md), one thread per cell, two cells at a time
    "finetune": 100.0,
    "analyze": 12.0,
    "compress": 12.0,
    "compress-solver": 28.0,
    "recover": 80.0,
    "tunecomp": 135.0,
    "deploy": 6.0,
}


def cost_key(spec: dict[str, Any]) -> str:
    return "compress-solver" if spec["kind"] == "compress" and spec.get("solver") else spec["kind"]


def estimator(finished: list[dict[str, Any]]):
    """A function spec -> estimated seconds, from the finished cells' measured times."""
    by_key: dict[str, list[float]] = {}
    for rec in finished:
        if rec.get("status") == "ok" and not rec.get("metrics", {}).get("reused"):
            by_key.setdefault(cost_key(rec["spec"]), []).append(float(rec["seconds"]))
    measured = {k: statistics.median(v) for k, v in by_key.items()}
    ratios = [measured[k] / PRIOR_SECONDS[k] for k in measured if k in PRIOR_SECONDS]
    speed = statistics.median(ratios) if ratios else 1.0

    def estimate(spec: dict[str, Any]) -> float:
        key = cost_key(spec)
        return measured.get(key, PRIOR_SECONDS.get(key, 60.0) * speed)

    return estimate


def _drop_order(pending: list[dict[str, Any]], first_seed: int, grid: list[str]) -> list[list[dict[str, Any]]]:
    """Groups of cells in the order they are given up (each group goes as a whole)."""
    groups: list[list[dict[str, Any]]] = []
    later = sorted({s["seed"] for s in pending if s["seed"] != first_seed}, reverse=True)
    groups += [[s for s in pending if s["kind"] == "deploy" and s["seed"] == seed] for seed in later]
    for kind in ("tunecomp", "recover"):
        for seed in sorted({s["seed"] for s in pending}, reverse=True):
            groups.append([s for s in pending if s["kind"] == kind and s["seed"] == seed])
    for name in reversed(grid[1:]):
        groups.append([s for s in pending if s.get("recipe") == name and s["kind"] in ("compress", "deploy")])
    for seed in sorted({s["seed"] for s in pending}, reverse=True):
        groups.append([s for s in pending if s["kind"] == "analyze" and s["seed"] == seed])
    return [g for g in groups if g]


def trim(
    pending: list[dict[str, Any]],
    finished: list[dict[str, Any]],
    seconds_left: float,
    first_seed: int,
    grid: list[str],
    future_seconds: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Split `pending` into (kept, dropped) so that the estimate of the kept cells plus `future_seconds` (cells of
    later phases, estimated the same way) fits `seconds_left`; returns the kept cells' estimate too."""
    estimate = estimator(finished)
    total = sum(estimate(s) for s in pending) + future_seconds
    dropped: list[dict[str, Any]] = []
    for group in _drop_order(pending, first_seed, grid):
        if total <= seconds_left:
            break
        total -= sum(estimate(s) for s in group)
        dropped += group
    gone = {s["id"] for s in dropped}
    return [s for s in pending if s["id"] not in gone], dropped, total
