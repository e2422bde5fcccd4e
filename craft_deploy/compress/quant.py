"""Post-training quantization: WxAy uniform fake-quant with min-max, percentile, MSE, entropy or PTQ4ViT calibration.

Weights are symmetric per output channel (default), per tensor or per group; layer inputs per tensor, static,
symmetric by default. With `quant_attention` a ViT's attention matmuls get input quantizers too. `placement` ort-cpu
adds the quantizers ONNX Runtime's CPU integer kernels need (residual adds, pooling; asymmetric ranges).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from craft_deploy import CraftError
from craft_deploy.compress import ptq4vit  # noqa: F401  (registers the ptq4vit calibrator)
from craft_deploy.compress.lowrank import BN_RECALIBRATE
from craft_deploy.config import parse_quant
from craft_deploy.toolkit.attach import attach_quantizers
from craft_deploy.toolkit.attention import attention_modules
from craft_deploy.toolkit.batchnorm import batchnorms, recalibrate_batchnorm
from craft_deploy.toolkit.bias_bound import batchnorm_after, fit_biases_to_int32
from craft_deploy.toolkit.calibrators import CALIBRATORS, Calibrator, RangeObserver, calibrator
from craft_deploy.toolkit.flags import Flag, Token
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.toolkit.placement import placement_named
from craft_deploy.toolkit.qmodules import ActQuantizer, activation_quantizers, quantized_layers
from craft_deploy.toolkit.qparams import NUMBER_FORMATS
from craft_deploy.toolkit.registry import CalibLoop, Method, MethodConfig, register_method
from craft_deploy.toolkit.spec import LayerQuantSpec, MatMulQuantSpec, TensorQuantSpec, quant_specs

WEIGHT_GRANULARITIES = ("channel", "tensor", "group")
WeightRounding = Callable[[nn.Module, CalibLoop], None]
WEIGHT_ROUNDINGS: dict[str, WeightRounding | None] = {"nearest": None}
"""`--weight-rounding` choices: a function that re-rounds every quantized layer's weights on calibration data (after
their scales are set), or None for nearest rounding. `register_weight_rounding` adds one (GPTQ is registered below)."""


def register_weight_rounding(name: str) -> Callable[[WeightRounding], WeightRounding]:
    """Function decorator adding a weight rounding to WEIGHT_ROUNDINGS under `name`."""

    def deco(fn: WeightRounding) -> WeightRounding:
        if WEIGHT_ROUNDINGS.get(name, fn) is not fn:
            raise ValueError(f"weight rounding {name!r} is registered twice")
        WEIGHT_ROUNDINGS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """WxAy uniform PTQ; `a_bits` 16 leaves activations in float (weight-only)."""

    w_bits: int = 8
    a_bits: int = 8
    calib_method: str = "minmax"
    percentile: float = 99.99
    weight_calib: str | None = None
    w_granularity: str = "channel"
    group_size: int = 0
    act_asymmetric: bool = False
    quant_attention: bool = False
    search_points: int = 24
    search_rounds: int = 2
    bn_recalibrate: bool = False
    placement: str = "tensorrt"
    weight_rounding: str = "nearest"
    number_format: str = "int"  # fp8: E4M3 weights and activations (--quant fp8)
    layer_quant: tuple[str, ...] = ()  # per-layer bit widths "LAYER=wXaY" over the base w_bits/a_bits (tune recipes)

    flags = (
        Flag(
            "quant",
            "Post-training quantization wXaY: w8a8, w6a6, w6a16, w4a16 (a16 = float activations); or fp8 (E4M3 "
            "weights and activations, for TensorRT on Hopper/Ada).",
            tokens=(Token("wXaY or fp8", pattern=r"w\d+a\d+|fp8", value=lambda m, t: _checked_quant(t), position=20),),
            example="w8a8",
            what="quantizing",
        ),
        Flag(
            "calib-method",
            "Activation ranges: min-max, a percentile of |x|, the MSE-optimal clip, TensorRT's entropy (KL) threshold, "
            "PTQ4ViT (twin-uniform softmax/GELU quantizers, Hessian-guided scale search; ViTs, else mse), or a "
            "plugin's.",
            field="calib_method",
            choices="craft_deploy.toolkit.calibrators:CALIBRATORS",
            needs="quant",
            tokens=(
                Token("a calibrator ({names})", registry="craft_deploy.toolkit.calibrators:CALIBRATORS", position=21),
            ),
        ),
        Flag("percentile", "For --calib-method percentile.", field="percentile", kind=float, needs="quant"),
        Flag(
            "weight-calib",
            "Weight scales: min-max, or the MSE-optimal clip per channel/group. [default: minmax for --calib-method "
            "minmax, else mse]",
            field="weight_calib",
            choices=("minmax", "mse"),
            needs="quant",
        ),
        Flag(
            "weight-granularity",
            "One weight scale per output channel or per tensor.",
            field="w_granularity",
            choices=("channel", "tensor"),
            needs="quant",
            tokens=(Token("tensor", pattern="tensor", position=22),),
        ),
        Flag(
            "weight-rounding",
            "Weights to the nearest grid point, or GPTQ (each column's rounding error moved onto the columns not yet "
            "rounded, from the layer's input Hessian on the calibration images; keeps pruned zeros).",
            field="weight_rounding",
            choices="craft_deploy.compress.quant:WEIGHT_ROUNDINGS",
            needs="quant",
            tokens=(Token("gptq", pattern="gptq", position=23),),
        ),
        Flag(
            "group-size", "Weight-only (wXa16): one scale per this many weights of a channel.", kind=int, needs="quant"
        ),
        Flag(
            "act-asymmetric",
            "Asymmetric activation ranges (zero point), e.g. post-ReLU.",
            field="act_asymmetric",
            kind="flag",
            needs="quant",
        ),
        Flag(
            "quant-attention",
            "ViTs: also quantize the Q K^T and softmax x V matmul inputs.",
            field="quant_attention",
            kind="flag",
            needs="quant",
        ),
        Flag(
            "placement",
            "Where activation quantizers go: tensorrt = inputs of Conv/Linear only (TensorRT fuses the rest); ort-cpu "
            "= also residual adds and pooling, asymmetric (ONNX Runtime's CPU integer kernels; export with --target "
            "ort-cpu).",
            field="placement",
            choices="craft_deploy.toolkit.placement:PLACEMENTS",
            needs="quant",
            tokens=(Token("ort-cpu", pattern="ort-cpu", position=24),),
        ),
        BN_RECALIBRATE,
    )
    trigger = ("quant",)
    order = 30
    verb = "quantizes"

    @classmethod
    def from_flags(cls, values: dict[str, Any], include: tuple[str, ...], exclude: tuple[str, ...]) -> QuantConfig:
        """`--quant w8a8` sets the bits (`fp8` the number format too); `--group-size` sets group granularity."""
        fp8 = str(values["quant"]).strip().lower() == "fp8"
        w_bits, a_bits = (8, 8) if fp8 else parse_quant(values["quant"])
        kw = cls.field_values(values)
        group_size = values.get("group_size")
        if group_size and kw.get("w_granularity", "channel") not in ("channel", "group"):
            raise CraftError(f"--group-size sets group granularity; drop --weight-granularity {kw['w_granularity']}")
        if group_size:
            kw["w_granularity"] = "group"
        return cls(include=include, exclude=exclude, w_bits=w_bits, a_bits=a_bits, group_size=group_size or 0,
                   number_format="fp8" if fp8 else "int", **kw)  # fmt: skip

    def __post_init__(self) -> None:
        if self.number_format not in NUMBER_FORMATS:
            raise CraftError(f"number format must be one of {', '.join(NUMBER_FORMATS)}, got {self.number_format!r}")
        if self.number_format == "fp8":
            self._check_fp8()
        if not 2 <= self.w_bits <= 8:
            raise CraftError(f"weight bits must be 2..8, got {self.w_bits}")
        if not (2 <= self.a_bits <= 8 or self.a_bits == 16):
            raise CraftError(f"activation bits must be 2..8 or 16 (float), got {self.a_bits}")
        cal = calibrator(self.calib_method)  # validates the name against the registry
        if not 50.0 < self.percentile <= 100.0:
            raise CraftError(f"--percentile must be in (50, 100], e.g. 99.99, got {self.percentile}")
        if self.weight_calib not in (None, "minmax", "mse"):
            raise CraftError(f"--weight-calib must be minmax or mse, got {self.weight_calib!r}")
        if self.w_granularity not in WEIGHT_GRANULARITIES:
            raise CraftError(
                f"--weight-granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, got {self.w_granularity!r}"
            )
        if (self.w_granularity == "group") != (self.group_size > 0):
            raise CraftError(f"--group-size {self.group_size} goes with weight granularity 'group' and vice versa")
        if self.group_size and self.a_bits != 16:
            raise CraftError(
                f"--group-size is for weight-only quantization (wXa16), got {self.name}; drop it or use e.g. w4a16"
            )
        if self.group_size < 0 or self.group_size == 1:
            raise CraftError(f"--group-size must be >= 2 (e.g. 64 or 128), got {self.group_size}")
        if cal.symmetric_only and self.act_asymmetric:
            raise CraftError(
                f"--calib-method {self.calib_method} calibrates symmetric ranges; drop --act-asymmetric or use mse"
            )
        if placement_named(self.placement).asymmetric and (self.a_bits == 16 or cal.symmetric_only):
            raise CraftError(
                f"--placement {self.placement} adds asymmetric activation quantizers; got --quant {self.name} with "
                f"--calib-method {self.calib_method}: quantize activations (e.g. --quant w7a8, not wXa16) and "
                f"calibrate with {_or_list([n for n, c in CALIBRATORS.items() if not c.symmetric_only])}"
            )
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise CraftError(
                f"--weight-rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, got {self.weight_rounding!r}"
            )
        if self.search_points < 2 or self.search_rounds < 1:
            raise CraftError(f"search needs >= 2 points and >= 1 round, got {self.search_points}, {self.search_rounds}")
        if self.layer_quant:
            self._check_layer_quant()

    def _check_layer_quant(self) -> None:
        if self.number_format != "int" or self.group_size or self.placement != "tensorrt" or self.quant_attention:
            raise CraftError(
                "per-layer bit widths take integer formats with per-channel or per-tensor weight scales, the tensorrt "
                "placement and no --quant-attention"
            )
        for entry in self.layer_quant:
            layer, sep, bits = entry.partition("=")
            if not sep or not layer:
                raise CraftError(f"per-layer quantization {entry!r} must be LAYER=wXaY, e.g. blocks.1.0.conv_pwl=w4a16")
            parse_quant(bits)
        layers = [e.partition("=")[0] for e in self.layer_quant]
        twice = sorted({n for n in layers if layers.count(n) > 1})
        if twice:
            raise CraftError(f"per-layer quantization names {', '.join(twice)} more than once")

    def bits_of(self, layer: str) -> tuple[int, int]:
        """(weight bits, activation bits) of one layer: its per-layer entry, else the config's."""
        for entry in self.layer_quant:
            name, _, bits = entry.partition("=")
            if name == layer:
                return parse_quant(bits)
        return self.w_bits, self.a_bits

    def _check_fp8(self) -> None:
        fp8_calibrators = [n for n, c in CALIBRATORS.items() if c.fp8]
        if self.w_bits != 8 or self.a_bits not in (8, 16):
            raise CraftError(f"fp8 is 8-bit E4M3 weights (and activations); got w{self.w_bits}a{self.a_bits}")
        if self.calib_method not in fp8_calibrators:
            raise CraftError(
                f"--quant fp8 calibrates with {_or_list(fp8_calibrators)}, not --calib-method {self.calib_method}"
            )
        if self.w_granularity == "group" or self.weight_rounding != "nearest":
            raise CraftError(
                "--quant fp8 takes per-channel or per-tensor weight scales and nearest rounding (no --group-size, no "
                "--weight-rounding gptq)"
            )
        if self.placement != "tensorrt" or self.act_asymmetric:
            raise CraftError(
                "--quant fp8 is symmetric and runs on TensorRT (Hopper, Ada): keep --placement tensorrt and drop "
                "--act-asymmetric; for ONNX Runtime on a CPU quantize with --quant w7a8 --placement ort-cpu"
            )

    @property
    def name(self) -> str:
        if self.number_format == "fp8":
            return "fp8" if self.a_bits == 8 else "fp8-weights"
        base = f"w{self.w_bits}a{self.a_bits}"
        return f"{base}+{len(self.layer_quant)} per-layer" if self.layer_quant else base

    @property
    def act_symmetric(self) -> bool:
        """ONNX Runtime's CPU placement uses asymmetric activations (post-ReLU ranges from 0, any zero point)."""
        return not (self.act_asymmetric or placement_named(self.placement).asymmetric)

    @property
    def weight_method(self) -> str:
        """Weights are known exactly, so only min-max and MSE clipping apply; each calibrator names its pairing."""
        return self.weight_calib or CALIBRATORS[self.calib_method].weight_method


@torch.no_grad()
def quantize(model: nn.Module, cfg: QuantConfig, calib: CalibLoop | None) -> dict[str, Any]:
    """Attach quantizers to every selected layer (stem and depthwise included), calibrate, freeze the scales.

    With `bn_recalibrate`, BatchNorm statistics are then re-estimated under the fully quantized forward pass.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    method = cfg.calib_method
    cal = calibrator(method, cfg.percentile)
    notes: list[str] = []
    attn = attention_modules(model) if (cfg.quant_attention or cal.twin_quantizers) and cfg.a_bits < 16 else {}
    if cal.twin_quantizers and not attn:
        method, cal = "mse", calibrator("mse", cfg.percentile)
        notes.append(
            f"{cfg.calib_method} needs a ViT (timm Attention blocks) and quantized activations; calibrated with mse"
        )
    layers, skipped = select_layers(model, cfg.include, cfg.exclude, skip_stem=False, skip_depthwise=False)
    missing = [e.partition("=")[0] for e in cfg.layer_quant if e.partition("=")[0] not in layers]
    if missing:
        raise CraftError(
            f"per-layer quantization names {', '.join(missing)}, which this model does not have among the layers it "
            f"quantizes ({len(layers)}, e.g. {', '.join(list(layers)[:3])})"
        )
    if cfg.group_size:
        _check_group_size(layers, cfg.group_size)
    spec: dict[str, LayerQuantSpec] = {}
    for name in layers:
        w_bits, a_bits = cfg.bits_of(name)
        spec[name] = LayerQuantSpec(
            w_bits=w_bits,
            a_bits=a_bits,
            w_granularity=cfg.w_granularity,
            group_size=cfg.group_size,
            a_symmetric=cfg.act_symmetric,
            a_twin="gelu" if cal.twin_quantizers and _after_gelu(name, model) else None,
            number_format=cfg.number_format,
        )
    matmuls = {
        name: MatMulQuantSpec(
            a_bits=cfg.a_bits,
            a_symmetric=cfg.act_symmetric,
            probs_twin=cal.twin_quantizers,
            number_format=cfg.number_format,
        )
        for name in attn
    }
    tensors = {}
    placement = placement_named(cfg.placement)
    if placement.tensors is not None:
        tensors = {
            name: TensorQuantSpec(a_bits=cfg.a_bits, a_symmetric=not placement.asymmetric, sides=tuple(sides))
            for name, sides in placement.tensors(model, set(layers)).items()
        }
        if not tensors:
            notes.append(
                f"--placement {cfg.placement}: no timm residual CNN blocks found; only layer inputs are quantized"
            )
    attach_quantizers(model, spec, matmuls, tensors)
    for mod in quantized_layers(model).values():
        mod.parametrizations.weight[0].calibrate(mod.parametrizations.weight.original, cfg.weight_method)
    rounding = WEIGHT_ROUNDINGS[cfg.weight_rounding]
    if rounding is not None:
        if calib is None:
            raise CraftError(f"--weight-rounding {cfg.weight_rounding} needs calibration data: give --calib-samples N")
        rounding(model, calib)
    timings["weights_seconds"] = time.perf_counter() - t0
    act = activation_quantizers(model)
    ranges: dict[str, list[float]] = {}
    if act:
        if calib is None:
            raise CraftError(f"--quant {cfg.name} quantizes activations and needs calibration data")
        t1 = time.perf_counter()
        with batchnorm_after(model, quantized_layers(model)) as following:
            observe_ranges(model, act, calib, cal)
        timings["activations_seconds"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        refined = cal.refine(model, calib, cfg)
        if refined:
            timings["refine_seconds"] = time.perf_counter() - t2
            notes.extend(refined)
        ranges = {n: [round(v, 6) for v in q.range()] for n, q in act.items() if isinstance(q, ActQuantizer)}
    bn_count = 0
    if cfg.bn_recalibrate and batchnorms(model):
        if calib is None:
            raise CraftError("--bn-recalibrate re-estimates BatchNorm statistics and needs --calib-samples N")
        t3 = time.perf_counter()
        bn_count = recalibrate_batchnorm(model, calib)
        timings["bn_recalibrate_seconds"] = time.perf_counter() - t3
    elif cfg.bn_recalibrate:
        notes.append("--bn-recalibrate: the model has no BatchNorm; nothing re-estimated")
    biases = fit_biases_to_int32(quantized_layers(model), following) if act else {}
    if biases.get("weight_scales_raised"):
        raised = biases["weight_scales_raised"]
        notes.append(
            f"weight scales raised so that every bias fits an int32 accumulator: {sum(raised.values())} channels of "
            f"{len(raised)} layers (near-empty channels)"
        )
    timings["total_seconds"] = time.perf_counter() - t0
    state = {
        "config": cfg.name,
        "calibration": method,
        "weight_calibration": cfg.weight_method,
        "weight_rounding": cfg.weight_rounding,
        "number_format": cfg.number_format,
        "layers": {n: s.to_dict() for n, s in spec.items()},
        "matmuls": {n: s.to_dict() for n, s in matmuls.items()},
        "tensors": {n: s.to_dict() for n, s in tensors.items()},
        "placement": cfg.placement,
    }
    return {
        **state,
        "state": state,
        "summary": f"quantized {cfg.name} ({method}, {cfg.placement} placement): {len(spec)} layers, "
        f"{len(tensors)} block/pool tensors",
        "skipped": skipped,
        "activation_ranges": ranges,
        "bn_recalibrated": bn_count,
        "int32_biases": biases,
        "notes": notes,
        "timings": timings,
    }


@register_weight_rounding("gptq")
@torch.no_grad()
def gptq_layers(model: nn.Module, calib: CalibLoop) -> None:
    """Round every quantized layer's weights with GPTQ, block by block in forward order (each block's input Hessians
    gathered on the model whose earlier blocks are already rounded), activations in float. Grouped (depthwise) convs
    are rounded group by group, each with the Hessian of its own input channels."""
    from craft_deploy.compress.gptq import gptq_round, weight_scales_matrix
    from craft_deploy.compress.sparsegpt import from_weight_matrix, input_hessians, weight_matrix
    from craft_deploy.toolkit.layers import block_groups

    layers = quantized_layers(model)
    act = list(activation_quantizers(model).values())
    for q in act:
        q.enabled = False
    try:
        for group in tqdm(block_groups(model, list(layers)), desc="gptq", unit="block", leave=False, disable=None):
            sub = {name: layers[name] for name in group}
            hessians = input_hessians(model, sub, calib, grouped=True)
            for name, mod in sub.items():
                wq, original = mod.parametrizations.weight[0], mod.parametrizations.weight.original
                mat, scales = weight_matrix(original), weight_scales_matrix(wq, original)
                rows = mat.shape[0] // len(hessians[name])  # output channels of one group (all of them if dense)
                rounded = torch.cat(
                    [
                        gptq_round(mat[g * rows : (g + 1) * rows], h, scales[g * rows : (g + 1) * rows], wq.bits)
                        for g, h in enumerate(hessians[name])
                    ]
                )
                original.copy_(from_weight_matrix(rounded.to(original.dtype), original))
    finally:
        for q in act:
            q.enabled = True


def _check_group_size(layers: dict[str, nn.Module], group_size: int) -> None:
    """Refuse a group size that does not divide every selected layer's weights per output channel (quantizing the
    others per channel, or not at all, would not be what was asked), naming them and what would fit."""
    widths = {name: mod.weight[0].numel() for name, mod in layers.items()}
    ragged = {name: w for name, w in widths.items() if w % group_size}
    if not ragged:
        return
    common = math.gcd(*widths.values())
    fits = [g for g in (256, 128, 64, 32, 16, 8, 4, 2) if common % g == 0]
    hint = f"--group-size {fits[0]} divides every one" if fits else "no group size divides every one"
    examples = ", ".join(f"{n} ({w})" for n, w in list(ragged.items())[:3])
    raise CraftError(
        f"--group-size {group_size} does not divide the weights per output channel of {len(ragged)} of "
        f"{len(widths)} layers: {examples}{', ...' if len(ragged) > 3 else ''}; {hint}, or leave those layers "
        f"float with --exclude (glob patterns, e.g. --exclude {next(iter(ragged))})"
    )


def _or_list(names: list[str]) -> str:
    """'a, b or c'."""
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def observe_ranges(model: nn.Module, act: dict[str, nn.Module], calib: CalibLoop, cal: Calibrator) -> None:
    """Calibrate every activation quantizer: a range pass, then (for histogram methods) a histogram pass."""
    observers = {name: RangeObserver(getattr(q, "symmetric", False)) for name, q in act.items()}
    for name, q in act.items():
        q.observer = observers[name]
    try:
        model.eval()
        calib(model)
        if cal.histogram:
            for obs in observers.values():
                obs.start_histogram()
            calib(model)
    finally:
        for q in act.values():
            q.observer = None
    for name, q in act.items():
        q.set_range(*cal.compute(observers[name], q.bits, getattr(q, "number_format", "int")))


def _after_gelu(name: str, model: nn.Module) -> bool:
    """Whether a layer's input is a GELU output: the second Linear of a timm Mlp (`...mlp.fc2`)."""
    if not name.endswith(".fc2"):
        return False
    mlp = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(getattr(mlp, "act", None), nn.GELU)


@register_method("quantize", QuantConfig)
class Quantize(Method):
    """Uniform PTQ; restore re-attaches every recorded quantizer (their scales load with the weights)."""

    def apply(self, model: nn.Module, cfg: QuantConfig, calib: CalibLoop | None) -> dict[str, Any]:
        return quantize(model, cfg, calib)

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        layers, matmuls, tensors = quant_specs(state)
        attach_quantizers(model, layers, matmuls, tensors)


def _checked_quant(token: str) -> str:
    if token != "fp8":
        parse_quant(token)  # refuses w9a8, ...
    return token
