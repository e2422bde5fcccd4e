"""Torch-side preparation of a bundle for tracing, and the trace itself (TorchScript exporter): weights clipped onto
their grids so Q/DQ sits on constants, timm's dynamic SAME padding made static for the bundle's fixed input size.
"""

from __future__ import annotations

import copy
import io
import math
import types
import warnings

import onnx
import torch
from torch import nn


@torch.no_grad()
def pre_clamp_weights(model: nn.Module) -> None:
    """Clip every quantized weight onto its grid in place, so the exported graph is Q/DQ on a constant (foldable)."""
    from craft_deploy.toolkit.qmodules import quantized_layers

    for mod in quantized_layers(model).values():
        wq = mod.parametrizations.weight[0]
        w = mod.parametrizations.weight.original
        w.copy_(wq.clamp(wq.rows(w)).reshape(w.shape) if wq.granularity == "group" else wq.clamp(w))
        wq.pre_clamped = True


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial axis: (before, after)."""
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _static_same_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if self.static_pad is not None:
        x = torch.nn.functional.pad(x, self.static_pad)
    return torch.nn.functional.conv2d(
        x, self.weight, self.bias, self.stride, self.static_padding, self.dilation, self.groups
    )


@torch.no_grad()
def static_same_padding(model: nn.Module, input_size: list[int]) -> int:
    """Give every timm Conv2dSame fixed padding for `input_size`, in place; returns how many were changed.

    Conv2dSame computes TensorFlow 'SAME' padding from the input's shape on every call, which the exporter writes as
    Shape/Gather/arithmetic/Pad chains. The input size of a bundle is fixed, so the padding is a constant: symmetric
    padding moves into the conv itself, an asymmetric one becomes a constant Pad.
    """
    from timm.layers import Conv2dSame

    sizes: dict[nn.Module, tuple[int, int]] = {}
    convs = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.__setitem__(m, tuple(a[0].shape[-2:]))) for m in convs]
    try:
        model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    for m in convs:
        (top, bottom), (left, right) = (
            _same_pad(n, k, s, d) for n, k, s, d in zip(sizes[m], m.kernel_size, m.stride, m.dilation)
        )
        if top == bottom and left == right:
            m.static_pad, m.static_padding = None, (top, left)
        else:
            m.static_pad, m.static_padding = (left, right, top, bottom), 0
        m.forward = types.MethodType(_static_same_forward, m)
    return len(convs)


def export_model(model: nn.Module, input_size: list[int], opset: int) -> onnx.ModelProto:
    """Trace a copy of `model` to ONNX with a dynamic batch axis (input "input", output "logits").

    The copy has its weights clipped onto their quantization grids and TensorFlow 'SAME' padding made static.
    """
    model = copy.deepcopy(model).eval()
    pre_clamp_weights(model)
    static_same_padding(model, input_size)
    dummy = torch.zeros(1, *input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it is the one that writes Q/DQ
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())
