"""Where FP8 (E4M3) loses accuracy on a CNN: weights or activations. Min-max ranges, weights per output channel,
activations per tensor, on one bundle's first --eval-subset test images:

    python benchmarks/fp8_weight_error.py runs/r14/adam-s2 --out benchmarks/results/fp8_weight_error.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from craft_deploy.compress import QuantConfig, calib_loop
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import apply_method

VARIANTS = {
    "FP8 weights, float activations": dict(w_bits=8, a_bits=16, number_format="fp8"),
    "INT8 weights, float activations": dict(w_bits=8, a_bits=16),
    "FP8 weights and activations": dict(w_bits=8, a_bits=8, number_format="fp8"),
    "INT8 weights and activations": dict(w_bits=8, a_bits=8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/fp8_weight_error.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
    calib = calib_loop(calibration_subset(splits.train, args.calib_samples))
    result = {"bundle": args.bundle, "fp32": evaluate(bundle.model, splits.test)["top1"]}
    for name, kw in VARIANTS.items():
        model = copy.deepcopy(bundle.model)
        apply_method(model, QuantConfig(calib_method="minmax", **kw), calib)
        result[name] = evaluate(model, splits.test)["top1"]
        print(f"{name}: {result[name]:.2f}", flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "top1": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
