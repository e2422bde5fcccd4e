"""Checks of an exported ONNX file against its bundle: PyTorch's logits (the policy is runtimes.tolerance) and the
pruned weights' zeros."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from craft_deploy.runtimes.onnx_graph import initializers, producers
from craft_deploy.runtimes.onnx_session import onnx_logits
from craft_deploy.runtimes.tolerance import compare_outputs


def weight_zero_count(proto: onnx.ModelProto) -> int:
    """Exact zeros in the weights of Conv/Gemm/MatMul nodes, read through DequantizeLinear, Reshape, Cast, Transpose."""
    inits = initializers(proto.graph)
    writers = producers(proto.graph)
    zeros = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        while name in writers and writers[name].op_type in ("DequantizeLinear", "Reshape", "Cast", "Transpose"):
            name = writers[name].input[0]
        if name in inits:
            zeros += int((onnx.numpy_helper.to_array(inits[name]) == 0).sum())
    return zeros


def verify_onnx(path: Path, images: torch.Tensor, ref: np.ndarray, fused: bool = False) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (CPU) on `images` and compare its logits with PyTorch's, `ref`."""
    return compare_outputs(ref, onnx_logits(path, images, fused))


def pruned_zeros(bundle, pruned: dict[str, Any]) -> int:
    """Exact zeros in the bundle's pruned layers' weights (what the exported file must keep)."""
    layers = pruned.get("layers", {})
    model = bundle.model
    total = 0
    for name in layers:
        mod = model.get_submodule(name)
        w = mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight
        total += int((w == 0).sum())
    return total
