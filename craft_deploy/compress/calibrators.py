"""Activation range calibration from streaming statistics: min-max, percentile, MSE and entropy (KL).

An observer sees every calibration batch twice at most: pass 1 keeps the running range, pass 2 a fixed 2048-bin
histogram over that range (TensorRT's bin count). Memory is two scalars and one histogram per quantizer, whatever
the number of images, so calibration never holds all activations at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from craft_deploy import CraftError

HIST_BINS = 2048
CALIB_METHODS = ("minmax", "percentile", "mse", "entropy", "ptq4vit")


def int_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed integer grid of a `bits`-bit quantizer: [-qmax, qmax] (symmetric) or [-2^(b-1), 2^(b-1) - 1]."""
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


class RangeObserver:
    """Streams a tensor's values: its range in pass 1, a histogram over that range in pass 2.

    Symmetric observers histogram |x| over [0, amax]; asymmetric ones x over [min, max] (widened to hold 0, so that
    zero stays exactly representable).
    """

    def __init__(self, symmetric: bool, bins: int = HIST_BINS):
        self.symmetric = symmetric
        self.bins = bins
        self.lo = math.inf
        self.hi = -math.inf
        self.hist: torch.Tensor | None = None
        self.zeros = 0  # exact zeros (post-ReLU), counted in pass 2

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.symmetric:
            x = x.abs()
        if self.hist is None:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
        else:
            self.hist += torch.histc(x, self.bins, self.lo, self.hi)
            self.zeros += int((x == 0).sum())

    def start_histogram(self) -> None:
        """End pass 1: fix the histogram range; later batches fill the histogram."""
        if self.symmetric:
            self.lo = 0.0
        self.lo, self.hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.hi - self.lo < 1e-12:
            self.hi = self.lo + 1e-8
        self.hist = torch.zeros(self.bins, dtype=torch.float64)

    def centers(self) -> np.ndarray:
        width = (self.hi - self.lo) / self.bins
        return self.lo + width * (np.arange(self.bins) + 0.5)


def fake_quant_np(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    """Reference fake-quant of values `x` for the range [lo, hi] (symmetric: [-hi, hi])."""
    qmin, qmax = int_grid(bits, symmetric)
    if symmetric:
        scale, zp = max(hi, 1e-12) / qmax, 0.0
    else:
        scale = max(hi - lo, 1e-12) / (qmax - qmin)
        zp = float(np.clip(qmin - np.round(lo / scale), qmin, qmax))
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


def compute_range(obs: RangeObserver, method: str, bits: int, percentile: float = 99.99) -> tuple[float, float]:
    """The calibrated range (lo, hi) of an observer; symmetric observers return (-amax, amax)."""
    if method == "minmax" or obs.hist is None:
        lo, hi = min(obs.lo, 0.0), max(obs.hi, 0.0)
    elif method == "percentile":
        lo, hi = _percentile(obs, percentile)
    elif method == "mse":
        lo, hi = _mse(obs, bits)
    elif method == "entropy":
        if not obs.symmetric:
            raise CraftError("--calib-method entropy calibrates symmetric ranges; drop --act-asymmetric or use mse")
        lo, hi = 0.0, _entropy(obs, bits)
    else:
        raise CraftError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if obs.symmetric:
        return -hi, hi
    return lo, hi


def _percentile(obs: RangeObserver, p: float) -> tuple[float, float]:
    hist = obs.hist.numpy()
    width = (obs.hi - obs.lo) / obs.bins
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    hi = obs.lo + width * (min(int(np.searchsorted(cdf, p / 100.0)), obs.bins - 1) + 1)
    if obs.symmetric:
        return 0.0, hi
    lo = obs.lo + width * int(np.searchsorted(cdf, 1 - p / 100.0))
    return min(lo, 0.0), max(hi, 0.0)


def _mse(obs: RangeObserver, bits: int, points: int = 100) -> tuple[float, float]:
    """The clipping range minimising the histogram's expected squared quantization error."""
    hist, centers = obs.hist.numpy(), obs.centers()
    best, best_err = (obs.lo, obs.hi), math.inf
    fracs = np.linspace(1.0 / points, 1.0, points)
    if obs.symmetric:
        candidates = [(0.0, obs.hi * f) for f in fracs]
    else:  # shrink each end independently (a coarser grid, both ends)
        coarse = np.linspace(0.1, 1.0, 19)
        candidates = [(obs.lo * a, obs.hi * b) for a in coarse for b in coarse]
    for lo, hi in candidates:
        err = float((hist * (centers - fake_quant_np(centers, lo, hi, bits, obs.symmetric)) ** 2).sum())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def _entropy(obs: RangeObserver, bits: int) -> float:
    """TensorRT's entropy calibration: the |x| threshold whose quantized histogram is closest in KL divergence."""
    hist = obs.hist.numpy().copy()
    # Exact zeros (most of a post-ReLU tensor) are exact at every threshold; left in, their spike in bin 0 makes
    # KL prefer the smallest threshold (merging bin 0 with its neighbours costs more than clipping the tail).
    hist[0] = max(hist[0] - obs.zeros, 0.0)
    width = obs.hi / obs.bins
    levels = 2 ** (bits - 1)
    best_i, best_kl = obs.bins, math.inf
    for i in range(levels, obs.bins + 1, max(1, (obs.bins - levels) // 512)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = (p > 0).astype(np.float64)  # as TensorRT/ONNX Runtime: the clipped bin counts as occupied
        chunk = np.arange(i) * levels // i  # which of the `levels` quantized bins each fine bin falls in
        sums = np.bincount(chunk, weights=hist[:i], minlength=levels)
        counts = np.bincount(chunk, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, sums[chunk] / np.maximum(counts[chunk], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return width * best_i


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / max(p.sum(), 1e-30)
    q = q / max(q.sum(), 1e-30)
    mask = p > 0
    q = np.where(mask & (q == 0), 1e-12, q)  # smoothed: a bin Q empties costs a large but finite divergence
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


@torch.no_grad()
def mse_weight_scale(rows: torch.Tensor, bits: int, points: int = 40) -> torch.Tensor:
    """Per-row symmetric scale of a weight viewed as rows, minimising the squared error over clip ratios 0.5..1."""
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(dim=1).clamp(min=1e-8)
    best_scale = amax / qmax
    best_err = torch.full_like(amax, math.inf)
    for frac in torch.linspace(0.5, 1.0, points):
        scale = (amax * frac / qmax)[:, None]
        err = (torch.clamp(torch.round(rows / scale), -qmax, qmax) * scale - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale
