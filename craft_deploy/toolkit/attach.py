"""Attaching quantizers to a model: weight and input quantizers on layers, attention matmuls, module inputs/outputs."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from craft_deploy import CraftError
from craft_deploy.toolkit.attention import Attention, quantize_attention
from craft_deploy.toolkit.qmodules import WeightQuantizer, make_act_quantizer, quantize_input, quantize_output
from craft_deploy.toolkit.spec import LayerQuantSpec, MatMulQuantSpec, TensorQuantSpec


def attach_quantizers(
    model: nn.Module,
    layers: dict[str, LayerQuantSpec],
    matmuls: dict[str, MatMulQuantSpec] | None = None,
    tensors: dict[str, TensorQuantSpec] | None = None,
) -> None:
    """Attach weight/input quantizers to the named layers, to ViT attention matmuls, and to any module's input and/or
    output (`tensors`, see compress.placement). Names that are not the right kind of module are CraftErrors."""
    for name, spec in layers.items():
        mod = _submodule(model, name, (nn.Linear, nn.Conv2d), "a Linear or Conv2d layer")
        wq = WeightQuantizer(mod.weight.shape, spec.w_bits, spec.w_granularity, spec.group_size, spec.number_format)
        parametrize.register_parametrization(mod, "weight", wq, unsafe=True)  # shape-preserving; no trial call
        if spec.quantizes_input:
            mod.input_quantizer = make_act_quantizer(spec.a_bits, spec.a_symmetric, spec.a_twin, spec.number_format)
            mod.register_forward_pre_hook(quantize_input)
    if matmuls:
        for name, mspec in matmuls.items():
            quantize_attention(_submodule(model, name, Attention, "a timm Attention block"), mspec)
    for name, tspec in (tensors or {}).items():
        mod = _submodule(model, name, nn.Module, "a module")
        if "input" in tspec.sides:
            mod.input_quantizer = make_act_quantizer(tspec.a_bits, tspec.a_symmetric)
            mod.register_forward_pre_hook(quantize_input)
        if "output" in tspec.sides:
            mod.output_quantizer = make_act_quantizer(tspec.a_bits, tspec.a_symmetric)
            mod.register_forward_hook(quantize_output)


def _submodule(model: nn.Module, name: str, kind: type | tuple[type, ...], what: str) -> nn.Module:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise CraftError(f"the model has no module {name!r} to quantize") from None
    if not isinstance(mod, kind):
        raise CraftError(f"module {name!r} is a {type(mod).__name__}, not {what}; cannot quantize it as one")
    return mod
