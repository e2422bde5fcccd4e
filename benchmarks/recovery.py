"""One-shot compression and then one epoch of recovery fine-tuning (with and without distillation), on fine-tuned
bundles, side by side on the same test images; and a plain fine-tuning epoch of the same size for the time ratio.

For each bundle and recipe: `compress` (SparseGPT / GPTQ where they apply, BatchNorm re-estimation), then
`finetune --init` for one epoch of `--train-subset` images with `--kd-alpha` 0 (no teacher) and 1 (the dense bundle as
teacher). Every cell evaluates on the first `--eval-subset` images of the bundle's seeded test permutation.

    python benchmarks/recovery.py runs/demo/adam runs/demo/sam --out benchmarks/results
    python benchmarks/recovery.py runs/gpu/adam --recipes 2:4+W8A8 W4A8 --device cuda --amp bf16 --threads 16 \
        --name recovery-cuda-bf16 --out benchmarks/results      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import FinetuneConfig
from craft_deploy.finetune import run as finetune

RECIPES = {
    "2:4": dict(sparsity="2:4", prune_method="sparsegpt", bn_recalibrate=True),
    "2:4+W8A8": dict(sparsity="2:4", prune_method="sparsegpt", quant="w8a8", calib_method="mse", bn_recalibrate=True),
    "W4A8": dict(quant="w4a8", calib_method="mse", weight_rounding="gptq", bn_recalibrate=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--work", default="runs/recovery")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="recovery", help="Stem of the result files (NAME.json, NAME.md).")
    ap.add_argument("--device", default="cpu", help="Fine-tuning device (cpu, cuda).")
    ap.add_argument("--amp", choices=["bf16", "fp16"], help="Mixed precision for the fine-tuning epochs.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kd-alphas", default="0,1", help="Distillation weights to recover with, e.g. 1 (KD only).")
    ap.add_argument("--no-plain-epoch", action="store_true", help="Skip the plain epoch timed for the ratio.")
    ap.add_argument("--data-root", help="Where Fashion-MNIST lives (default: the Debian package's directory).")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    common = dict(
        epochs=1,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
        threads=args.threads,
        device=args.device,
        amp=args.amp,
        data_root=args.data_root,
    )
    for path in args.bundles:
        name = Path(path).name
        plain = None
        if not args.no_plain_epoch:
            plain = finetune(
                FinetuneConfig(model=_architecture(path), data="fashion-mnist", img_size=64, **common),
                work / f"{name}-plain-epoch",
                overwrite=True,
            )
        for recipe in args.recipes:
            cdir = work / f"{name}-{recipe.replace(':', 'of').replace('+', '-')}"
            t0 = time.perf_counter()
            crec = compress(
                from_flags(
                    **RECIPES[recipe],
                    calib_samples=args.calib_samples,
                    eval_subset=args.eval_subset,
                    data_root=args.data_root,
                ),
                path,
                cdir,
                overwrite=True,
            )
            row = {
                "bundle": name,
                "recipe": recipe,
                "dense": crec["metrics"]["test_top1_before"],
                "one_shot": crec["metrics"]["test_top1_after"],
                "compress_seconds": time.perf_counter() - t0,
                "plain_epoch_seconds": plain["timings"]["seconds_per_epoch"] if plain else None,
            }
            for alpha in (float(a) for a in args.kd_alphas.split(",")):
                rec = finetune(
                    FinetuneConfig(init=str(cdir), teacher=path, kd_alpha=alpha, optimizer=args.optimizer, **common),
                    Path(f"{cdir}-rec-kd{alpha:g}"),
                    overwrite=True,
                )
                key = "recovered_kd" if alpha else "recovered"
                row[key] = rec["metrics"]["test_top1"]
                row[f"{key}_epoch_seconds"] = rec["timings"]["seconds_per_epoch"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)  # written after every row: a killed run keeps what it measured
            (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    lines = [
        "| bundle | recipe | dense | one-shot | +1 epoch recovery | +1 epoch recovery with KD | epoch s (plain / "
        "recovery / with KD) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drop = r["one_shot"] - r["dense"]
        cells = [f"{r[k]:.2f} ({r[k] - r['dense']:+.2f})" if k in r else "-" for k in ("recovered", "recovered_kd")]
        secs = " / ".join(
            f"{r[k]:.0f}" if r.get(k) is not None else "-"
            for k in ("plain_epoch_seconds", "recovered_epoch_seconds", "recovered_kd_epoch_seconds")
        )
        lines.append(
            f"| {r['bundle']} | {r['recipe']} | {r['dense']:.2f} | {r['one_shot']:.2f} ({drop:+.2f})"
            f" | {cells[0]} | {cells[1]} | {secs} |"
        )
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _architecture(path: str) -> str:
    return json.loads((Path(path) / "manifest.json").read_text())["architecture"]


if __name__ == "__main__":
    main()
