"""Latency and accuracy measurement against any Backend."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from craft_deploy.bench.backends import Backend


def latency_stats(times_ms: list[float], batch: int) -> dict[str, float]:
    """Percentiles, mean, std, coefficient of variation and throughput of per-batch times in milliseconds."""
    a = np.asarray(times_ms, dtype=np.float64)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {
        "iters": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cv": std / mean if mean > 0 else 0.0,
        "images_per_second": batch * 1000.0 / mean if mean > 0 else 0.0,
    }


def measure_latency(
    backend: Backend, batch: np.ndarray, warmup: int, iters: int, min_seconds: float, max_iters: int = 10_000
) -> dict[str, float]:
    """Warm up, then time single runs until both `iters` runs and `min_seconds` have passed."""
    prepared = backend.prepare(batch)
    for _ in range(warmup):
        backend.run(prepared)
    backend.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < iters or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        backend.run(prepared)
        backend.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return latency_stats(times, len(batch))


def measure_accuracy(backend: Backend, ds: Dataset, batch_size: int = 32) -> dict[str, Any]:
    """Top-1/top-5 (percent) of the backend's logits on every image of `ds`."""
    c1 = c5 = n = 0
    for x, y in tqdm(
        DataLoader(ds, batch_size=batch_size),
        desc=f"accuracy ({backend.name})",
        unit="batch",
        leave=False,
        disable=None,
    ):
        logits = backend.run(backend.prepare(x.numpy()))
        top = np.argsort(-logits, axis=1)[:, :5]
        y = y.numpy()
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(axis=1).sum())
        n += len(y)
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "samples": n}
