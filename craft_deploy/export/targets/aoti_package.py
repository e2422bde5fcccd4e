"""AOTInductor package of a bundle (`model.pt2`): the model as torch.export traced it, compiled ahead of time to a
shared library by Inductor for the device the export runs on (CUDA when visible, else this CPU), with a dynamic batch
dimension. It loads with `torch._inductor.aoti_load_package` and PyTorch alone: no craft-deploy, no timm, no Python
model code. A quantized bundle compiles as PyTorch runs it (fake-quant included), so the package computes exactly what
the bundle does; for integer kernels, export ONNX for TensorRT or bench with `--kernels`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_json
from craft_deploy.export.targets.base import ExportJob, compiled_record, register_target
from craft_deploy.runtimes.aoti import load_package
from craft_deploy.runtimes.metadata import export_metadata

FILE = "model.pt2"


def compile_package(
    model: torch.nn.Module, input_size: list[int], batch_sizes: tuple[int, ...], fp16: bool, device: str, path: Path
) -> dict[str, Any]:
    """Export `model` with a batch dimension from 1 to max(`batch_sizes`) and compile it to the package `path`."""
    hi = max(batch_sizes)
    dtype = torch.float16 if fp16 else torch.float32
    model = model.eval().to(device=device, dtype=dtype)
    example = torch.randn(min(2, hi), *input_size, device=device, dtype=dtype)
    # batch 1 is a value torch.export would specialise on, so the range starts at 1 only when 1 is not the example
    batch = torch.export.Dim("batch", min=1, max=max(hi, 2))
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:  # Inductor's errors are long; the first line says what failed
        raise CraftError(
            f"AOTInductor could not compile this model on {device} ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e
    return {
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_range": [1, max(hi, 2)],
    }


@register_target(
    "aoti",
    artifact=FILE,
    feeds="pt2",
    help="aoti (an AOTInductor package, model.pt2, compiled for this machine's GPU or CPU)",
)
def export(job: ExportJob) -> dict[str, Any]:
    """model.pt2 compiled for this machine, loaded back and verified."""
    cfg, bundle, stage, plan, images = job.cfg, job.bundle, job.stage, job.plan, job.images
    if plan.precision == "fp16" and not torch.cuda.is_available():
        raise CraftError("--format aoti --precision fp16 compiles for a GPU; on a CPU export fp32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = stage / FILE
    info = compile_package(
        bundle.model, bundle.manifest["input_size"], cfg.batch_sizes, plan.precision == "fp16", device, path
    )
    atomic_write_json(stage / "metadata.json", {**export_metadata(bundle.manifest), "aoti": info})
    seconds = time.perf_counter() - job.t0
    program = load_package(path)
    dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    with torch.no_grad():
        got = np.concatenate(
            [program(c.to(device, dtype)).float().cpu().numpy() for c in images.split(max(cfg.batch_sizes))]
        )
    return compiled_record(job, path, "aoti", info, got, seconds)
