"""The CrAFT paper's Table 2 on our bundles: top-1 after W8A8, W6A6, W6A16, W5A16 and W4A16 PTQ with each calibrator,
and the calibration time for 512 samples; FP8 (E4M3 weights and activations) on request.

    python benchmarks/ptq_sweep.py --bundles runs/seed_sweep/adam-s0 runs/seed_sweep/sam-0.05-s0
    python benchmarks/ptq_sweep.py --bundles runs/demo/adam --configs w8a8 fp8 --methods minmax mse minmax+bn mse+bn \
        --eval-subset 10000 --name fp8_vs_int8

Weight-only configurations (a16) have no activations to calibrate: percentile and entropy reduce to the MSE weight
clip there, so they are listed once as `minmax` and `mse`. PTQ4ViT runs on bundles of ViTs (timm Attention blocks);
there every calibrator also quantizes the attention matmuls (--quant-attention), so all quantize the same tensors.
`minmax+bn` and `mse+bn` add BatchNorm re-estimation under the quantized forward pass (models with BatchNorm only).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from craft_deploy.compress import QuantConfig, calib_loop
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.attention import attention_modules
from craft_deploy.toolkit.batchnorm import batchnorms
from craft_deploy.toolkit.registry import apply_method

CONFIGS = [(8, 8), (6, 6), (6, 16), (5, 16), (4, 16), ("fp8", 8)]  # fp8: E4M3, calibrated with minmax/percentile/mse
METHODS = ["minmax", "percentile", "mse", "entropy", "ptq4vit", "minmax+bn", "mse+bn"]  # +bn: --bn-recalibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", required=True)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--configs", nargs="+", default=[_name(w, a) for w, a in CONFIGS[:5]], help="e.g. w8a8 fp8 (default: the INTs)"
    )
    ap.add_argument("--name", default="ptq_sweep")
    ap.add_argument("--methods", nargs="+", default=METHODS, help="re-run these calibrators; other results are kept")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.bundles:
        bundle = load_bundle(path)
        splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
        calib = calib_loop(calibration_subset(splits.train, args.calib_samples))
        fp32 = evaluate(bundle.model, splits.test)["top1"]
        vit = bool(attention_modules(bundle.model))
        has_bn = bool(batchnorms(bundle.model))
        row = {"bundle": Path(path).name, "fp32": fp32, "results": {}}
        for w, a in CONFIGS:
            if _name(w, a) not in args.configs:
                continue
            for method in args.methods:
                calib_method, bn = method.removesuffix("+bn"), method.endswith("+bn")
                if (calib_method == "ptq4vit" and not vit) or (bn and not has_bn):
                    continue
                if a == 16 and calib_method in ("percentile", "entropy", "ptq4vit"):
                    continue
                if w == "fp8" and calib_method in ("entropy", "ptq4vit"):
                    continue
                model = copy.deepcopy(bundle.model)
                t0 = time.perf_counter()
                fmt = dict(w_bits=8, number_format="fp8") if w == "fp8" else dict(w_bits=w)
                qcfg = QuantConfig(  # ViTs: every calibrator quantizes the same tensors
                    a_bits=a, calib_method=calib_method, quant_attention=vit, bn_recalibrate=bn, **fmt
                )
                report = apply_method(model, qcfg, calib)
                seconds = time.perf_counter() - t0
                top1 = evaluate(model, splits.test)["top1"]
                key = f"{_name(w, a)}/{method}"
                row["results"][key] = {"top1": top1, "calibration_seconds": seconds, "timings": report["timings"]}
                print(
                    json.dumps({"bundle": row["bundle"], "config": key, "top1": top1, "seconds": round(seconds, 1)}),
                    flush=True,
                )
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / f"{args.name}.json"
    if previous.is_file():  # keep earlier results of calibrators not re-run
        kept = {r["bundle"]: r for r in json.loads(previous.read_text())["rows"]}
        for row in rows:
            old = kept.pop(row["bundle"], {"results": {}})["results"]
            row["results"] = {**old, **row["results"]}
        rows += list(kept.values())
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(table(rows) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Table 2 layout: one row per bundle and calibrator, top-1 (drop from FP32) per configuration."""
    cols = [_name(w, a).upper() for w, a in CONFIGS]
    lines = ["| bundle | calibration | FP32 | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        for method in METHODS:
            cells = []
            for w, a in CONFIGS:
                weight_only = method.removesuffix("+bn") in ("minmax", "mse")
                key = f"{_name(w, a)}/{method if a != 16 or weight_only else 'mse'}"
                res = r["results"].get(key)
                cells.append(f"{res['top1']:.2f} ({res['top1'] - r['fp32']:+.2f})" if res else "-")
            ran = any(k.endswith(f"/{method}") for k in r["results"])
            if not ran or all(c == "-" for c in cells):
                continue
            lines.append(f"| {r['bundle']} | {method} | {r['fp32']:.2f} | " + " | ".join(cells) + " |")
    timing = ["", "Calibration time (s), every configuration with activations, 512 samples:", ""]
    timing += ["| bundle | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for r in rows:
        cells = []
        for method in METHODS:
            res = r["results"].get(f"w8a8/{method}")
            cells.append(f"{res['calibration_seconds']:.1f}" if res else "-")
        timing.append(f"| {r['bundle']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + timing)


def _name(w, a) -> str:
    return "fp8" if w == "fp8" else f"w{w}a{a}"


if __name__ == "__main__":
    main()
