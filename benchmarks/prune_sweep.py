"""Top-1 after one-shot pruning, the CrAFT paper's Figure 4 sweep, on fine-tuned bundles (e.g. Adam vs SAM).

For each bundle, pruning method (every registered one: magnitude, Wanda, SparseGPT, ...) and pattern (unstructured
0.3..0.7 per layer, N:M 2:4, 4:8, 16:32, 32:64), prune a fresh copy with calibration images from the training split
and evaluate on the test split, without and/or with BatchNorm re-calibration. Writes JSON, a markdown table and a PNG.

    python benchmarks/prune_sweep.py runs/demo/adam runs/demo/sam --eval-subset 2000 --out benchmarks/results
    python benchmarks/prune_sweep.py runs/demo/adam runs/demo/sam --patterns 0.5 0.7 2:4 4:8 --bn yes \
        --calib-samples 512 --name prune_oneshot
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from craft_deploy.compress import PruneConfig, calib_loop
from craft_deploy.compress.prune import PRUNE_SCORES
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import apply_method

PATTERNS = ["0.3", "0.4", "0.5", "0.6", "0.7", "2:4", "4:8", "16:32", "32:64"]


def config(pattern: str, score: str, bn: bool) -> PruneConfig:
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return PruneConfig(n=n, m=m, score=score, bn_recalibrate=bn)
    return PruneConfig(ratio=float(pattern), score=score, bn_recalibrate=bn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scores", nargs="+", default=list(PRUNE_SCORES), choices=list(PRUNE_SCORES))
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--bn", choices=["no", "yes", "both"], default="both", help="BatchNorm re-calibration")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="prune_sweep", help="file name stem of the results")
    args = ap.parse_args()
    bns = {"no": (False,), "yes": (True,), "both": (False, True)}[args.bn]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.bundles:
        bundle = load_bundle(path)
        label = next(
            (s["config"].get("optimizer") for s in bundle.manifest["stages"] if s["stage"] == "finetune"),
            Path(path).name,
        )
        splits = splits_for_manifest(bundle.manifest, eval_subset=args.eval_subset)
        calib = calib_loop(calibration_subset(splits.train, args.calib_samples))
        dense = evaluate(bundle.model, splits.test)["top1"]
        rows.append({"model": label, "score": "dense", "pattern": "dense", "bn_recal": False, "top1": dense})
        print(f"{label}: dense {dense:.2f}", flush=True)
        for score in args.scores:
            for pattern in args.patterns:
                for bn in bns:
                    model = copy.deepcopy(bundle.model)
                    t0 = time.perf_counter()
                    report = apply_method(model, config(pattern, score, bn), calib)
                    seconds = time.perf_counter() - t0
                    top1 = evaluate(model, splits.test)["top1"]
                    zeros = sum(int((p == 0).sum()) for p in model.parameters() if p.ndim > 1)
                    total = sum(p.numel() for p in model.parameters() if p.ndim > 1)
                    rows.append(
                        {
                            "model": label,
                            "score": score,
                            "pattern": pattern,
                            "bn_recal": bn,
                            "top1": top1,
                            "prune_seconds": seconds,
                            "layers": len(report["layers"]),
                            "model_zero_fraction": zeros / total,
                        }
                    )
                    print(f"{label} {score:9} {pattern:6} bn={int(bn)}: {top1:6.2f}  ({seconds:.1f} s)", flush=True)
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    write_table(rows, out / f"{args.name}.md", args.scores, args.patterns, bns)
    plot(rows, out / f"{args.name}.png", args.scores, args.patterns, bns)


def write_table(rows: list[dict], path: Path, scores: list[str], patterns: list[str], bns: tuple[bool, ...]) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "| model | score | BN re-cal | dense | " + " | ".join(patterns) + " |",
        "|---|---|---|---|" + "---|" * len(patterns),
    ]
    for mdl in models:
        dense = next(r["top1"] for r in rows if r["model"] == mdl and r["score"] == "dense")
        for score in scores:
            for bn in bns:
                vals = {
                    r["pattern"]: r["top1"]
                    for r in rows
                    if r["model"] == mdl and r["score"] == score and r["bn_recal"] == bn
                }
                lines.append(
                    f"| {mdl} | {score} | {'yes' if bn else 'no'} | {dense:.2f} | "
                    + " | ".join(f"{vals[p]:.2f}" for p in patterns)
                    + " |"
                )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path, scores: list[str], patterns: list[str], bns: tuple[bool, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bns), figsize=(6 * len(bns), 4.5), sharey=True, squeeze=False)
    styles = ["--", "-", ":", "-."]
    for ax, bn in zip(axes[0], bns):
        for mdl in dict.fromkeys(r["model"] for r in rows):
            for score, style in zip(scores, styles * len(scores)):
                vals = {
                    r["pattern"]: r["top1"]
                    for r in rows
                    if r["model"] == mdl and r["score"] == score and r["bn_recal"] == bn
                }
                ax.plot(patterns, [vals[p] for p in patterns], style, marker="o", label=f"{mdl} {score}")
        ax.set_title(f"one-shot pruning, {'with' if bn else 'no'} BN re-calibration")
        ax.set_xlabel("sparsity (unstructured ratio | N:M)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
