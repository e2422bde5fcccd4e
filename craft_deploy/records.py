"""The JSON records every stage writes: schema, config, metrics, timings, environment, git sha."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from craft_deploy import __version__
from craft_deploy.artifacts import atomic_write_json

RECORD_SCHEMA = "craft-deploy/record/v1"
_LIBS = (
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "torch-tensorrt",
    "openvino",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    """The git commit of the craft-deploy checkout that produced a record, if it runs from one."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Library versions, CPU, GPU (only if torch already sees CUDA) and the command line."""
    import torch

    env: dict[str, Any] = {
        "craft_deploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "libraries": {name: _version(name) for name in _LIBS},
        "git_sha": git_sha(),
        "command": sys.argv,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["gpu_driver"] = gpu_driver()
    return env


def gpu_driver() -> str | None:
    """The NVIDIA driver version, from nvidia-smi where it is on PATH."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def write_record(out_dir: Path, stage: str, config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Write `<out_dir>/<stage>.json` atomically and return the record."""
    record = {
        "schema": RECORD_SCHEMA,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        **fields,
        "environment": environment(),
    }
    atomic_write_json(Path(out_dir) / f"{stage}.json", record)
    return record


def stage_entry(stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The entry a stage appends to a bundle manifest's `stages`."""
    return {"stage": stage, "config": config, "git_sha": git_sha(), "craft_deploy": __version__, **extra}
