"""Low-rank factorisation of the linear maps over channels: Linear layers and 1x1 convs. W (out x in) becomes B A with
A (r x in) and B (out x r), run as two layers (two MatMul/Gemm or two 1x1 Conv in ONNX), so a smaller rank is faster on
every backend, CPUs included.

Initialisation is activation-aware: with s the root-mean-square of each input channel over the calibration inputs,
the SVD is of W diag(s) (truncation error measured on the inputs the layer really sees: ||(W - B A) X|| is what
matters, and for inputs whose channels are uncorrelated it is ||(W - B A) diag(s)||_F), and A is unscaled after:
A = Sigma_r^(1/2) V_r^T diag(1/s), B = U_r Sigma_r^(1/2). The square-root split keeps both factors at the same scale,
which suits later pruning and quantization of either. This is the scaling TuneComp's activation-aware initialisation
describes (its full text was not at hand; ASVD, Yuan et al. 2023, uses the same diagonal scaling); with
`activation_aware` off it is the plain truncated SVD of W.

The rank per layer is `rank_ratio` x min(in, out) (rounded up), or the smallest rank keeping `rank_energy` of the
scaled spectrum's energy, then rounded up to a multiple of `rank_multiple`: ONNX Runtime CPU runs convs in a blocked
channel layout (NCHWc, 8 channels a block on AVX2, 16 on AVX-512) and put layout reorders around the factor convs
narrower than a block (ranks 4, 6 and 10 of the default CNN at rank ratio 0.25; benchmarks/ort_op_profile.py);
rounding to 16 removed them, about 5% faster (docs/tunecomp.md). GPUs' tensor cores want multiples of 8 as well.
A layer whose factors would hold as many parameters as W (r (in + out) >= in out) is kept dense and reported: a
factorisation that does not pay is not written. On a CNN the layers after a factorised conv see
other statistics than their BatchNorms hold (one-shot rank 0.25 leaves the default CNN at chance); `bn_recalibrate`
re-estimates them on the calibration images, as after pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.toolkit.batchnorm import recalibrate_batchnorm
from craft_deploy.toolkit.flags import Flag, Token
from craft_deploy.toolkit.layers import replace_module, select_layers
from craft_deploy.toolkit.registry import (
    CalibLoop,
    Method,
    MethodConfig,
    calibrate_with_hooks,
    method_configs,
    register_method,
)

BN_RECALIBRATE = Flag(
    "bn-recalibrate",
    "Re-estimate BatchNorm statistics on calibration data after factorisation, pruning and/or quantization.",
    field="bn_recalibrate",
    kind="flag",
    tokens=(Token("bn", pattern="bn", value=lambda m, t: True, position=90, word=lambda v: "bn"),),
)
"""--bn-recalibrate, which every built-in method takes."""


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Factorise Linear layers and 1x1 convs (all but the head by default) into two layers of rank r."""

    rank_ratio: float | None = None
    rank_energy: float | None = None
    activation_aware: bool = True
    rank_multiple: int = 1  # round each rank up to a multiple of this (e.g. 16: ORT's NCHWc block on AVX-512)
    bn_recalibrate: bool = False  # re-estimate BatchNorm statistics under the factorised layers

    flags = (
        Flag(
            "rank-ratio",
            "Low-rank: factorise Linear layers and 1x1 convs into two of rank R x min(in, out), e.g. 0.25 (applied "
            "before pruning and quantization).",
            field="rank_ratio",
            kind=float,
            tokens=(
                Token(
                    "rankR (e.g. rank0.25)",
                    pattern=r"rank(0?\.\d+|1(\.0*)?)",
                    value=lambda m, t: float(m.group(1)),
                    position=0,
                    word=lambda v: f"rank{v:g}",
                    example="rank0.25",
                ),
            ),
            example="0.25",
            what="a rank",
        ),
        Flag(
            "rank-energy",
            "Low-rank: the smallest rank keeping this share of spectral energy.",
            field="rank_energy",
            kind=float,
        ),
        Flag(
            "rank-multiple",
            "Low-rank: round each rank up to a multiple of this; 16 suits ONNX Runtime CPU on AVX-512, 8 AVX2 and "
            "GPUs.",
            field="rank_multiple",
            kind=int,
        ),
        Flag(
            "activation-aware",
            "Low-rank: SVD of the weights scaled by the calibration inputs' channel RMS (else plain SVD).",
            field="activation_aware",
            kind="switch",
        ),
        BN_RECALIBRATE,
    )
    trigger = ("rank_ratio", "rank_energy")
    order = 10
    verb = "factorises"

    @classmethod
    def from_flags(cls, values: dict[str, Any], include: tuple[str, ...], exclude: tuple[str, ...]) -> LowRankConfig:
        """Factorised first; BatchNorm is re-estimated here only when no other method follows (the last one does)."""
        alone = not any(c.asked_for(values) for c in method_configs() if c is not cls)
        kw = cls.field_values(values)
        return cls(
            include=include, exclude=exclude, **{**kw, "bn_recalibrate": kw.get("bn_recalibrate", False) and alone}
        )

    def __post_init__(self) -> None:
        if (self.rank_ratio is None) == (self.rank_energy is None):
            raise CraftError("give exactly one of --rank-ratio R (0 < R < 1) and --rank-energy E (0 < E < 1)")
        if self.rank_multiple < 1:
            raise CraftError(f"--rank-multiple must be a positive integer such as 8 or 16, got {self.rank_multiple}")
        for flag, value in (("--rank-ratio", self.rank_ratio), ("--rank-energy", self.rank_energy)):
            if value is not None and not 0.0 < value < 1.0:
                raise CraftError(f"{flag} must be in (0, 1), e.g. 0.25, got {value}")


class LowRankLinear(nn.Module):
    """y = b(a(x)): a Linear (in -> r, no bias) then a Linear (r -> out, with the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class LowRankConv(nn.Module):
    """A 1x1 conv as two: a (in -> r, the original stride, no bias) then b (r -> out, the original bias)."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: tuple[int, int], bias: bool):
        super().__init__()
        self.a = nn.Conv2d(in_channels, rank, 1, stride=stride, bias=False)
        self.b = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def factorisable(mod: nn.Module) -> str | None:
    """Why `mod` cannot be factorised (None: it can)."""
    if type(mod) is nn.Linear:
        return None
    if type(mod) is nn.Conv2d:
        if mod.kernel_size != (1, 1) or mod.groups != 1 or mod.padding not in ((0, 0), 0, "valid"):
            return "not a dense 1x1 conv"
        return None
    return f"{type(mod).__name__} is not a plain Linear or Conv2d"


def weight_2d(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach().reshape(mod.weight.shape[0], -1).float()


def channel_rms(model: nn.Module, layers: dict[str, nn.Module], calib: CalibLoop) -> dict[str, torch.Tensor]:
    """Root-mean-square of every input channel of each layer over the calibration inputs."""
    sums = {name: None for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def record(mod, args):
            x = args[0].detach().float()
            x = x.transpose(1, -1) if isinstance(mod, nn.Conv2d) else x  # channels last
            x = x.reshape(-1, x.shape[-1])
            s = x.pow(2).sum(0)
            sums[name] = s if sums[name] is None else sums[name] + s
            counts[name] += x.shape[0]

        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    calibrate_with_hooks(model, calib, handles)
    return {name: (sums[name] / max(counts[name], 1)).sqrt() for name in layers if sums[name] is not None}


def choose_rank(singular: torch.Tensor, shape: tuple[int, int], cfg: LowRankConfig) -> int:
    """The rank by ratio or energy, rounded up to a multiple of `rank_multiple` (at most min(shape))."""
    if cfg.rank_ratio is not None:
        r = max(1, math.ceil(cfg.rank_ratio * min(shape)))
    else:
        energy = singular.pow(2).cumsum(0) / singular.pow(2).sum().clamp(min=1e-30)
        r = int((energy < cfg.rank_energy).sum().item()) + 1
    return min(min(shape), -(-r // cfg.rank_multiple) * cfg.rank_multiple)


def factorise(w: torch.Tensor, rms: torch.Tensor | None, rank: int | None, cfg: LowRankConfig | None = None):
    """(A, B, rank) with B A ~ w, from the SVD of w diag(rms) (plain SVD when `rms` is None); `rank` None asks `cfg`."""
    scale = None if rms is None else rms.clamp(min=rms.max() * 1e-6 + 1e-12)
    target = w if scale is None else w * scale[None, :]
    u, sv, vh = torch.linalg.svd(target.double(), full_matrices=False)
    r = rank if rank is not None else choose_rank(sv, tuple(w.shape), cfg)
    root = sv[:r].sqrt()
    a = root[:, None] * vh[:r]
    if scale is not None:
        a = a / scale.double()[None, :]
    b = u[:, :r] * root[None, :]
    return a.float(), b.float(), r


@torch.no_grad()
def factor_module(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """The two-layer replacement of `mod` holding factors `a` (r x in) and `b` (out x r) and `mod`'s bias."""
    new = _factor_module(mod, a.shape[0]).to(mod.weight.device)
    new.a.weight.copy_(a.reshape(new.a.weight.shape))
    new.b.weight.copy_(b.reshape(new.b.weight.shape))
    if mod.bias is not None:
        new.b.bias.copy_(mod.bias)
    return new


def _factor_module(mod: nn.Module, rank: int) -> nn.Module:
    bias = mod.bias is not None
    if isinstance(mod, nn.Linear):
        return LowRankLinear(mod.in_features, mod.out_features, rank, bias)
    return LowRankConv(mod.in_channels, mod.out_channels, rank, mod.stride, bias)


@torch.no_grad()
def lowrank(model: nn.Module, cfg: LowRankConfig, calib: CalibLoop | None) -> dict[str, Any]:
    candidates, skipped = select_layers(model, cfg.include, cfg.exclude, skip_stem=False, skip_depthwise=False)
    layers = {}
    for name, mod in candidates.items():
        why = factorisable(mod)
        if why:
            skipped[name] = why
        else:
            layers[name] = mod
    if not layers:
        raise CraftError("no Linear layer or dense 1x1 conv to factorise (the head is always kept)")
    if (cfg.activation_aware or cfg.bn_recalibrate) and calib is None:
        what = "activation-aware factorisation" if cfg.activation_aware else "BatchNorm re-calibration"
        raise CraftError(f"{what} needs calibration data: give --calib-samples N")
    rms = channel_rms(model, layers, calib) if cfg.activation_aware else {}
    state_layers, report_layers = {}, {}
    params_before = params_after = 0
    for name, mod in layers.items():
        w = weight_2d(mod)
        out_f, in_f = w.shape
        a, b, r = factorise(w, rms.get(name), None, cfg)
        dense = out_f * in_f
        params_before += dense
        if r * (in_f + out_f) >= dense:
            skipped[name] = f"rank {r} of {out_f}x{in_f}: two factors would not be smaller; kept dense"
            params_after += dense
            continue
        replace_module(model, name, factor_module(mod, a, b))
        params_after += r * (in_f + out_f)
        state_layers[name] = {"rank": r}
        report_layers[name] = {"rank": r, "shape": [out_f, in_f], "params_ratio": r * (in_f + out_f) / dense}
    state = {"layers": state_layers, "activation_aware": cfg.activation_aware}
    bn = {"bn_recalibrated": recalibrate_batchnorm(model, calib)} if cfg.bn_recalibrate else {}
    return {
        **bn,
        "state": state,
        "layers": report_layers,
        "skipped": skipped,
        "params_before": params_before,
        "params_after": params_after,
        "summary": f"factorised {len(state_layers)} layers to low rank: their parameters "
        f"{params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M ({len(skipped)} layers kept)",
    }


@register_method("lowrank", LowRankConfig)
class LowRank(Method):
    """Two-layer low-rank factorisation; restore rebuilds every factorised layer at its recorded rank."""

    def apply(self, model: nn.Module, cfg: LowRankConfig, calib: CalibLoop | None) -> dict[str, Any]:
        return lowrank(model, cfg, calib)

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        layers = state.get("layers")
        if not isinstance(layers, dict):
            raise CraftError("lowrank state: 'layers' must map layer names to {rank}")
        for name, spec in layers.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise CraftError(f"lowrank state names a layer the model does not have: {name!r}") from None
            why = factorisable(mod)
            rank = spec.get("rank") if isinstance(spec, dict) else None
            if why or isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight_2d(mod).shape):
                raise CraftError(f"lowrank state for {name!r} does not fit the model ({why or f'rank {rank!r}'})")
            replace_module(model, name, _factor_module(mod, rank))
