"""Compression stage: bundle -> pruned and/or quantized bundle and compress.json."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from craft_deploy import CraftError
from craft_deploy.artifacts import check_out_dir, staged_dir
from craft_deploy.compress.lowrank import LowRankConfig
from craft_deploy.compress.prune import PruneConfig, sparsity_report
from craft_deploy.compress.quant import QuantConfig
from craft_deploy.config import CompressConfig, parse_sparsity
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle, save_bundle
from craft_deploy.records import stage_entry, write_record
from craft_deploy.toolkit.flags import nonempty
from craft_deploy.toolkit.registry import (
    METHODS,
    CalibLoop,
    Method,
    MethodConfig,
    calib_loop,
    manifest_entry,
    method_configs,
    method_flags,
    method_for,
    method_state,
    register_method,
)

__all__ = [
    "METHODS",
    "CalibLoop",
    "LowRankConfig",
    "Method",
    "MethodConfig",
    "PruneConfig",
    "QuantConfig",
    "bundle_sparsity",
    "calib_loop",
    "from_flags",
    "register_method",
    "run",
]


DATA_FLAGS = ("calib_samples", "eval_subset", "data_root", "seed")
"""The keywords of `from_flags` that are CompressConfig's own (the calibration and evaluation data)."""


def from_flags(include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), **flags: Any) -> CompressConfig:
    """The CompressConfig the `compress` flags describe, built by the registered methods themselves: every method
    whose trigger flag is set (`--rank-ratio`, `--sparsity`, `--quant`, a plugin's) builds its config from the flag
    values, in the methods' order, each validating its own values. `flags` are keyword names of the methods' flags
    (`method_flags()`) plus calib_samples, eval_subset, data_root and seed."""
    data = {k: flags.pop(k) for k in DATA_FLAGS if k in flags}
    registered = method_flags()
    unknown = sorted(set(flags) - set(registered))
    if unknown:
        raise TypeError(f"from_flags() got unknown flag(s) {unknown}; the registered methods take {sorted(registered)}")
    values = {key: cls.flag_default(flag) for key, (flag, cls) in registered.items()}
    values.update(flags)
    stray: dict[str, list[str]] = {}
    for key, (flag, cls) in registered.items():
        if flag.needs and values[key] != cls.flag_default(flag) and not nonempty(values.get(flag.needs)):
            value = values[key]
            stray.setdefault(flag.needs, []).append(flag.option if value is True else f"{flag.option} {value}")
    for needs, options in stray.items():
        need = registered[needs][0]
        raise CraftError(
            f"{', '.join(options)} given alone: they need {need.option} (e.g. {need.option} {need.first_example()})"
        )
    methods = [cls.from_flags(values, include, exclude) for cls in method_configs() if cls.asked_for(values)]
    return CompressConfig(methods=tuple(methods), **data)


def run(cfg: CompressConfig, bundle_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Prune and/or quantize the bundle at `bundle_path`; write the compressed bundle and compress.json to `out`."""
    check_out_dir(out, overwrite, inputs=[bundle_path])
    bundle = load_bundle(bundle_path)
    with staged_dir(out, overwrite) as stage:
        t_start = time.perf_counter()
        splits = splits_for_manifest(bundle.manifest, cfg.data_root, cfg.eval_subset)
        calib = calibration_subset(splits.train, cfg.calib_samples, cfg.seed)
        model = bundle.model
        check_includes(cfg, model, bundle_path)
        before = evaluate(model, splits.test, desc="test (before)")
        manifest = copy.deepcopy(bundle.manifest)
        reports: list[dict[str, Any]] = []
        timings: dict[str, float] = {}
        for mcfg in cfg.methods:
            method = method_for(mcfg)
            t0 = time.perf_counter()
            report = method.apply(model, mcfg, calib_loop(calib))
            timings[type(mcfg).__name__] = time.perf_counter() - t0
            manifest["methods"].append(manifest_entry(mcfg, report))
            reports.append({"method": method.name, **{k: v for k, v in report.items() if k != "state"}})
        after = evaluate(model.eval(), splits.test, desc="test (after)")
        manifest["stages"].append(
            stage_entry("compress", cfg.to_dict(), test_top1=after["top1"], source=str(Path(bundle_path).resolve()))
        )
        save_bundle(model, stage, manifest)
        record = write_record(
            stage,
            "compress",
            cfg.to_dict(),
            source=str(bundle_path),
            data=splits.info,
            calibration={"samples": len(calib), "split": "train"},
            metrics={
                "test_top1_before": before["top1"],
                "test_top1_after": after["top1"],
                "test_top1_drop": before["top1"] - after["top1"],
                "test_top5_after": after["top5"],
            },
            methods=reports,
            timings={**timings, "total_seconds": time.perf_counter() - t_start},
        )
    return record


def check_includes(cfg: CompressConfig, model: nn.Module, bundle_path: str | Path) -> None:
    """CraftError for an include entry without glob characters (an exact layer name, as a per-layer recipe writes)
    that names no Linear/Conv layer of the model: a typo would otherwise compress nothing."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    missing = sorted(
        {p for mcfg in cfg.methods for p in mcfg.include if not any(c in p for c in "*?[") and p not in layers}
    )
    if missing:
        raise CraftError(
            f"layer(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} named for compression are not "
            f"Linear/Conv layers of {bundle_path}; it has e.g. {', '.join(layers[1:4])}"
        )


def bundle_sparsity(bundle_path: str | Path) -> dict[str, Any]:
    """Sparsity report of any bundle: every Linear/Conv layer's zeros, its recorded target and N:M validity."""

    bundle = load_bundle(bundle_path)
    recorded = method_state(bundle.manifest, "prune") or {}
    parsed = parse_sparsity(recorded.get("pattern", "").replace("unstructured ", "")) if recorded else None
    n, m = parsed[1] if parsed and parsed[0] == "nm" else (None, None)
    target = (1 - n / m) if n else (parsed[1] if parsed else None)
    pruned = recorded.get("layers", {})
    layers = {
        name: {"target": target if name in pruned else None}
        for name, mod in bundle.model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
    }
    report = sparsity_report(bundle.model, layers, n, m)
    for name, row in report["layers"].items():
        if name not in pruned:
            row.pop("nm_valid", None)
    report["pattern"] = recorded.get("pattern")
    return report
