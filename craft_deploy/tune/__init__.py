"""Per-layer recipes (issue 28). Built so far: the sensitivity table (`--analyze-only`): every treatment's cost on
every layer alone, validated on held-out images, with a plot. The search under an accuracy budget that will read it
is not built yet, and `tune` without `--analyze-only` says so."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from craft_deploy import CraftError
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.config import TuneConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.models import load_bundle
from craft_deploy.records import write_record
from craft_deploy.tune.sensitivity import TREATMENTS, check_treatments, sensitivity_table, validate_rows

__all__ = ["TREATMENTS", "run"]


def run(cfg: TuneConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write tune.json (the sensitivity table and its validation) and sensitivity.png to `out`."""
    if not cfg.analyze_only:
        raise CraftError(
            "the per-layer recipe search of craft-deploy tune is not built yet; --analyze-only writes the "
            "per-layer sensitivity table it will search over"
        )
    check_treatments(cfg.treatments)
    check_out_dir(out, overwrite, inputs=[bundle_path])
    bundle = load_bundle(bundle_path)
    with staged_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        splits = splits_for_manifest(bundle.manifest, cfg.data_root, cfg.eval_subset)
        calib = calibration_subset(splits.train, cfg.calib_samples, cfg.seed)
        model = bundle.model.eval()
        rows = sensitivity_table(model, calib, cfg.treatments, cfg.prune_method)
        t1 = time.perf_counter()
        validation = validate_rows(model, rows, calib, splits.test, cfg.validate, cfg.prune_method, cfg.seed)
        plots = write_plot(rows, stage)
        record = write_record(
            stage,
            "tune",
            cfg.to_dict(),
            source=str(bundle_path),
            data=splits.info,
            calibration={"samples": len(calib), "split": "train"},
            sensitivity=rows,
            validation=validation,
            plots=plots,
            timings={"sensitivity_seconds": t1 - t0, "total_seconds": time.perf_counter() - t0},
        )
    return record


def write_plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """sensitivity.png: KL per layer (forward order) for each treatment, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.18), 4))
    for treatment in dict.fromkeys(r["treatment"] for r in rows):
        pts = [
            (layers.index(r["layer"]), max(r["kl"], 1e-9)) for r in rows if r["treatment"] == treatment and "kl" in r
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="", markersize=3, label=treatment)
    ax.set(yscale="log", xlabel="layer (forward order)", ylabel="KL(dense || treated), calibration images",
           title="cost of each treatment on one layer alone")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=100)
    plt.close(fig)
    return ["sensitivity.png"]
