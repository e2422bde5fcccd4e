"""The CrAFT optimizer family on the offline default: top-1, time per epoch (ratio to Adam, same run), lambda_max, and
how well each fine-tune survives compression (W8A8, W6A6, W4A16 min-max PTQ; 2:4 and 50% magnitude pruning with
BatchNorm re-calibration).

    python benchmarks/optimizer_compare.py --train-subset 6000 --epochs 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from craft_deploy.analyze import lambda_max
from craft_deploy.compress import PruneConfig, QuantConfig, calib_loop
from craft_deploy.config import FinetuneConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.finetune import run
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import apply_method

METHODS = {
    "adam": {"optimizer": "adam"},
    "sam": {"optimizer": "sam"},
    "efficient sam (K=5)": {"optimizer": "sam", "sam_every": 5},
    "asam": {"optimizer": "asam"},
    "cram": {"optimizer": "cram"},
}
COMPRESSIONS = {
    "W8A8": QuantConfig(w_bits=8, a_bits=8),
    "W6A6": QuantConfig(w_bits=6, a_bits=6),
    "W4A16": QuantConfig(w_bits=4, a_bits=16),
    "2:4+BN": PruneConfig(n=2, m=4, bn_recalibrate=True),
    "50%+BN": PruneConfig(ratio=0.5, bn_recalibrate=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--eval-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in METHODS.items():
            cfg = FinetuneConfig(
                train_subset=args.train_subset,
                eval_subset=args.eval_subset,
                epochs=args.epochs,
                threads=args.threads,
                seed=args.seed,
                **kw,
            )
            out = Path(tmp) / label.replace(" ", "_")
            rec = run(cfg, out)
            bundle = load_bundle(out)
            splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
            fixed = list(DataLoader(calibration_subset(splits.train, 64, seed=1), batch_size=32))
            sharp = lambda_max(copy.deepcopy(bundle.model), nn.CrossEntropyLoss(), fixed, iters=20, tol=1e-3)
            calib = calib_loop(calibration_subset(splits.train, 256))
            compressed = {}
            for name, ccfg in COMPRESSIONS.items():
                model = copy.deepcopy(bundle.model)
                apply_method(model, ccfg, calib)
                compressed[name] = evaluate(model, splits.test)["top1"]
            row = {
                "method": label,
                "config": kw,
                "test_top1": rec["metrics"]["test_top1"],
                "seconds_per_epoch": rec["timings"]["seconds_per_epoch"],
                "lambda_max": sharp["lambda_max"],
                "lambda_iterations": sharp["iterations"],
                "lambda_converged": sharp["converged"],
                **compressed,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    adam = rows[0]["seconds_per_epoch"]
    lines = [
        "| method | FP32 top-1 | s/epoch | time vs Adam | lambda_max | " + " | ".join(COMPRESSIONS) + " |",
        "|---|---|---|---|---|" + "---|" * len(COMPRESSIONS),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['test_top1']:.2f} | {r['seconds_per_epoch']:.1f} | "
            f"{r['seconds_per_epoch'] / adam:.2f}x | {r['lambda_max']:.1f}"
            f"{'' if r['lambda_converged'] else ' (not converged)'} | "
            + " | ".join(f"{r[c]:.2f}" for c in COMPRESSIONS)
            + " |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimizer_compare.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "optimizer_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
