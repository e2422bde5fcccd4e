"""ONNX Runtime sessions on the CPU: what an ONNX file computes, as export verifies it and bench reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def onnx_logits(path: Path, images: torch.Tensor, fused: bool = False) -> np.ndarray:
    """The ONNX file's logits on `images` in ONNX Runtime (CPU).

    By default ONNX Runtime applies only its basic graph optimisations, so the check is of what the file computes.
    With `fused`, every optimisation runs: Q/DQ pairs become this CPU's integer kernels (QLinearConv, ...).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if fused else level.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": chunk.numpy()})[0] for chunk in images.split(32)])
