"""Diagnostics of compressibility: sharpness (lambda_max), weight rank, activation ranges; analyze.json and plots."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from craft_deploy.analyze.sharpness import lambda_max, power_iteration
from craft_deploy.analyze.structure import activation_ranges, model_cost, weight_rank
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.config import AnalyzeConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.models import load_bundle
from craft_deploy.records import write_record

__all__ = ["activation_ranges", "analyze_model", "lambda_max", "model_cost", "power_iteration", "run", "weight_rank"]


def analyze_model(model: nn.Module, train_split, cfg: AnalyzeConfig) -> dict[str, Any]:
    """lambda_max on a fixed set of training images, weight rank, activation ranges on calibration images, and the
    model's parameters and multiply-adds per image (model_cost)."""
    from craft_deploy.toolkit.registry import calib_loop

    t0 = time.perf_counter()
    fixed = list(DataLoader(calibration_subset(train_split, cfg.lambda_images, seed=cfg.seed + 1), batch_size=32))
    sharp = lambda_max(
        copy.deepcopy(model),
        nn.CrossEntropyLoss(),
        fixed,
        cfg.lambda_iters,
        cfg.lambda_tol,
        cfg.seed,
        batchnorm=cfg.lambda_batchnorm,
    )
    sharp["seconds"] = time.perf_counter() - t0
    ranges = activation_ranges(model, calib_loop(calibration_subset(train_split, cfg.calib_samples, cfg.seed)))
    cost = model_cost(model, tuple(train_split[0][0].shape))
    return {"sharpness": sharp, "weight_rank": weight_rank(model), "activation_ranges": ranges, "cost": cost}


def write_plots(result: dict[str, Any], out: Path) -> list[str]:
    """lambda_trace.png, weight_rank.png, activation_ranges.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    trace = result["sharpness"]["trace"]
    axes[0].plot(range(1, len(trace) + 1), trace, marker="o")
    axes[0].set(
        title=f"lambda_max = {result['sharpness']['lambda_max']:.2f}",
        xlabel="power iteration",
        ylabel="Rayleigh quotient",
    )
    ranks = result["weight_rank"]
    axes[1].bar(range(len(ranks)), [r["rank_fraction_80"] for r in ranks.values()])
    axes[1].set(title="components for 80% of weight energy", xlabel="layer (forward order)", ylabel="fraction of rank")
    acts = result["activation_ranges"]
    axes[2].bar(range(len(acts)), [a["outlier_ratio"] for a in acts.values()])
    axes[2].set(
        title="activation outlier ratio per block",
        xlabel="block (forward order)",
        ylabel="max / median channel |range|",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "analyze.png", dpi=100)
    plt.close(fig)
    return ["analyze.png"]


def run(cfg: AnalyzeConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Analyze the bundle at `bundle_path`; write analyze.json and analyze.png to `out`."""
    check_out_dir(out, overwrite, inputs=[bundle_path])
    bundle = load_bundle(bundle_path)
    with staged_dir(out, overwrite) as stage:
        splits = splits_for_manifest(bundle.manifest, cfg.data_root)
        result = analyze_model(bundle.model, splits.train, cfg)
        plots = write_plots(result, stage)
        record = write_record(stage, "analyze", cfg.to_dict(), source=str(bundle_path), plots=plots, **result)
    return record
