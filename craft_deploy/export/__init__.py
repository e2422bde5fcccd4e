"""Export stage: bundle -> ONNX, TensorRT engine, torch-tensorrt program, AOTInductor package or device package, each
verified against PyTorch on real images, and export.json.

plan (what the bundle exports as) -> passes (graph rewrites, one function each) -> target (the artifact of a format)
-> verify (the tolerance policy); a failed verification raises VerificationError (exit 4) and writes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from craft_deploy import VerificationError
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.config import ExportConfig
from craft_deploy.data import splits_for_manifest
from craft_deploy.export.plan import ExportPlan, plan_export
from craft_deploy.export.targets import ExportJob, target_named
from craft_deploy.export.verify import verify_onnx
from craft_deploy.models import load_bundle
from craft_deploy.runtimes.tolerance import compare_outputs

__all__ = ["ExportPlan", "compare_outputs", "plan_export", "run", "verify_onnx"]


def run(cfg: ExportConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export the bundle at `bundle_path` into `out` with the target `cfg.format` names: every target is staged, gets
    the same reference logits, is timed and verified alike, and leaves its artifact and export.json."""
    check_out_dir(out, overwrite, inputs=[bundle_path])
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    target = target_named(cfg.format)
    plan = plan_export(cfg, manifest, bundle_path, target.flavours)
    if target.precheck is not None:
        target.precheck()  # an install hint before any file is written
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        splits = splits_for_manifest(manifest, cfg.data_root, eval_subset=cfg.verify_samples)
        images, labels = next(iter(DataLoader(splits.test, batch_size=cfg.verify_samples)))[:2]
        with torch.no_grad():  # PyTorch's logits, once: every check compares against them
            ref = bundle.model.eval()(images).numpy()
        record = target.export(ExportJob(cfg, bundle, Path(bundle_path), stage, plan, images, labels, ref, t0))
        failed = [k for k, v in record["verification"].items() if isinstance(v, dict) and v.get("passed") is False]
        if failed:
            found = [record["verification"][k].get("diagnosis", {}).get("summary") for k in failed]
            measured = {k: {f: v for f, v in record["verification"][k].items() if f != "diagnosis"} for k in failed}
            raise VerificationError(
                f"{', '.join(failed)} disagrees with PyTorch beyond tolerance: {measured}"
                + "".join(f"; {s}" for s in found if s)
                + f"; nothing was written to {out}"
            )
    return record
