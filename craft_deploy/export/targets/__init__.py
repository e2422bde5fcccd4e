"""Deployment targets: an exported artifact of one format, verified against PyTorch, and export.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from craft_deploy.config import ExportConfig
from craft_deploy.export.plan import ExportPlan
from craft_deploy.records import write_record


def record(stage: Path, cfg: ExportConfig, bundle_path, plan: ExportPlan, artifact: Path, **fields) -> dict[str, Any]:
    """export.json: the fields every format shares, then the format's own."""
    return write_record(
        stage,
        "export",
        cfg.to_dict(),
        source=str(bundle_path),
        format=cfg.format,
        target=cfg.target,
        precision=plan.precision,
        file=artifact.name,
        size_bytes=artifact.stat().st_size,
        **fields,
    )


def compiled_record(
    stage: Path, cfg: ExportConfig, bundle_path, plan: ExportPlan, artifact: Path, runtime: str, info: dict[str, Any],
    ref: np.ndarray, got: np.ndarray, compile_seconds: float, t0: float, *, model, images,
) -> dict[str, Any]:  # fmt: skip
    """export.json of a compiled artifact (a torch-tensorrt program, an AOTI package): its outputs `got` on the
    verification `images` judged against PyTorch's `ref` by the tolerance policy (`model` for its float64 check)."""
    from craft_deploy.export.verify import compare_outputs, judge_export

    check = compare_outputs(ref[: len(got)], got)
    check["passed"] = judge_export(check, plan.precision, cfg.atol, model, images, ref, got)
    return record(
        stage,
        cfg,
        bundle_path,
        plan,
        artifact,
        compile=info,
        verification={runtime: check},
        timings={"compile_seconds": compile_seconds, "total_seconds": time.perf_counter() - t0},
    )
