"""Deployment targets: an exported artifact of one format, verified against PyTorch, and export.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
