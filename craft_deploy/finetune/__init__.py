"""Fine-tuning stage: pretrained timm model + dataset -> fine-tuned bundle and finetune.json."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from craft_deploy import CraftError
from craft_deploy.artifacts import atomic_write_bytes, check_out_dir, partial_dir, staged_dir
from craft_deploy.config import FinetuneConfig
from craft_deploy.data import load_splits
from craft_deploy.evaluate import evaluate
from craft_deploy.finetune.distributed import Dist, setup, teardown
from craft_deploy.finetune.optimizers import OPTIMIZERS, build_method, optimizer_class, register_optimizer
from craft_deploy.finetune.trainer import CHECKPOINT, load_checkpoint, train
from craft_deploy.models import data_config, load_model, save_bundle
from craft_deploy.models.bundle import make_manifest
from craft_deploy.records import stage_entry, write_record

__all__ = ["OPTIMIZERS", "build_method", "register_optimizer", "run"]


def find_checkpoint(resume: str | Path) -> Path:
    """The checkpoint of a killed run: `resume` is its --out, its partial directory, or the checkpoint file."""
    resume = Path(resume)
    candidates = [resume] if resume.suffix == ".pt" else [resume / CHECKPOINT, partial_dir(resume) / CHECKPOINT]
    for c in candidates:
        if c.is_file():
            return c
    raise CraftError(
        f"--resume {resume}: no checkpoint of a killed run there (looked for {', '.join(map(str, candidates))})"
    )


def check_same_run(saved: dict[str, Any], cfg: FinetuneConfig) -> None:
    """A checkpoint continues only the run it came from: every setting but --threads must match."""
    now = cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k != "threads" and saved.get(k) != now[k]}
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise CraftError(f"--resume continues the same run only; the checkpoint differs in {shown}")


def _write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def run(
    cfg: FinetuneConfig, out: str | Path, overwrite: bool = False, resume: str | Path | None = None
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and write the bundle and `finetune.json` into `out`.

    Work in progress lives in `partial_dir(out)`: a checkpoint, `finetune.json` (status "running") and `history.csv`,
    rewritten after every epoch. A killed run is continued with `resume` (its --out, or that directory).
    """
    optimizer_class(cfg.optimizer)  # fail on a bad name before any work
    check_out_dir(out, overwrite)
    state = None
    if resume is not None:
        state = load_checkpoint(find_checkpoint(resume))
        check_same_run(state["config"], cfg)
    elif (partial_dir(out) / CHECKPOINT).is_file():
        if not overwrite:
            raise CraftError(
                f"a killed run left a checkpoint in {partial_dir(out)}; continue it with --resume {out}, "
                "or pass --overwrite to start over"
            )
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 owns the output
            shutil.rmtree(partial_dir(out))
    dist = setup(cfg.device)
    try:
        if not dist.main:  # other torchrun ranks train in lockstep and write nothing
            model, _, splits = _prepare(cfg)
            train(model, splits, cfg, resume=state, dist=dist)
            return {}
        return _run_main(cfg, out, overwrite, state, dist)
    finally:
        teardown(dist)


def _prepare(cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The seeded model (head reset to the dataset's classes), its data config and the splits."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, img_size=cfg.img_size)
    dcfg = data_config(model, cfg.img_size)
    splits = load_splits(
        cfg.data,
        cfg.img_size,
        dcfg["mean"],
        dcfg["std"],
        cfg.data_root,
        cfg.train_subset,
        cfg.eval_subset,
        cfg.seed,
    )
    model.reset_classifier(splits.num_classes)
    return model, dcfg, splits


def _run_main(cfg: FinetuneConfig, out: str | Path, overwrite: bool, state: dict | None, dist: Dist) -> dict[str, Any]:
    with staged_dir(out, overwrite, resumable=True) as stage:
        t_start = time.perf_counter()
        model, dcfg, splits = _prepare(cfg)

        def stream(history: list[dict[str, Any]]) -> None:
            write_record(stage, "finetune", cfg.to_dict(), status="running", data=splits.info, history=history)
            _write_history_csv(stage / "history.csv", history)

        result = train(model, splits, cfg, checkpoint_dir=stage, resume=state, on_epoch=stream, dist=dist)
        test = evaluate(model, splits.test, desc="test")
        manifest = make_manifest(
            cfg.model, splits.num_classes, dcfg["input_size"], dcfg["mean"], dcfg["std"], splits.class_names, cfg.data
        )
        manifest["data"] = splits.info
        manifest["stages"].append(stage_entry("finetune", cfg.to_dict(), test_top1=test["top1"]))
        save_bundle(model, stage, manifest)
        metrics = {
            "val_top1": result["best_val_top1"],
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "test_loss": test["loss"],
        }
        record = write_record(
            stage,
            "finetune",
            cfg.to_dict(),
            status="complete",
            resumed_from_epoch=int(state["epoch"]) if state is not None else None,
            data=splits.info,
            metrics=metrics,
            history=result["history"],
            best_epoch=result["best_epoch"],
            processes=dist.world,
            device=str(dist.device),
            timings={
                "train_seconds": result["train_seconds"],
                "seconds_per_epoch": result["seconds_per_epoch"],
                "total_seconds": time.perf_counter() - t_start,
            },
        )
        if cfg.analyze:
            from craft_deploy.analyze import analyze_model, write_plots
            from craft_deploy.config import AnalyzeConfig

            acfg = AnalyzeConfig(data_root=cfg.data_root, seed=cfg.seed)
            result = analyze_model(model, splits.train, acfg)
            write_record(stage, "analyze", acfg.to_dict(), source=str(out), plots=write_plots(result, stage), **result)
            record["sharpness"] = {k: v for k, v in result["sharpness"].items() if k != "trace"}
        (stage / CHECKPOINT).unlink()  # the bundle is the result; the checkpoint was only for resuming
    return record
