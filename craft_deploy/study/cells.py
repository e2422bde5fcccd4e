"""A study cell: one unit of work (a fine-tune, a diagnostic, a compression, a recovery, a deployment) with its own
directory and record.

A cell is described by a JSON-able spec, so that any executor (this process, a local worker process, a Ray task) can
run it with `run_cell(spec, root, threads)`. It writes `cells/<id>/cell.json` last, atomically: a cell is finished
exactly when that file exists, so a killed study resumes at the first cell without one. A cell whose stage raises is
recorded with `status: error` and the error; the study goes on.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_json, partial_dir, read_json

CELL_SCHEMA = 1
CELL_RECORD = "cell.json"


def backend_parts(spelling: str) -> tuple[str, str | None]:
    """A study backend `name` or `name@precision` (e.g. openvino@bf16, the runtime at another precision hint) as
    (registered backend name, precision or None). `@`, not `:`: the spelling names cell directories and plot files."""
    name, _, precision = spelling.partition("@")
    return name, precision or None


def export_format_for(backend: str) -> str | None:
    """The export target that writes what `backend` runs (None: it runs the bundle itself)."""
    from craft_deploy.bench.backends import get_backend
    from craft_deploy.export.targets import target_for

    target = target_for(get_backend(backend_parts(backend)[0]).needs)
    return target.name if target else None


def cell_dir(root: str | Path, cell_id: str) -> Path:
    return Path(root) / "cells" / cell_id


def read_cell(root: str | Path, cell_id: str) -> dict[str, Any] | None:
    path = cell_dir(root, cell_id) / CELL_RECORD
    return read_json(path, "study cell record") if path.is_file() else None


def write_cell(root: str | Path, spec: dict[str, Any], **fields: Any) -> dict[str, Any]:
    record = {"schema": CELL_SCHEMA, "id": spec["id"], "kind": spec["kind"], "spec": spec, **fields}
    atomic_write_json(cell_dir(root, spec["id"]) / CELL_RECORD, record)
    return record


def run_cell(spec: dict[str, Any], root: str, threads: int) -> dict[str, Any]:
    """Run one cell with `threads` CPU threads and write its record; failures are recorded, never raised (except
    Ctrl-C, which stops the study and leaves the cell unfinished)."""
    import torch

    torch.set_num_threads(threads)
    d = cell_dir(root, spec["id"])
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        metrics = _KINDS[spec["kind"]](spec, Path(root), d, threads)
    except Exception as e:  # a failed cell is a result: recorded with its error, the study goes on
        tail = traceback.format_exc().strip().splitlines()[-6:]
        msg = str(e) if isinstance(e, CraftError) else f"{type(e).__name__}: {e}"
        return write_cell(root, spec, status="error", error=msg[:2000], traceback=tail,
                          seconds=time.perf_counter() - t0, threads=threads)  # fmt: skip
    return write_cell(root, spec, status="ok", metrics=metrics, seconds=time.perf_counter() - t0, threads=threads)


def _finetune(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    """Fine-tune, or adopt a finished fine-tune already in place with the same settings, or continue a killed one."""
    from craft_deploy.config import FinetuneConfig
    from craft_deploy.finetune import check_same_run

    cfg = FinetuneConfig.from_dict({**spec["config"], "threads": threads})
    out = d / "bundle"
    done = out / "finetune.json"
    reused = done.is_file()
    if reused:
        rec = read_json(done, "finetune record")
        saved = FinetuneConfig.from_dict(rec["config"]).to_dict()  # JSON lists back to the config's tuples
        check_same_run(saved, cfg)  # a bundle with other settings is refused, not silently adopted
    else:
        rec = _fine_tune(cfg, out)
    return {
        "test_top1": rec["metrics"]["test_top1"],
        "seconds_per_epoch": rec["timings"]["seconds_per_epoch"],
        "reused": reused,
    }


def _fine_tune(cfg, out: Path) -> dict[str, Any]:
    """finetune.run into `out`, continuing the run a killed study left there (its epoch checkpoint) if there is one."""
    from craft_deploy.finetune import run
    from craft_deploy.finetune.trainer import CHECKPOINT

    resume = out if (partial_dir(out) / CHECKPOINT).is_file() else None
    return run(cfg, out, overwrite=True, resume=resume)


def _analyze(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    from craft_deploy.analyze import run
    from craft_deploy.config import AnalyzeConfig

    rec = run(AnalyzeConfig.from_dict(spec["config"]), root / spec["source"], d / "analyze", overwrite=True)
    sharp = rec["sharpness"]
    return {"lambda_max": sharp["lambda_max"], "lambda_converged": sharp["converged"]}


def _compress(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    from craft_deploy.compress import from_flags, run

    cfg = from_flags(**spec["config"])
    rec = run(cfg, root / spec["source"], d / "bundle", overwrite=True)
    m = rec["metrics"]
    return {
        "test_top1_before": m["test_top1_before"],
        "test_top1": m["test_top1_after"],
        "test_top5": m["test_top5_after"],
    }


def _train(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    """Recovery (--init) and TuneComp are fine-tunes with a different starting point."""
    from craft_deploy.config import FinetuneConfig

    conf = dict(spec["config"])
    if spec["kind"] == "recover":
        conf["init"] = str(root / spec["source"])
    rec = _fine_tune(FinetuneConfig.from_dict({**conf, "threads": threads}), d / "bundle")
    return {"test_top1": rec["metrics"]["test_top1"], "seconds_per_epoch": rec["timings"]["seconds_per_epoch"]}


def _deploy(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    """Export the cell's bundle for the backend (when it needs an exported file), then bench accuracy and latency."""
    from craft_deploy import bench, export
    from craft_deploy.config import BenchConfig, ExportConfig

    source = root / spec["source"]
    fmt = export_format_for(spec["config"]["bench"]["backend"])
    model = source
    if fmt is not None:
        export.run(ExportConfig.from_dict({**spec["config"]["export"], "format": fmt}), source, d / "export", True)
        model = d / "export"
    rec = bench.run(BenchConfig.from_dict({**spec["config"]["bench"], "threads": threads}), model, d / "bench", True)
    rows = rec["results"]
    return {
        "top1": rows[0]["top1"],
        "samples": rows[0]["samples"],
        "size_bytes": rows[0]["model_size_bytes"],
        "latency_ms": {str(r["batch"]): r["p50_ms"] for r in rows},
        "latency_cv": {str(r["batch"]): r["cv"] for r in rows},
        "backend_info": next(iter(rec["models"].values()))["backend_info"],
    }


def _speed(spec: dict[str, Any], root: Path, d: Path, threads: int) -> dict[str, Any]:
    """Time one deployed model per recipe side by side, round-robin (bench --rounds), in one process: the latency
    ratios the recommendation quotes, free of the drift between cells benched minutes apart."""
    from craft_deploy import bench
    from craft_deploy.config import BenchConfig

    paths = {os.path.normpath(str(root / path)): row for row, path in spec["models"]}
    rec = bench.run(BenchConfig.from_dict({**spec["config"], "threads": threads}), list(paths), d / "bench", True)
    latency: dict[str, dict[str, float]] = {}
    passes: dict[str, dict[str, list[float]]] = {}
    for r in rec["results"]:
        row = paths[r["model"]]
        latency.setdefault(row, {})[str(r["batch"])] = r["p50_ms"]
        passes.setdefault(row, {})[str(r["batch"])] = r.get("round_p50_ms", [r["p50_ms"]])
    return {"latency_ms": latency, "round_p50_ms": passes}


_KINDS = {
    "finetune": _finetune,
    "analyze": _analyze,
    "compress": _compress,
    "recover": _train,
    "tunecomp": _train,
    "deploy": _deploy,
    "speed": _speed,
}
