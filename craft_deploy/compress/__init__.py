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
from craft_deploy.config import CompressConfig, parse_quant, parse_sparsity
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle, save_bundle
from craft_deploy.records import stage_entry, write_record
from craft_deploy.toolkit.registry import (
    METHODS,
    CalibLoop,
    Method,
    MethodConfig,
    calib_loop,
    manifest_entry,
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


def from_flags(
    sparsity: str | None = None,
    prune_method: str = PruneConfig.score,
    granularity: str = PruneConfig.granularity,
    sequential: bool = PruneConfig.sequential,
    bn_recalibrate: bool = False,
    quant: str | None = None,
    calib_method: str = QuantConfig.calib_method,
    percentile: float = QuantConfig.percentile,
    weight_calib: str | None = QuantConfig.weight_calib,
    weight_granularity: str = QuantConfig.w_granularity,
    group_size: int | None = None,
    act_asymmetric: bool = QuantConfig.act_asymmetric,
    quant_attention: bool = QuantConfig.quant_attention,
    placement: str = QuantConfig.placement,
    weight_rounding: str = QuantConfig.weight_rounding,
    rank_ratio: float | None = None,
    rank_energy: float | None = None,
    rank_multiple: int = LowRankConfig.rank_multiple,
    activation_aware: bool = LowRankConfig.activation_aware,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    **data: Any,
) -> CompressConfig:
    """The CompressConfig the `compress` flags describe: `--sparsity` (N:M or a ratio) becomes a PruneConfig, `--quant
    wXaY` a QuantConfig, `--rank-ratio`/`--rank-energy` a LowRankConfig (applied first), each validating its own
    values; `data` holds calib_samples, eval_subset, data_root, seed."""
    methods: list[MethodConfig] = []
    if rank_ratio is not None or rank_energy is not None:
        methods.append(
            LowRankConfig(include=include, exclude=exclude, rank_ratio=rank_ratio, rank_energy=rank_energy,
                          rank_multiple=rank_multiple, activation_aware=activation_aware,
                          bn_recalibrate=bn_recalibrate and sparsity is None and quant is None)
        )  # fmt: skip
    parsed = parse_sparsity(sparsity)
    if parsed is not None:
        kind, value = parsed
        pattern = {"n": value[0], "m": value[1]} if kind == "nm" else {"ratio": value}
        methods.append(
            PruneConfig(include=include, exclude=exclude, score=prune_method, granularity=granularity,
                        sequential=sequential, bn_recalibrate=bn_recalibrate, **pattern)
        )  # fmt: skip
    fp8 = str(quant).strip().lower() == "fp8"
    bits = (8, 8) if fp8 else parse_quant(quant)
    if bits is None:
        defaults = (QuantConfig.calib_method, False, QuantConfig.act_asymmetric, QuantConfig.placement)
        if (calib_method, bool(group_size), act_asymmetric, placement) != defaults:
            raise CraftError(
                "--calib-method, --group-size, --act-asymmetric and --placement need --quant (e.g. --quant w8a8)"
            )
    else:
        if group_size and weight_granularity not in ("channel", "group"):
            raise CraftError(f"--group-size sets group granularity; drop --weight-granularity {weight_granularity}")
        methods.append(
            QuantConfig(include=include, exclude=exclude, w_bits=bits[0], a_bits=bits[1], calib_method=calib_method,
                        percentile=percentile, weight_calib=weight_calib,
                        w_granularity="group" if group_size else weight_granularity,
                        group_size=group_size or 0, act_asymmetric=act_asymmetric, quant_attention=quant_attention,
                        bn_recalibrate=bn_recalibrate, placement=placement, weight_rounding=weight_rounding,
                        number_format="fp8" if fp8 else "int")
        )  # fmt: skip
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


def bundle_sparsity(bundle_path: str | Path) -> dict[str, Any]:
    """Sparsity report of any bundle: every Linear/Conv layer's zeros, its recorded target and N:M validity."""
    from craft_deploy.config import parse_sparsity

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
