"""Where activation quantizers sit beyond the inputs of Conv/Linear layers, per deployment target.

`tensorrt` (the default) quantizes only the inputs of Conv/Gemm/MatMul: TensorRT fuses residual adds, activations and
pooling into its INT8 kernels itself. ONNX Runtime on CPU fuses an op into an integer kernel only where every input
comes from a DequantizeLinear and its output goes into a QuantizeLinear, so `ort-cpu` also quantizes what residual
adds and global pooling read and write: each residual block's input and output, the end of its branch (and its
downsample shortcut), and the pooled head's input and output. The Conv feeding each of these then runs as QLinearConv
and the add as QLinearAdd, with no float islands or layout transposes between them. `ort-cpu` activations are
asymmetric, so ranges after ReLU / ReLU6 start at 0 and the runtime drops the activation into the integer kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from craft_deploy import CraftError

TensorsFn = Callable[[nn.Module, "set[str] | None"], dict[str, list[str]]]


@dataclass(frozen=True)
class Placement:
    """A runtime's Q/DQ convention, one name for `compress --placement` and `export --target`.

    `tensors(model, quantized)` names the module inputs/outputs quantized beyond the inputs of Conv/Linear layers
    (None: layer inputs only); `asymmetric`: those and the layer inputs take asymmetric ranges (any zero point);
    `activations`: how the exported Q/DQ graph stores activations (int8 = S8S8, uint8 = U8S8 with zero point 128 for
    symmetric ranges, exact); `int4_weights`: the runtime runs INT4 DequantizeLinear on convolutions.
    """

    name: str
    help: str
    tensors: TensorsFn | None = None
    asymmetric: bool = False
    activations: str = "int8"
    int4_weights: bool = False


PLACEMENTS: dict[str, Placement] = {}
"""Registered placements by name: the `--placement` and `--target` choices."""


def register_placement(placement: Placement) -> Placement:
    """Add a placement to PLACEMENTS (a plugin's too); a name registered twice with another meaning is an error."""
    if PLACEMENTS.get(placement.name, placement) != placement:
        raise ValueError(f"placement {placement.name!r} is registered twice")
    if placement.activations not in ("int8", "uint8"):
        raise ValueError(f"placement {placement.name!r}: activations are int8 or uint8, not {placement.activations!r}")
    PLACEMENTS[placement.name] = placement
    return placement


def placement_named(name: str, flag: str = "--placement") -> Placement:
    """The registered placement `name`, or a CraftError naming the registered ones."""
    if name not in PLACEMENTS:
        raise CraftError(f"{flag} must be one of {', '.join(PLACEMENTS)}, got {name!r}")
    return PLACEMENTS[name]


def _block_types() -> dict[type, tuple[str, ...]]:
    """timm residual block classes -> the modules that end their branch, last one first (SE follows the last BN in
    ResNets)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
    from timm.models.resnet import BasicBlock, Bottleneck

    return {
        InvertedResidual: ("bn3",),
        DepthwiseSeparableConv: ("bn2",),
        EdgeResidual: ("bn2",),
        Bottleneck: ("se", "bn3"),
        BasicBlock: ("se", "bn2"),
    }


def ort_cpu_tensors(model: nn.Module, quantized: set[str] | None = None) -> dict[str, list[str]]:
    """The module inputs/outputs ONNX Runtime needs quantized: `{module name: ["output"] | ["input", "output"]}`.

    A block with a skip connection gets its input (what the shortcut reads), its output (what the add writes), the
    end of its branch and its downsample shortcut quantized, so the add has quantized inputs and output. A tensor
    that also enters a quantized layer is then quantized twice, by quantizers calibrated on the same values: the
    scales agree, and re-quantizing onto the same grid changes nothing.

    With `quantized` (the names of the layers that get quantized), a block's tensors are quantized only where every
    Linear/Conv inside it is: a block that keeps a float layer keeps float boundaries too (its add cannot run as
    QLinearAdd anyway), and the pooled head's only where the last layer before it is quantized. Where every layer is,
    this is the same as without it.
    """
    types = _block_types()
    tensors: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        ends = next((v for k, v in types.items() if isinstance(mod, k)), None)
        if ends is None or not getattr(mod, "has_skip", True):
            continue
        if quantized is not None and not all(f"{name}.{n}" in quantized for n in _layers_in(mod)):
            continue
        tensors[name] = ["input", "output"]
        end = next(e for e in ends if isinstance(getattr(mod, e, None), nn.Module))
        tensors[f"{name}.{end}"] = ["output"]
        if isinstance(getattr(mod, "downsample", None), nn.Module):
            tensors[f"{name}.downsample"] = ["output"]
    pool = getattr(model, "global_pool", None)
    if tensors and isinstance(pool, nn.Module) and (quantized is None or _last_layer_before(model, pool) in quantized):
        tensors["global_pool"] = ["input", "output"]
    return tensors


def _layers_in(mod: nn.Module) -> list[str]:
    return [n for n, m in mod.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _last_layer_before(model: nn.Module, pool: nn.Module) -> str | None:
    """The last Linear/Conv registered before `pool` (in timm's CNNs, the one whose output it pools)."""
    last = None
    for name, mod in model.named_modules():
        if mod is pool:
            return last
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = name
    return last


register_placement(
    Placement(
        "tensorrt",
        "tensorrt (inputs of Conv/Linear only, symmetric, for TensorRT, which fuses adds, activations and pooling "
        "itself; S8S8 Q/DQ)",
    )
)
register_placement(
    Placement(
        "ort-cpu",
        "ort-cpu (also residual adds and pooling, asymmetric, for ONNX Runtime's CPU integer kernels; U8S8 Q/DQ, INT4 "
        "weights)",
        tensors=ort_cpu_tensors,
        asymmetric=True,
        activations="uint8",
        int4_weights=True,
    )
)
