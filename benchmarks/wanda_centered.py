"""Why Wanda loses to magnitude on the default once BatchNorm is re-estimated: a controlled test of one hypothesis.

Pruning weight W_ij changes output i by -W_ij X_j. Wanda scores that change by |W_ij| ||X_j||_2, the norm of the raw
input, mean included. Re-estimating the BatchNorm after the layer removes any constant shift of output i, so the part
W_ij E[X_j] of the change is repaired for free and only W_ij (X_j - E[X_j]) is lost. Post-ReLU inputs have large
means, so under BN re-estimation Wanda over-protects channels that are large but nearly constant. If that is the
reason, scoring with the centred norm |W_ij| ||X_j - E[X_j]||_2 should recover (and pass) magnitude with BN
re-estimation and lose that edge without it. Same bundles, calibration images and test images for every row.

    python benchmarks/wanda_centered.py runs/demo/adam runs/demo/sam --eval-subset 2000 --calib-samples 512
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from craft_deploy.compress import PruneConfig, calib_loop
from craft_deploy.compress.prune import PRUNE_SCORES, Wanda, register_prune_score
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import apply_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--patterns", nargs="+", default=["2:4", "0.5"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if "wanda-centered" not in PRUNE_SCORES:

        @register_prune_score("wanda-centered")
        class WandaCentered(Wanda):
            """|W_ij| * ||X_j - E[X_j]||_2."""

            centered_norms = True

    scores = ["magnitude", "wanda", "wanda-centered"]
    rows = []
    for path in args.bundles:
        bundle = load_bundle(path)
        splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
        calib = calib_loop(calibration_subset(splits.train, args.calib_samples))
        dense = evaluate(bundle.model, splits.test)["top1"]
        for pattern in args.patterns:
            kw = dict(zip("nm", map(int, pattern.split(":")))) if ":" in pattern else {"ratio": float(pattern)}
            for bn in (False, True):
                for score in scores:
                    model = copy.deepcopy(bundle.model)
                    apply_method(model, PruneConfig(score=score, bn_recalibrate=bn, **kw), calib)
                    top1 = evaluate(model, splits.test)["top1"]
                    row = {"bundle": path, "dense": dense, "pattern": pattern, "bn": bn, "score": score, "top1": top1}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wanda_centered.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    lines = ["| bundle | dense | pattern | BN re-est. | " + " | ".join(scores) + " |", "|---|---|---|---|---|---|---|"]
    for path in args.bundles:
        for pattern in args.patterns:
            for bn in (False, True):
                vals = {
                    r["score"]: r["top1"]
                    for r in rows
                    if r["bundle"] == path and r["pattern"] == pattern and r["bn"] == bn
                }
                dense = next(r["dense"] for r in rows if r["bundle"] == path)
                lines.append(
                    f"| {Path(path).name} | {dense:.2f} | {pattern} | {'yes' if bn else 'no'} | "
                    + " | ".join(f"{vals[s]:.2f}" for s in scores)
                    + " |"
                )
    (out / "wanda_centered.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
