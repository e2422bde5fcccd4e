"""The paired latency gate: a candidate and its baseline artifact timed side by side in one process, in interleaved
blocks of randomised order, judged by the ratio of their block medians with a confidence interval.

A shared runner slows down for seconds or minutes at a time; a stored baseline's absolute p50 then compares a busy
machine with a quiet one. Timed in alternating blocks a few tens of milliseconds long, both artifacts see the same
machine, and the per-block ratio cancels what they share (Chromium's Pinpoint and Google Benchmark interleave A and B
the same way). The verdict uses the Hodges-Lehmann estimate of the median log ratio with the Wilcoxon signed-rank
interval (benchstat and asv decide with a rank test too): it fails only when the whole interval lies above
log(1 + threshold), passes when it lies below, and samples more blocks, up to a cap, while it straddles the line;
still straddling at the cap, the row is undecided.
"""

from __future__ import annotations

import math
import time
from statistics import NormalDist
from typing import Any

import numpy as np

from craft_deploy.bench.backends import Backend

BLOCK_SECONDS = 0.025  # each side of a block runs this long at least: short enough to share the machine's state


def hodges_lehmann(d: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(estimate, low, high) of the centre of `d`: the median of the Walsh averages (d_i + d_j) / 2, i <= j, and the
    distribution-free interval of the Wilcoxon signed-rank test (normal approximation of its critical value)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    total = len(walsh)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    c = int(math.floor(total / 2 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24)))
    c = min(max(c, 0), (total - 1) // 2)
    return float(np.median(walsh)), float(walsh[c]), float(walsh[total - 1 - c])


def _median_ms(backend: Backend, prepared: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run(prepared)
        backend.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def paired_row(
    baseline: Backend, candidate: Backend, batch: np.ndarray, threshold: float, cfg, rng: np.random.Generator
) -> dict[str, Any]:
    """Time `baseline` and `candidate` on `batch` in interleaved blocks until the interval decides (or `cfg.max_blocks`
    blocks); returns the verdict with every block's medians, so that it can be recomputed."""
    sides = (baseline, candidate)
    prepared = [b.prepare(batch) for b in sides]
    for _ in range(max(cfg.warmup, 1)):
        for b, p in zip(sides, prepared):
            b.run(p)
            b.synchronize()
    slowest = max(_median_ms(b, p, 3) for b, p in zip(sides, prepared)) / 1000.0
    runs = int(min(max(math.ceil(BLOCK_SECONDS / max(slowest, 1e-6)), 3), 200))
    medians: list[list[float]] = [[], []]
    limit = math.log1p(threshold)
    verdict, estimate = "undecided", (0.0, -math.inf, math.inf)
    while len(medians[0]) < cfg.max_blocks:
        for side in rng.permutation(2):
            medians[side].append(_median_ms(sides[side], prepared[side], runs))
        if len(medians[0]) < cfg.min_blocks:
            continue
        estimate = hodges_lehmann(np.log(np.array(medians[1]) / np.array(medians[0])), cfg.confidence)
        if estimate[1] > limit:
            verdict = "failed"
            break
        if estimate[2] < limit:
            verdict = "passed"
            break
    est, lo, hi = (math.exp(v) for v in estimate)
    return {
        "batch": len(batch),
        "ratio": est,
        "ratio_interval": [lo, hi],
        "confidence": cfg.confidence,
        "threshold": 1.0 + threshold,
        "verdict": verdict,
        "blocks": len(medians[0]),
        "runs_per_block": runs,
        "baseline_block_ms": medians[0],
        "candidate_block_ms": medians[1],
    }


def format_paired(gate: dict[str, Any]) -> str:
    """The paired gate's table: one row per batch size, then the structure check and the verdict."""
    lines = [
        f"paired gate: {gate['candidate']} against {gate['against']} "
        f"(ratio of block medians, {100 * gate['confidence']:.0f}% interval; fails above {gate['threshold']:.2f}x)",
        f"{'batch':>5} {'base ms':>9} {'cand ms':>9} {'ratio':>7} {'interval':>17} {'blocks':>6}  verdict",
    ]
    for r in gate["rows"]:
        lo, hi = r["ratio_interval"]
        lines.append(
            f"{r['batch']:>5} {np.median(r['baseline_block_ms']):>9.3f} {np.median(r['candidate_block_ms']):>9.3f} "
            f"{r['ratio']:>6.3f}x {f'[{lo:.3f}, {hi:.3f}]':>17} {r['blocks']:>6}  {r['verdict']}"
        )
    acc = gate["accuracy"]
    if acc["baseline_top1"] is not None:
        lines.append(
            f"top-1 {acc['baseline_top1']:.2f} -> {acc['candidate_top1']:.2f} (allowed drop {acc['max_drop']:.2f} pt)"
            f": {'FAILED' if acc['failed'] else 'ok'}"
        )
    structure = gate["structure"]
    if "failures" in structure:
        lines.extend(f"structure: FAILED: {f}" for f in structure["failures"])
        if not structure["failures"]:
            lines.append("structure: ok (" + "; ".join(structure["changes"] or ["no change"]) + ")")
    else:
        lines.append(f"structure: not compared ({structure.get('skipped')})")
    lines.append(f"gate: {gate['verdict'].upper() if gate['verdict'] == 'failed' else gate['verdict']}")
    return "\n".join(lines)
