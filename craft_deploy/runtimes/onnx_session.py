"""ONNX Runtime sessions on the CPU: what an ONNX file computes, as export verifies it and bench reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def timing_options(threads: int | None = None):
    """ONNX Runtime session options for timing a model as it deploys: every graph optimisation, `threads` intra-op
    threads (one inter-op), and no spin-waiting. Spin-waiting worker threads made 2-thread latency on a 2-core VM
    bimodal (13.3 vs 18.8 ms p50 between back-to-back runs), and a model's spinning threads take the cores from the
    next model timed beside it; without spinning the same runs agreed within 2% and were as fast."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


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
