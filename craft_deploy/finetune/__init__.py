"""Fine-tuning stage: pretrained timm model + dataset -> fine-tuned bundle and finetune.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from craft_deploy.artifacts import staged_dir
from craft_deploy.config import FinetuneConfig
from craft_deploy.data import load_splits
from craft_deploy.evaluate import evaluate
from craft_deploy.finetune.optimizers import OPTIMIZERS, build_method, optimizer_class, register_optimizer
from craft_deploy.finetune.trainer import train
from craft_deploy.models import data_config, load_model, save_bundle
from craft_deploy.models.bundle import make_manifest
from craft_deploy.records import stage_entry, write_record

__all__ = ["OPTIMIZERS", "build_method", "register_optimizer", "run"]


def run(cfg: FinetuneConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and write the bundle and `finetune.json` into `out`."""
    optimizer_class(cfg.optimizer)  # fail on a bad name before any work
    with staged_dir(out, overwrite) as stage:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        t_start = time.perf_counter()
        model = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
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
        result = train(model, splits, cfg)
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
            data=splits.info,
            metrics=metrics,
            history=result["history"],
            best_epoch=result["best_epoch"],
            timings={
                "train_seconds": result["train_seconds"],
                "seconds_per_epoch": result["seconds_per_epoch"],
                "total_seconds": time.perf_counter() - t_start,
            },
        )
    return record
