"""A device package (`export --format edge`): what a device operator copies to a Jetson or a GPU server to build the
TensorRT engine where it will run and check it there, without craft-deploy installed.

    model.onnx             the verified export (Q/DQ for quantized bundles, 2:4 zeros kept)
    inputs.npz             `images`: real test images, preprocessed; `labels`: their classes
    outputs.npz            `logits`: PyTorch's logits for them
    labels.json            class names
    build.env              shapes, input name, sparsity: what the scripts read
    build_engine.sh        trtexec for the TensorRT 10.x/11.x it finds (strongly typed, sparsity, shapes, timing cache,
                           fixed builder optimisation level, layer info), DLA with --dla CORE
    verify.py              engine (or ONNX Runtime) vs outputs.npz under craft-deploy's tolerance; kernel report
    bench.sh               trtexec timings -> times-bN.json, which `craft-deploy bench --from-trtexec` reads
    manifest.json          sha256 of every file, precision, sparsity, shapes, targets, calibration, reference accuracy,
                           commands
    README.md              the same, for a person

The scripts are fixed files (`edge_files/`); everything specific to the model is in build.env and manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from craft_deploy import __version__
from craft_deploy.artifacts import atomic_write_json
from craft_deploy.config import EDGE_DEVICES
from craft_deploy.export.targets import onnx_model
from craft_deploy.export.targets.base import ExportJob, register_target
from craft_deploy.runtimes.tolerance import float64_allowance, float64_logits
from craft_deploy.toolkit.registry import method_state

PACKAGE_SCHEMA = "craft-deploy/edge/v1"
FILES_DIR = Path(__file__).with_name("edge_files")
SCRIPTS = ("build_engine.sh", "bench.sh", "verify.py")
# builder optimisation level fixed so that two builds on one device choose from the same tactic search (TensorRT's
# default is 3; 5 searches longest)
BUILDER_OPTIMIZATION_LEVEL = 3
INPUT_NAME = "input"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _targets(precision: str, sparse: bool, device: str | None) -> dict[str, Any]:
    """TensorRT versions and GPU architectures (SM) this package is meant for."""
    if precision == "fp8":
        sms = "8.9+ (FP8 tensor cores: Ada, Hopper, Blackwell; not Orin or Ampere)"
    elif sparse:
        sms = "8.0+ (2:4 sparse tensor cores: Ampere, Orin 8.7, Ada 8.9, Hopper 9.0, Blackwell/Thor)"
    elif precision == "int8":
        sms = "7.5+ (INT8 tensor cores: Turing and newer, Jetson Xavier 7.2 and Orin 8.7)"
    else:
        sms = "7.5+"
    return {
        "tensorrt": ["10.x (--stronglyTyped)", "11.x (always strongly typed)"],
        "sm": sms,
        "jetson": "JetPack 6 (TensorRT 10.x) on Orin; JetPack 7.2.2+ (TensorRT 11.4.1) on AGX Orin and Thor",
        "dla": "./build_engine.sh --dla 0 (Orin/Xavier; layers DLA cannot run fall back to the GPU)",
        "device": None if device is None else {"name": device, "sm": EDGE_DEVICES[device]},
    }


def _reference_accuracy(bundle_path: Path) -> dict[str, Any] | None:
    """The bundle's own top-1 as its stage recorded it (compress.json or finetune.json beside it)."""
    for name, key in (("compress.json", "test_top1_after"), ("finetune.json", "test_top1")):
        path = Path(bundle_path) / name
        if path.is_file():
            rec = json.loads(path.read_text())
            top1 = (rec.get("metrics") or {}).get(key)
            if top1 is not None:
                return {"test_top1": top1, "from": name, "eval_subset": (rec.get("config") or {}).get("eval_subset")}
    return None


@register_target(
    "edge",
    artifact="model.onnx",
    feeds="onnx",
    help="edge (a device package: ONNX, test data and the scripts that build and verify the TensorRT engine on the "
    "device)",
)
def export(job: ExportJob) -> dict[str, Any]:
    """The verified model.onnx plus everything the device needs to build, verify and time its engine."""
    cfg, bundle, stage, plan = job.cfg, job.bundle, job.stage, job.plan
    images, labels, ref = job.images, job.labels, job.ref
    bundle_path = job.bundle_path
    record = onnx_model.export(job)
    manifest = bundle.manifest
    size = list(manifest["input_size"])
    lo, hi = min(cfg.batch_sizes), max(cfg.batch_sizes)
    pruned = method_state(manifest, "prune") or {}
    quant = method_state(manifest, "quantize") or {}
    sparse = pruned.get("pattern") == "2:4"
    chw = "x".join(str(d) for d in size)

    np.savez_compressed(stage / "inputs.npz", images=images.numpy(), labels=labels.numpy())
    check = record["verification"]["onnxruntime"]
    tolerance, outputs = check["tolerance"], {"logits": ref}
    if plan.precision in ("fp32", "int8", "fp8") and cfg.atol is None:
        try:  # the exact reference verify.py falls back on, as export does (export.verify.judge_export)
            outputs["logits_float64"] = float64_logits(bundle.model, images)
            tolerance = {**tolerance, "float64_max_abs_diff": float64_allowance(check, ref, outputs["logits_float64"])}
        except RuntimeError:  # an op without a float64 kernel: PyTorch's FP32 logits alone
            pass
    np.savez_compressed(stage / "outputs.npz", **outputs)
    atomic_write_json(stage / "labels.json", manifest.get("class_names") or list(range(manifest["num_classes"])))
    env = {
        "INPUT_NAME": INPUT_NAME,
        "CHW": chw,
        "MIN_SHAPE": f"{lo}x{chw}",
        "OPT_SHAPE": f"{hi}x{chw}",
        "MAX_SHAPE": f"{hi}x{chw}",
        "BATCH_SIZES": " ".join(str(b) for b in cfg.batch_sizes),
        "SPARSE": "1" if sparse else "0",
        "BUILDER_OPTIMIZATION_LEVEL": str(BUILDER_OPTIMIZATION_LEVEL),
    }
    (stage / "build.env").write_text(
        "# written by craft-deploy export --format edge; read by build_engine.sh and bench.sh\n"
        + "".join(f'{k}="{v}"\n' for k, v in env.items())
    )
    for name in SCRIPTS:
        shutil.copyfile(FILES_DIR / name, stage / name)
        (stage / name).chmod(0o755)

    package = {
        "package_schema": PACKAGE_SCHEMA,
        "created_by": f"craft-deploy {__version__}",
        "source": str(bundle_path),
        "model": {
            "architecture": manifest["architecture"],
            "num_classes": manifest["num_classes"],
            "input_name": INPUT_NAME,
            "input_size": size,
            "mean": manifest.get("mean"),
            "std": manifest.get("std"),
            "dataset": manifest.get("dataset"),
        },
        "opset": plan.opset,
        "precision": plan.precision,
        "weights": plan.weights,
        "activations": plan.activations,
        "sparsity": pruned.get("pattern"),
        "batch_sizes": list(cfg.batch_sizes),
        "shapes": {"min": [lo, *size], "opt": [hi, *size], "max": [hi, *size]},
        "targets": _targets(plan.precision, sparse, cfg.device),
        "calibration": {k: v for k, v in quant.items() if k != "layers"} or None,
        "reference": {
            "bundle": _reference_accuracy(Path(bundle_path)),
            "pytorch_top1_on_package_images": float(100.0 * (ref.argmax(1) == labels.numpy()).mean()),
            "onnxruntime_check_at_export": {k: v for k, v in check.items() if k != "tolerance"},
        },
        "tolerance": tolerance,
        "commands": {
            "build": "./build_engine.sh",
            "build_dla": "./build_engine.sh --dla 0",
            "verify": "python3 verify.py",
            "verify_without_tensorrt": "python3 verify.py --runtime ort",
            "bench": "./bench.sh",
            "bench_record": "craft-deploy bench --from-trtexec . --out bench",
        },
    }
    (stage / "README.md").write_text(_readme(package))
    # every file but the manifest itself, the export record (rewritten below) included once final
    record["package"] = {k: package[k] for k in ("package_schema", "precision", "sparsity", "shapes")}
    atomic_write_json(stage / "export.json", record)
    package["files"] = {p.name: sha256(p) for p in sorted(stage.iterdir()) if p.is_file() and p.name != "manifest.json"}
    atomic_write_json(stage / "manifest.json", package)
    return record


def _readme(p: dict[str, Any]) -> str:
    m, c, t = p["model"], p["commands"], p["targets"]
    sparse = f", {p['sparsity']} sparse" if p["sparsity"] else ""
    bundle_ref = p["reference"]["bundle"]
    acc = f"{bundle_ref['test_top1']:.2f}% test top-1 ({bundle_ref['from']})" if bundle_ref else "not recorded"
    chw = " x ".join(map(str, m["input_size"]))
    return f"""# {m["architecture"]} for TensorRT ({p["precision"]}{sparse})

Written by {p["created_by"]} from `{p["source"]}`. Input `{m["input_name"]}`: float32 N x {chw},
normalised with mean {m["mean"]} and std {m["std"]}; batch {p["shapes"]["min"][0]} to {p["shapes"]["max"][0]}.
Reference accuracy: {acc}.

Meant for TensorRT {" or ".join(t["tensorrt"])}, GPUs of SM {t["sm"]}. {t["jetson"]}.

On the device:

    {c["build"]:<24}  # trtexec -> model.engine, layers.json, build.log ({c["build_dla"]} for DLA)
    {c["verify"]:<24}  # engine vs PyTorch's logits on inputs.npz; exit 0 agrees, 4 does not
    {c["bench"]:<24}  # trtexec timings -> times-bN.json

Without TensorRT, `{c["verify_without_tensorrt"]}` checks model.onnx with ONNX Runtime. Where craft-deploy is
installed, `{c["bench_record"]}` turns the timings into a bench.json for `craft-deploy bench --baseline`.
manifest.json holds the sha256 of every file; verify.py refuses a package whose files changed.
"""
