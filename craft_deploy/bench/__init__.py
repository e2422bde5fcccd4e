"""Bench stage: accuracy and latency of a model on one backend, written to bench.json."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from craft_deploy import CraftError
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.bench.backends import BACKENDS, Backend, get_backend, register_backend
from craft_deploy.bench.measure import measure_accuracy, measure_latency
from craft_deploy.config import BenchConfig
from craft_deploy.data import splits_for_manifest
from craft_deploy.records import write_record

__all__ = ["BACKENDS", "Backend", "register_backend", "resolve_model", "run"]


def resolve_model(path: str | Path, needs: str) -> tuple[Path, dict[str, Any]]:
    """Find the artifact a backend needs at `path` and the model's metadata (input size, mean/std, dataset)."""
    from craft_deploy.models.bundle import MANIFEST, read_manifest

    path = Path(path)
    if not path.exists():
        raise CraftError(f"{path} does not exist")
    if needs == "bundle":
        return path, read_manifest(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            path = path / "model.onnx"
        elif (path / MANIFEST).is_file():
            raise CraftError(f"{path} is a model bundle; export it first (craft-deploy export {path} --out DIR) "
                             "or bench it with --backend pytorch")
        else:
            raise CraftError(f"{path} holds neither model.onnx nor a model bundle")
    import onnx

    from craft_deploy.export.onnx import read_metadata

    try:
        meta = read_metadata(onnx.load(str(path), load_external_data=False))
    except Exception as e:
        raise CraftError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:200]})") from e
    if meta is None:
        raise CraftError(f"{path} carries no craft-deploy metadata (input size, mean/std); export it with "
                         "`craft-deploy export`")
    return path, meta


def run(cfg: BenchConfig, model_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Measure accuracy and latency of the model at `model_path` on `cfg.backend`; write `out/bench.json`."""
    check_out_dir(out, overwrite)
    backend_cls = get_backend(cfg.backend)
    path, meta = resolve_model(model_path, backend_cls.needs)
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        backend = backend_cls(path, cfg.threads)
        splits = splits_for_manifest(meta, cfg.data_root, cfg.eval_subset, dataset=cfg.data)
        ds = splits.test if cfg.split == "test" else splits.val
        accuracy = measure_accuracy(backend, ds)
        accuracy.update(dataset=splits.info["dataset"], split=cfg.split, seed=splits.info["seed"])
        images = next(iter(DataLoader(ds, batch_size=max(cfg.batch_sizes))))[0].numpy()
        rows = []
        for bs in cfg.batch_sizes:
            batch = np.ascontiguousarray(np.resize(images, (bs, *images.shape[1:])))
            stats = measure_latency(backend, batch, cfg.warmup, cfg.iters, cfg.min_seconds)
            rows.append({"backend": cfg.backend, "batch": bs, **stats})
        record = write_record(
            stage, "bench", cfg.to_dict(), model=str(model_path), model_file=str(path),
            model_size_bytes=_size(path), backend={"name": cfg.backend, **backend.info()},
            accuracy=accuracy, latency=rows,
            memory={"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0},
            timings={"total_seconds": time.perf_counter() - t0},
        )
    return record


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
