"""TensorRT engines from our ONNX, with the TensorRT 10.x / 11.x Python API.

Precision comes from the ONNX itself: the network is strongly typed (TensorRT 11 knows nothing else; 10.x has it as
a creation flag), so an FP16 ONNX builds FP16 kernels and Q/DQ nodes build INT8 ones (explicit quantization; the INT8
calibrators were deprecated in 10.1 and removed in 11). `--sparse` sets SPARSE_WEIGHTS so 2:4-pruned weights may get
sparse tensor-core kernels; whether they did is read from the builder log and the engine inspector, because a 2:4
model that silently runs dense kernels is the most common complaint about sparsity.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes, atomic_write_json
from craft_deploy.export.plan import ExportPlan
from craft_deploy.export.targets.base import ExportJob, register_target
from craft_deploy.export.targets.onnx_model import onnx_record, verified_onnx
from craft_deploy.runtimes.metadata import export_metadata
from craft_deploy.runtimes.tensorrt_runner import EngineRunner, import_tensorrt
from craft_deploy.runtimes.tolerance import compare_outputs, judge_export


def _logger(trt, lines: list[str]):
    """An ILogger that keeps every message (the builder log is written next to the engine)."""

    class KeepLog(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

    return KeepLog()


def build_engine(
    onnx_path: Path,
    input_size: list[int],
    batch_sizes: tuple[int, ...],
    sparse: bool = False,
    workspace_gb: float = 4.0,
    timing_cache: Path | None = None,
) -> tuple[bytes, dict[str, Any], list[str]]:
    """Build a serialized engine; returns (engine bytes, build info incl. the inspector's layer report, builder log).

    One optimization profile covers batch min(batch_sizes)..max(batch_sizes), tuned for the largest. The timing cache
    at `timing_cache` is read when present and rewritten after the build, so rebuilds are fast.
    """
    trt = import_tensorrt()
    lines: list[str] = []
    logger = _logger(trt, lines)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CraftError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:800]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sparse:
        if not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
            raise CraftError(f"TensorRT {trt.__version__} has no SPARSE_WEIGHTS builder flag")
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    lo, hi = min(batch_sizes), max(batch_sizes)
    profile.set_shape(name, (lo, *input_size), (hi, *input_size), (hi, *input_size))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = [line for line in lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise CraftError(f"TensorRT failed to build an engine from {onnx_path}: {' '.join(errors)[-800:]}")
    engine_bytes = bytes(plan)
    info: dict[str, Any] = {
        "tensorrt": trt.__version__,
        "strongly_typed": strongly is not None,
        "sparse_weights_flag": sparse,
        "profile": {"input": name, "min": [lo, *input_size], "opt": [hi, *input_size], "max": [hi, *input_size]},
    }
    if timing_cache is not None:
        data = bytes(config.get_timing_cache().serialize())
        atomic_write_bytes(timing_cache, data)
        info["timing_cache"] = {"path": str(timing_cache), "bytes": len(data)}
    info["layers"] = inspect_engine(trt, engine_bytes, logger)
    info["sparsity"] = sparse_log_report(lines)
    return engine_bytes, info, lines


def inspect_engine(trt, engine_bytes: bytes, logger) -> dict[str, Any]:
    """Per-layer precision and tactic from the engine inspector (TensorRT 10's and 11's JSON layouts)."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    inspector = engine.create_engine_inspector()
    report = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in report.get("Layers", []):
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED gives names only
            layers.append({"name": layer})
            continue
        outputs = layer.get("Outputs", [])
        types = [o.get("DataType") or o.get("Format/Datatype", "") for o in outputs]
        tactic = str(layer.get("TacticName", ""))
        layers.append(
            {
                "name": layer.get("Name"),
                "type": layer.get("LayerType"),
                "tactic": tactic,
                "output_types": types,
                "int8": any("Int8" in t or "INT8" in t for t in types) or "i8" in tactic.lower(),
                "sparse_kernel": "sparse" in tactic.lower(),
            }
        )
    return {
        "count": len(layers),
        "int8": sum(bool(layer.get("int8")) for layer in layers),
        "sparse_kernels": sum(bool(layer.get("sparse_kernel")) for layer in layers),
        "details": layers,
    }


_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)")
_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)")


def sparse_log_report(lines: list[str]) -> dict[str, list[str]]:
    """What the builder said about 2:4 sparsity: layers eligible for sparse math, and those that got sparse tactics."""

    def names(pattern: re.Pattern) -> list[str]:
        found: list[str] = []
        for line in lines:
            m = pattern.search(line)
            if m:
                found += [n.strip() for n in m.group(1).split(",") if n.strip()]
        return found

    return {"eligible": names(_ELIGIBLE), "picked_sparse": names(_PICKED)}


def build_and_verify(cfg, bundle, stage: Path, plan: ExportPlan, images, ref) -> tuple[dict, dict, float]:
    """Build model.engine from the verified model.onnx, keep the log and metadata, and verify the engine."""
    t0 = time.perf_counter()
    engine, info, log = build_engine(
        stage / "model.onnx",
        bundle.manifest["input_size"],
        cfg.batch_sizes,
        sparse=cfg.sparse,
        workspace_gb=cfg.workspace_gb,
        timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
    )
    seconds = time.perf_counter() - t0
    atomic_write_bytes(stage / "model.engine", engine)
    atomic_write_bytes(stage / "build.log", "\n".join(log).encode())
    meta = {**export_metadata(bundle.manifest), "engine": {k: v for k, v in info.items() if k != "layers"}}
    meta["engine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    atomic_write_json(stage / "metadata.json", meta)
    runner = EngineRunner(stage / "model.engine")
    lo, hi = min(cfg.batch_sizes), max(cfg.batch_sizes)
    got = np.concatenate([runner.run(runner.prepare(c.numpy())) for c in images.split(hi) if len(c) >= lo])
    check = compare_outputs(ref[: len(got)], got)
    check["passed"] = judge_export(check, plan.precision, cfg.atol, bundle.model, images, ref, got)
    layers = info["layers"]
    extra = {
        "engine": {
            **{k: v for k, v in info.items() if k != "layers"},
            "layers": {k: v for k, v in layers.items() if k != "details"},
            "size_bytes": len(engine),
        }
    }
    if cfg.sparse and not layers["sparse_kernels"] and not info["sparsity"]["picked_sparse"]:
        extra["engine"]["warning"] = (
            "--sparse was set but TensorRT picked no sparse kernel: layers need 2:4 weights (craft-deploy compress "
            "--sparsity 2:4), INT8 or FP16 precision, and channel counts that are multiples of 32/64; dense was faster "
            "or no sparse tactic exists for these shapes on this GPU (see build.log)"
        )
    atomic_write_json(stage / "engine_layers.json", layers)
    return extra, check, seconds


@register_target(
    "tensorrt",
    artifact="model.engine",
    feeds="engine",
    help="tensorrt (an engine built from the verified ONNX)",
    precheck=import_tensorrt,
)
def export(job: ExportJob) -> dict[str, Any]:
    """The verified model.onnx, then model.engine built from it and verified on this GPU."""
    onnx_file = verified_onnx(job)
    engine, onnx_file.verification["tensorrt"], onnx_file.timings["engine_build_seconds"] = build_and_verify(
        job.cfg, job.bundle, job.stage, job.plan, job.images, job.ref
    )
    onnx_file.extra.update(engine)
    return onnx_record(job, onnx_file, job.stage / "model.engine")
