"""Export targets as registered classes: one entry per `--format`, with the file it writes, the bench backend kind
it feeds and its help line; `export.run` gives every target the same staging, reference logits, timing, verification
verdict and record (ultralytics' `export_formats()` table, as a registry a plugin extends)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_deploy import CraftError
from craft_deploy.config import ExportConfig
from craft_deploy.export.plan import ExportPlan
from craft_deploy.records import write_record
from craft_deploy.runtimes.tolerance import compare_outputs, judge_export


@dataclass
class ExportJob:
    """What every target gets: the config, the loaded bundle, the staging directory it writes into, the plan, the
    verification images with their labels, PyTorch's logits on them, and when the export started."""

    cfg: ExportConfig
    bundle: Any
    bundle_path: Path
    stage: Path
    plan: ExportPlan
    images: torch.Tensor
    labels: torch.Tensor
    ref: np.ndarray
    t0: float


ExportFn = Callable[[ExportJob], dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """One `--format`: `artifact` is the file it leaves in `--out` (what bench reads), `feeds` the kind of input of the
    bench backends that run it (`Backend.needs`), `precheck` runs before anything is written (an install hint)."""

    name: str
    artifact: str
    feeds: str
    help: str
    export: ExportFn
    precheck: Callable[[], None] | None = None
    flavours: tuple[str, ...] | None = ("tensorrt",)  # the Q/DQ flavours (--target) its runtime takes; None: any


TARGETS: dict[str, Target] = {}


def register_target(
    name: str,
    *,
    artifact: str,
    feeds: str,
    help: str,
    precheck: Callable[[], None] | None = None,
    flavours: tuple[str, ...] | None = ("tensorrt",),
) -> Callable[[ExportFn], ExportFn]:
    """Function decorator: register `export(job) -> export.json record` as the target of `--format name`."""

    def deco(fn: ExportFn) -> ExportFn:
        if name in TARGETS and TARGETS[name].export is not fn:
            raise ValueError(f"export target {name!r} is registered twice")
        TARGETS[name] = Target(name, artifact, feeds, help, fn, precheck, flavours)
        return fn

    return deco


def target_named(name: str) -> Target:
    """The registered target of `--format name`, or a CraftError listing the registered ones."""
    if name not in TARGETS:
        raise CraftError(f"--format {name!r} is not supported; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def target_for(needs: str) -> Target | None:
    """The first registered target whose artifact a backend that runs `needs` reads (None: nothing to export)."""
    return next((t for t in TARGETS.values() if t.feeds == needs), None)


def record(job: ExportJob, artifact: Path, **fields) -> dict[str, Any]:
    """export.json: the fields every format shares, then the format's own."""
    return write_record(
        job.stage,
        "export",
        job.cfg.to_dict(),
        source=str(job.bundle_path),
        format=job.cfg.format,
        target=job.cfg.target,
        precision=job.plan.precision,
        file=artifact.name,
        size_bytes=fields.pop("size_bytes", None) or artifact.stat().st_size,  # a target may count its other files
        **fields,
    )


def compiled_record(
    job: ExportJob, artifact: Path, runtime: str, info: dict[str, Any], got: np.ndarray, compile_seconds: float
) -> dict[str, Any]:
    """export.json of a compiled artifact (a torch-tensorrt program, an AOTI package): its outputs `got` on the
    verification images judged against PyTorch's logits by the tolerance policy."""
    check = compare_outputs(job.ref[: len(got)], got)
    check["passed"] = judge_export(check, job.plan.precision, job.cfg.atol, job.bundle.model, job.images, job.ref, got)
    return record(
        job,
        artifact,
        compile=info,
        verification={runtime: check},
        timings={"compile_seconds": compile_seconds, "total_seconds": time.perf_counter() - job.t0},
    )
