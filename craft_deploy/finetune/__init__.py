"""Fine-tuning stage: pretrained timm model + dataset -> fine-tuned bundle and finetune.json."""

from __future__ import annotations

import copy
import csv
import io
import os
import shutil
import time
from dataclasses import dataclass, field
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
from craft_deploy.finetune.recovery import (
    MaskKeeper,
    keep_positive,
    learn_activation_scales,
    load_teacher,
    teacher_path,
)
from craft_deploy.finetune.trainer import CHECKPOINT, load_checkpoint, train
from craft_deploy.models import Bundle, data_config, load_bundle, load_model, save_bundle
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
    check_out_dir(out, overwrite, inputs=[cfg.init, cfg.teacher])
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
            prep = _prepare(cfg)
            train(prep.model, prep.splits, cfg, resume=state, dist=dist, **prep.train_kwargs())
            return {}
        return _run_main(cfg, out, overwrite, state, dist)
    finally:
        teardown(dist)


@dataclass
class _Setup:
    """What a fine-tune trains: the model, its data config and splits, and for recovery the compressed bundle it
    continues, the teacher and the mask keeper."""

    model: torch.nn.Module
    dcfg: dict[str, Any]
    splits: Any
    init: Bundle | None = None
    teacher: torch.nn.Module | None = None
    teacher_path: str | None = None
    masks: MaskKeeper | None = None
    scales: list = field(default_factory=list)  # --learn-scales: the activation scales being trained
    tunecomp: Any = None  # --method tunecomp: finetune.tunecomp.TuneComp

    def after_step(self) -> None:
        if self.masks is not None:
            self.masks.apply()
        keep_positive(self.scales)

    def train_kwargs(self) -> dict[str, Any]:
        if self.tunecomp is not None:
            tc = self.tunecomp
            return {"teacher": self.teacher, "after_step": tc.after_step, "extra_loss": tc.extra_loss,
                    "eligible": tc.eligible}  # fmt: skip
        return {"teacher": self.teacher, "after_step": self.after_step if self.init is not None else None}


def _prepare(cfg: FinetuneConfig) -> _Setup:
    """The seeded model (head reset to the dataset's classes, or the --init bundle as it is), data config, splits."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init is not None:
        return _prepare_recovery(cfg)
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
    setup = _Setup(model, dcfg, splits)
    if cfg.method == "tunecomp":
        setup.tunecomp = _tunecomp(model, splits, cfg)
    if cfg.teacher is not None and cfg.kd_alpha > 0:
        setup.teacher_path = cfg.teacher
        task = {"num_classes": splits.num_classes, "input_size": dcfg["input_size"], "dataset": cfg.data}
        setup.teacher = load_teacher(cfg.teacher, task)
    return setup


def _tunecomp(model: torch.nn.Module, splits, cfg: FinetuneConfig):
    """The pretrained model set up for TuneComp: every factorisable layer a dense branch fading into its
    activation-aware low-rank student over the first `transition` of the run's steps."""
    from craft_deploy.compress.lowrank import LowRankConfig
    from craft_deploy.data import calibration_subset
    from craft_deploy.finetune.tunecomp import TuneComp
    from craft_deploy.toolkit.registry import calib_loop

    steps = cfg.epochs * (len(splits.train) // cfg.batch_size)
    calib = calib_loop(calibration_subset(splits.train, min(cfg.calib_samples, len(splits.train)), cfg.seed))
    lowrank = LowRankConfig(rank_ratio=cfg.rank_ratio, rank_energy=cfg.rank_energy, rank_multiple=cfg.rank_multiple)
    return TuneComp(
        model, lowrank, calib, steps, cfg.transition, cfg.prune_ratio, cfg.reg_weight,
        prune_schedule=cfg.prune_schedule,
    )  # fmt: skip


def _prepare_recovery(cfg: FinetuneConfig) -> _Setup:
    """--init: the compressed bundle with its quantizers and masks, on the data, input size and split seed it was
    tuned with (its test images are the ones it was measured on), and the teacher to distil from."""
    bundle = load_bundle(cfg.init)
    m = bundle.manifest
    dcfg = {k: m[k] for k in ("input_size", "mean", "std")}
    data = m.get("data") or {}
    splits = load_splits(
        m.get("dataset") or cfg.data,
        m["input_size"][-1],
        m["mean"],
        m["std"],
        cfg.data_root or data.get("root"),
        cfg.train_subset,
        cfg.eval_subset,
        int(data.get("seed", cfg.seed)),
    )
    setup = _Setup(bundle.model, dcfg, splits, init=bundle, masks=MaskKeeper(bundle.model, m))
    if cfg.learn_scales:
        setup.scales = learn_activation_scales(bundle.model)
        if not setup.scales:
            raise CraftError(f"--learn-scales: {cfg.init} has no quantized activations (weight-only or not quantized)")
    if cfg.kd_alpha > 0:
        setup.teacher_path = teacher_path(cfg.init, m, cfg.teacher)
        setup.teacher = load_teacher(setup.teacher_path, m)
    return setup


def _finish_recovery(cfg: FinetuneConfig, prep: _Setup) -> dict[str, Any]:
    """After recovery: masks removed from the optimizer's hooks and checked exact, BatchNorm re-estimated under the
    compressed forward pass on calibration images; returns what the manifest records of it."""
    from craft_deploy.data import calibration_subset
    from craft_deploy.toolkit.batchnorm import recalibrate_batchnorm
    from craft_deploy.toolkit.bias_bound import batchnorm_after, fit_biases_to_int32
    from craft_deploy.toolkit.qmodules import quantized_layers
    from craft_deploy.toolkit.registry import calib_loop

    prep.masks.remove()
    prep.masks.apply()
    calib = calibration_subset(prep.splits.train, min(cfg.calib_samples, len(prep.splits.train)), cfg.seed)
    layers = quantized_layers(prep.model)
    with batchnorm_after(prep.model, layers) as following:
        bn = recalibrate_batchnorm(prep.model, calib_loop(calib))
    biases = fit_biases_to_int32(layers, following)  # trained biases and new statistics: back on the int32 grid
    return {
        "init": str(cfg.init),
        "pruned_layers": len(prep.masks.masks),
        "bn_recalibrated": bn,
        "int32_biases": biases,
    }


def _run_main(cfg: FinetuneConfig, out: str | Path, overwrite: bool, state: dict | None, dist: Dist) -> dict[str, Any]:
    with staged_dir(out, overwrite, resumable=True) as stage:
        t_start = time.perf_counter()
        prep = _prepare(cfg)
        model, dcfg, splits = prep.model, prep.dcfg, prep.splits

        def stream(history: list[dict[str, Any]]) -> None:
            write_record(stage, "finetune", cfg.to_dict(), status="running", data=splits.info, history=history)
            _write_history_csv(stage / "history.csv", history)

        result = train(
            model, splits, cfg, checkpoint_dir=stage, resume=state, on_epoch=stream, dist=dist, **prep.train_kwargs()
        )
        extra: dict[str, Any] = {}
        methods: list[dict[str, Any]] = []
        if prep.init is not None:
            extra["recovery"] = _finish_recovery(cfg, prep)
        if prep.tunecomp is not None:
            methods, extra["tunecomp"] = prep.tunecomp.finish()
        test = evaluate(model, splits.test, desc="test")
        if prep.init is not None:
            manifest = copy.deepcopy(prep.init.manifest)  # its methods (quantizers, masks) stay as they are
        else:
            manifest = make_manifest(
                cfg.model, splits.num_classes, dcfg["input_size"], dcfg["mean"], dcfg["std"], splits.class_names,
                cfg.data,
            )  # fmt: skip
            manifest["data"] = splits.info
            manifest["methods"] += methods  # TuneComp's factorisation (and the factors' pruning)
        if prep.teacher_path:
            extra["teacher"] = prep.teacher_path
        manifest["stages"].append(stage_entry("finetune", cfg.to_dict(), test_top1=test["top1"], **extra))
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
            **extra,
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
