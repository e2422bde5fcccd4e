"""torch-tensorrt (dynamo) compilation of a bundle, saved as an ExportedProgram that `bench --backend torch-tensorrt`
loads with torch.export.load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_json
from craft_deploy.export.targets.base import ExportJob, compiled_record, register_target
from craft_deploy.runtimes.metadata import export_metadata
from craft_deploy.runtimes.tensorrt_runner import INSTALL_HINT


def compile_and_save(
    model: nn.Module, input_size: list[int], batch_sizes: tuple[int, ...], fp16: bool, path: Path
) -> dict[str, Any]:
    """Compile `model` for batch sizes min..max of `batch_sizes` on the GPU and save it to `path`."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise CraftError(f"--format torch-tensorrt needs torch-tensorrt, which is not installed: {INSTALL_HINT}") from e
    if not torch.cuda.is_available():
        raise CraftError("--format torch-tensorrt compiles TensorRT engines and needs a CUDA GPU; none is visible")
    lo, hi = min(batch_sizes), max(batch_sizes)
    model = model.eval().cuda()
    spec = torch_tensorrt.Input(
        min_shape=(lo, *input_size), opt_shape=(hi, *input_size), max_shape=(hi, *input_size), dtype=torch.float32
    )
    precisions = {torch.float16, torch.float32} if fp16 else {torch.float32}
    compiled = torch_tensorrt.compile(model, ir="dynamo", inputs=[spec], enabled_precisions=precisions)
    example = torch.zeros(hi, *input_size, device="cuda")
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", inputs=[example])
    return {
        "torch_tensorrt": torch_tensorrt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "batch_range": [lo, hi],
        "precisions": sorted(str(p) for p in precisions),
    }


@register_target(
    "torch-tensorrt",
    artifact="model.ep",
    feeds="ep",
    help="torch-tensorrt (a dynamo-compiled program)",
)
def export(job: ExportJob) -> dict[str, Any]:
    """model.ep compiled by torch-tensorrt on this GPU, loaded back and verified."""
    cfg, bundle, stage, plan, images = job.cfg, job.bundle, job.stage, job.plan, job.images
    path = stage / "model.ep"
    info = compile_and_save(
        bundle.model, bundle.manifest["input_size"], cfg.batch_sizes, plan.precision == "fp16", path
    )
    atomic_write_json(stage / "metadata.json", {**export_metadata(bundle.manifest), "torch_tensorrt": info})
    seconds = time.perf_counter() - job.t0
    program = torch.export.load(str(path)).module()
    lo, hi = min(cfg.batch_sizes), max(cfg.batch_sizes)
    with torch.no_grad():
        got = np.concatenate([program(c.cuda()).float().cpu().numpy() for c in images.split(hi) if len(c) >= lo])
    return compiled_record(job, path, "torch_tensorrt", info, got, seconds)
