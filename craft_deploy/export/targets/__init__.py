"""Deployment targets: one registered `--format` each (see base.py); importing this package registers the built-in
ones, in the order `--format` lists them."""

# ruff: noqa: I001  (the order of registration is the order --format lists)
from __future__ import annotations

from craft_deploy.export.targets import onnx_model  # noqa: F401  (each registers its target)
from craft_deploy.export.targets import tensorrt_engine  # noqa: F401
from craft_deploy.export.targets import torch_tensorrt_program  # noqa: F401
from craft_deploy.export.targets import aoti_package  # noqa: F401
from craft_deploy.export.targets import edge_package  # noqa: F401
from craft_deploy.export.targets import openvino_ir  # noqa: F401
from craft_deploy.export.targets.base import TARGETS, ExportJob, Target, register_target, target_for, target_named

__all__ = ["TARGETS", "ExportJob", "Target", "register_target", "target_for", "target_named"]
