"""CrAFT's claim over seeds: Adam vs SAM at several rho (and ASAM) on the offline default, each fine-tuned with three
seeds (seed = training subset, head initialisation and data order), then FP32 top-1, lambda_max and accuracy after
W8A8 / W6A6 / W4A16 PTQ (MSE calibration; W6A6+BN adds BatchNorm re-estimation) and 2:4 pruning with BatchNorm
re-calibration. Reports mean and spread over seeds.

    python benchmarks/seed_sweep.py --phase train      # fine-tunes into runs/seed_sweep/ (resumable, skips finished)
    python benchmarks/seed_sweep.py --phase evaluate   # compresses and measures every finished run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from craft_deploy.config import FinetuneConfig

RUNS = {
    "adam": {"optimizer": "adam"},
    "sam-0.05": {"optimizer": "sam", "rho": 0.05},
    "sam-0.2": {"optimizer": "sam", "rho": 0.2},
    "sam-0.5": {"optimizer": "sam", "rho": 0.5},
}


def train(args: argparse.Namespace) -> None:
    from craft_deploy.artifacts import partial_dir
    from craft_deploy.finetune import run

    root = Path(args.runs)
    for seed in args.seeds:
        for label, kw in RUNS.items():
            if args.only and label not in args.only:
                continue
            out = root / f"{label}-s{seed}"
            if (out / "finetune.json").is_file():
                continue
            cfg = FinetuneConfig(
                train_subset=args.train_subset,
                eval_subset=args.eval_subset,
                epochs=args.epochs,
                threads=args.threads,
                seed=seed,
                **kw,
            )
            resume = out if partial_dir(out).exists() else None
            rec = run(cfg, out, resume=resume)
            print(
                json.dumps(
                    {
                        "run": out.name,
                        "test_top1": rec["metrics"]["test_top1"],
                        "seconds_per_epoch": rec["timings"]["seconds_per_epoch"],
                    }
                ),
                flush=True,
            )


COMPRESSIONS = {
    "W8A8": {"quant": (8, 8)},
    "W6A6": {"quant": (6, 6)},
    "W6A6+BN": {"quant": (6, 6), "bn": True},
    "W4A16": {"quant": (4, 16)},
    "2:4+BN": {"prune": (2, 4)},
}
LAMBDA_IMAGES = 128


def evaluate(args: argparse.Namespace) -> None:
    """FP32 top-1, lambda_max and compressed top-1 of every finished run, then mean +- std over seeds."""
    import copy
    import statistics

    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from craft_deploy.analyze import lambda_max
    from craft_deploy.compress import PruneConfig, QuantConfig, calib_loop
    from craft_deploy.data import calibration_subset, splits_for_manifest
    from craft_deploy.evaluate import evaluate as top1_of
    from craft_deploy.models import load_bundle
    from craft_deploy.toolkit.registry import apply_method

    def sharpness(bundle, splits, batchnorm: str) -> dict:
        """lambda_max on the same training images for every run (seed 1 of the calibration draw), batches of 32."""
        fixed = list(DataLoader(calibration_subset(splits.train, LAMBDA_IMAGES, seed=1), batch_size=32))
        return lambda_max(
            copy.deepcopy(bundle.model), nn.CrossEntropyLoss(), fixed, iters=30, tol=1e-3, batchnorm=batchnorm
        )

    torch.set_num_threads(args.threads)
    root, out = Path(args.runs), Path(args.out)
    cache = out / "seed_sweep_runs.json"
    rows = json.loads(cache.read_text()) if cache.is_file() else {}
    for run_dir in sorted(p for p in root.iterdir() if (p / "finetune.json").is_file()):
        if args.only and run_dir.name.rsplit("-s", 1)[0] not in args.only:
            continue
        row = rows.get(run_dir.name)
        if row is not None and "lambda_max_batch" not in row:  # added later: BatchNorm on batch statistics
            bundle = load_bundle(run_dir)
            sharp = sharpness(bundle, splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset), "batch")
            row["lambda_max_batch"], row["lambda_batch_converged"] = sharp["lambda_max"], sharp["converged"]
            print(json.dumps({"run": run_dir.name, "lambda_max_batch": sharp["lambda_max"]}), flush=True)
            cache.write_text(json.dumps(rows, indent=2) + "\n")
        if row is not None:
            continue
        rec = json.loads((run_dir / "finetune.json").read_text())
        bundle = load_bundle(run_dir)
        splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
        sharp = sharpness(bundle, splits, "eval")
        calib = calib_loop(calibration_subset(splits.train, 512))
        row = {
            "run": run_dir.name,
            "seed": rec["config"]["seed"],
            "method": run_dir.name.rsplit("-s", 1)[0],
            "fp32": rec["metrics"]["test_top1"],
            "seconds_per_epoch": rec["timings"]["seconds_per_epoch"],
            "lambda_max": sharp["lambda_max"],
            "lambda_converged": sharp["converged"],
        }
        sharp = sharpness(bundle, splits, "batch")
        row["lambda_max_batch"], row["lambda_batch_converged"] = sharp["lambda_max"], sharp["converged"]
        for name, spec in COMPRESSIONS.items():
            model = copy.deepcopy(bundle.model)
            if "quant" in spec:
                ccfg = QuantConfig(
                    w_bits=spec["quant"][0],
                    a_bits=spec["quant"][1],
                    calib_method="mse",
                    bn_recalibrate=spec.get("bn", False),
                )
            else:
                ccfg = PruneConfig(n=spec["prune"][0], m=spec["prune"][1], bn_recalibrate=True)
            apply_method(model, ccfg, calib)
            row[name] = top1_of(model, splits.test)["top1"]
        rows[run_dir.name] = row
        print(json.dumps(row), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows, indent=2) + "\n")
    cols = ["fp32", "lambda_max", "lambda_max_batch", *COMPRESSIONS]
    lines = [
        "| fine-tune | seeds | s/epoch | FP32 | lambda_max (BN eval) | lambda_max (BN batch) | "
        + " | ".join(COMPRESSIONS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(COMPRESSIONS),
    ]
    for method in RUNS:
        group = [r for r in rows.values() if r["method"] == method and (not args.only or method in args.only)]
        if not group:
            continue
        cells = []
        for c in cols:
            vals = [r[c] for r in group if c in r]
            if not vals:
                cells.append("-")
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            digits = 0 if c.startswith("lambda_max") else 2
            cells.append(f"{statistics.mean(vals):.{digits}f} +- {sd:.{digits}f}")
        spe = statistics.mean(r["seconds_per_epoch"] for r in group)
        lines.append(f"| {method} | {len(group)} | {spe:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Every run:", "", "| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in sorted(rows):
        r = rows[name]
        if args.only and r["method"] not in args.only:
            continue
        cells = [f"{r[c]:.0f}" if c.startswith("lambda_max") else f"{r[c]:.2f}" if c in r else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "seed_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["train", "evaluate"], required=True)
    ap.add_argument("--runs", default="runs/seed_sweep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", help=f"a subset of {', '.join(RUNS)}")
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.phase == "train":
        train(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
