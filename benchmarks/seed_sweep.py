"""CrAFT's claim over seeds: Adam vs SAM at several rho (and ASAM) on the offline default, each fine-tuned with three
seeds (seed = training subset, head initialisation and data order), then FP32 top-1, lambda_max and accuracy after
W8A8 / W6A6 / W4A16 PTQ and 2:4 pruning with BatchNorm re-calibration. Reports mean and spread over seeds.

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
    from craft_deploy.finetune import run
    from craft_deploy.artifacts import partial_dir

    root = Path(args.runs)
    for seed in args.seeds:
        for label, kw in RUNS.items():
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
            print(json.dumps({"run": out.name, "test_top1": rec["metrics"]["test_top1"],
                              "seconds_per_epoch": rec["timings"]["seconds_per_epoch"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["train", "evaluate"], required=True)
    ap.add_argument("--runs", default="runs/seed_sweep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
