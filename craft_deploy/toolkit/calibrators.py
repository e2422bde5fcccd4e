"""Activation range calibration from streaming statistics: registered calibrators (min-max, percentile, MSE,
entropy (KL), PTQ4ViT; a third-party module can add its own with `@register_calibrator`).

An observer sees every calibration batch twice at most: pass 1 keeps the running range, pass 2 a fixed 2048-bin
histogram over that range (TensorRT's bin count). Memory is two scalars and one histogram per quantizer, whatever
the number of images, so calibration never holds all activations at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from craft_deploy import CraftError
from craft_deploy.toolkit.qparams import (
    FP8_E4M3_MAX,
    fake_quant_fp8,
    fake_quant_fp8_range_np,
    fake_quant_range_np,
    fake_quant_symmetric,
    qmax_for,
)
from craft_deploy.toolkit.registry import load_builtins, name_registrar

HIST_BINS = 2048


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


class Calibrator:
    """Turns what a RangeObserver saw into an activation range; one registered subclass per `--calib-method`.

    Subclass it and decorate with `@register_calibrator("name")`: the name is then accepted by `--calib-method` and
    listed in its help. `range` gets an observer whose pass 1 (running min/max) is done and, when `histogram` is true,
    whose pass 2 (a histogram over that range) is done too; it returns (lo, hi), or (0, amax) for symmetric observers.
    """

    name: str = ""
    histogram: bool = True  # needs pass 2 over the calibration data
    symmetric_only: bool = False  # refuses --act-asymmetric and --placement ort-cpu
    twin_quantizers: bool = False  # twin-uniform quantizers (compress.ptq4vit): simulation only, no Q/DQ export
    weight_method: str = "mse"  # weight scales to pair it with unless --weight-calib says otherwise
    fp8: bool = False  # calibrates E4M3 ranges too (--quant fp8)

    def __init__(self, percentile: float = 99.99):
        self.percentile = percentile

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        raise NotImplementedError

    def range_fp8(self, obs: RangeObserver) -> tuple[float, float]:
        """The range for an E4M3 quantizer; a calibrator whose range does not depend on the grid reuses `range`."""
        return self.range(obs, 8)

    def compute(self, obs: RangeObserver, bits: int, number_format: str = "int") -> tuple[float, float]:
        """The calibrated range of an observer; symmetric observers return (-amax, amax)."""
        if obs.hist is None and self.histogram:
            raise CraftError(f"calibrator {self.name!r} needs the histogram pass, which did not run")
        lo, hi = self.range_fp8(obs) if number_format == "fp8" else self.range(obs, bits)
        return (-hi, hi) if obs.symmetric else (lo, hi)

    def refine(self, model, calib, cfg) -> list[str]:
        """A model-level step after every range is set (compress.ptq4vit's search); returns notes for the report."""
        return []


CALIBRATORS: dict[str, type[Calibrator]] = {}
register_calibrator = name_registrar(CALIBRATORS)
"""Class decorator adding a Calibrator subclass to CALIBRATORS under a `--calib-method` name."""


def calibrator(name: str, percentile: float = 99.99) -> Calibrator:
    """An instance of the calibrator registered as `name`, or a CraftError naming the registered ones."""
    if name not in CALIBRATORS:
        load_builtins()
    if name not in CALIBRATORS:
        raise CraftError(f"--calib-method {name!r} is unknown; choose one of {', '.join(CALIBRATORS)}")
    return CALIBRATORS[name](percentile)


def compute_range(obs: RangeObserver, method: str, bits: int, percentile: float = 99.99) -> tuple[float, float]:
    """The range calibrator `method` computes from `obs`."""
    return calibrator(method, percentile).compute(obs, bits)


@register_calibrator("minmax")
class MinMax(Calibrator):
    """The observed range, widened to hold 0."""

    histogram = False
    weight_method = "minmax"
    fp8 = True

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        return min(obs.lo, 0.0), max(obs.hi, 0.0)


@register_calibrator("percentile")
class Percentile(Calibrator):
    """The `--percentile` of |x| (or of x at both ends, asymmetric)."""

    fp8 = True

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        return _percentile(obs, self.percentile)


@register_calibrator("mse")
class MSE(Calibrator):
    """The clipping range that minimises the histogram's expected squared quantization error."""

    fp8 = True

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        return _mse(obs, bits)

    def range_fp8(self, obs: RangeObserver) -> tuple[float, float]:
        return _mse(obs, 8, number_format="fp8")


@register_calibrator("entropy")
class Entropy(Calibrator):
    """TensorRT's entropy calibration: the |x| threshold whose quantized histogram is closest in KL divergence."""

    symmetric_only = True

    def range(self, obs: RangeObserver, bits: int) -> tuple[float, float]:
        return 0.0, _entropy(obs, bits)


def _percentile(obs: RangeObserver, p: float) -> tuple[float, float]:
    hist = obs.hist.numpy()
    width = (obs.hi - obs.lo) / obs.bins
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    hi = obs.lo + width * (min(int(np.searchsorted(cdf, p / 100.0)), obs.bins - 1) + 1)
    if obs.symmetric:
        return 0.0, hi
    lo = obs.lo + width * int(np.searchsorted(cdf, 1 - p / 100.0))
    return min(lo, 0.0), max(hi, 0.0)


def _mse(obs: RangeObserver, bits: int, points: int = 100, number_format: str = "int") -> tuple[float, float]:
    """The clipping range minimising the histogram's expected squared quantization error (E4M3 ranges are
    symmetric: only the amax is searched)."""
    hist, centers = obs.hist.numpy(), obs.centers()
    best, best_err = (obs.lo, obs.hi), math.inf
    fracs = np.linspace(1.0 / points, 1.0, points)
    if obs.symmetric:
        candidates = [(0.0, obs.hi * f) for f in fracs]
    else:  # shrink each end independently (a coarser grid, both ends)
        coarse = np.linspace(0.1, 1.0, 19)
        candidates = [(obs.lo * a, obs.hi * b) for a in coarse for b in coarse]
    if number_format == "fp8":
        amax = max(abs(obs.lo), abs(obs.hi))
        candidates = [(-amax * f, amax * f) for f in fracs]
    for lo, hi in candidates:
        if number_format == "fp8":
            fq = fake_quant_fp8_range_np(centers, hi)
        else:
            fq = fake_quant_range_np(centers, lo, hi, bits, obs.symmetric)
        err = float((hist * (centers - fq) ** 2).sum())
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
def mse_weight_scale(rows: torch.Tensor, bits: int, points: int = 40, number_format: str = "int") -> torch.Tensor:
    """Per-row symmetric scale of a weight viewed as rows, minimising the squared error over clip ratios 0.5..1."""
    fp8 = number_format == "fp8"
    qmax = FP8_E4M3_MAX if fp8 else qmax_for(bits)
    amax = rows.abs().amax(dim=1).clamp(min=1e-8)
    best_scale = amax / qmax
    best_err = torch.full_like(amax, math.inf)
    for frac in torch.linspace(0.5, 1.0, points):
        scale = (amax * frac / qmax)[:, None]
        fq = fake_quant_fp8(rows, scale[:, 0], 0) if fp8 else fake_quant_symmetric(rows, scale, bits)
        err = (fq - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale
