"""`bench --from-trtexec`: latency that trtexec measured on a device (a device package's `bench.sh` writes
`times-bN.json` per batch size with `--exportTimes`) as an ordinary bench.json, so that the regression gate can run
on it. trtexec's records are one dict per inference with `latencyMs` (input copy + compute + output copy; with
`--noDataTransfers` the compute alone). Accuracy is not measured by trtexec: those rows carry no top-1 and the gate
checks latency only (verify.py checks the engine's outputs on the device).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from craft_deploy import CraftError
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.bench.gate import BENCH_SCHEMA, compare, gate_record, read_baseline
from craft_deploy.bench.measure import latency_stats
from craft_deploy.bench.report import write_markdown, write_plots
from craft_deploy.config import BenchConfig
from craft_deploy.records import write_record

BACKEND = "tensorrt (trtexec)"
TIMES = re.compile(r"times-b(\d+)\.json$")


def read_times(path: Path) -> list[float]:
    """Per-inference latencies (ms) of a trtexec --exportTimes file."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CraftError(f"{path} is not a trtexec --exportTimes JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(records, list):
        raise CraftError(f"{path}: a trtexec --exportTimes file is a JSON list of per-inference records")
    times = [r["latencyMs"] for r in records if isinstance(r, dict) and isinstance(r.get("latencyMs"), (int, float))]
    if not times:
        raise CraftError(f"{path} holds no per-inference 'latencyMs' records; write it with trtexec --exportTimes")
    return [float(t) for t in times]


def _times_files(path: Path) -> tuple[Path, list[tuple[int, Path]]]:
    """(package directory, [(batch, times file)]) for a package directory or one times-bN.json file."""
    if path.is_dir():
        files = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := TIMES.search(p.name)))
        if not files:
            raise CraftError(f"{path} holds no times-bN.json: run the package's bench.sh on the device first")
        return path, files
    m = TIMES.search(path.name)
    if not m or not path.is_file():
        raise CraftError(f"{path}: give a device package directory or a times-bN.json file (N = the batch size)")
    return path.parent, [(int(m.group(1)), path)]


def run(cfg: BenchConfig, paths: list[str | Path], out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """bench.json (and report.md, plots, the gate's verdict) from trtexec timings."""
    if not paths:
        raise CraftError("give at least one device package directory (or times-bN.json file)")
    check_out_dir(out, overwrite, inputs=paths)
    found = [(Path(p), *_times_files(Path(p))) for p in paths]
    baseline = read_baseline(cfg.baseline) if cfg.baseline and not cfg.update_baseline else None
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        results, models = [], {}
        for given, package, files in found:
            name = str(given)
            manifest_path = package / "manifest.json"
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
            engine = package / "model.engine"
            size = engine.stat().st_size if engine.is_file() else None
            models[name] = {
                "architecture": (manifest.get("model") or {}).get("architecture"),
                "precision": manifest.get("precision"),
                "sparsity": manifest.get("sparsity"),
                "size_bytes": size,
                "backend_info": {"source": "trtexec --exportTimes", "files": [p.name for _, p in files]},
            }
            for batch, path in files:
                results.append(
                    {
                        "model": name,
                        "backend": BACKEND,
                        "batch": batch,
                        **latency_stats(read_times(path), batch),
                        "remeasured": 0,
                        "top1": None,
                        "top5": None,
                        "samples": 0,
                        "dataset": (manifest.get("model") or {}).get("dataset"),
                        "split": None,
                        "model_size_bytes": size,
                    }
                )
        gate = None
        if baseline is not None:
            verdict = compare(
                {"models": models, "results": results}, baseline, cfg.max_latency_regression, cfg.max_accuracy_drop
            )
            gate = gate_record(cfg, verdict)
        record = write_record(
            stage,
            "bench",
            {**cfg.to_dict(), "backend": BACKEND},
            bench_schema=BENCH_SCHEMA,
            models=models,
            results=results,
            gate=gate,
            plots=write_plots(results, stage),
            timings={"total_seconds": time.perf_counter() - t0},
        )
        write_markdown(record, stage / "report.md")
    if cfg.update_baseline:
        from craft_deploy.artifacts import atomic_write_json

        atomic_write_json(cfg.baseline, record)
    return record
