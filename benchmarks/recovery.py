"""One-shot compression and then one epoch of recovery fine-tuning, with and without distillation, with Adam or SAM
as the recovery optimizer, on fine-tuned bundles (several seeds each), side by side on the same test images.

For each bundle and recipe: `compress` with the recipe (study tokens, e.g. `2:4+sparsegpt+bn+w8a8`), then
`finetune --init` for one epoch of `--train-subset` images for every recovery optimizer x `--kd-alphas` (0: no
teacher; 1: the dense bundle as teacher). Every cell of a bundle evaluates on the first `--eval-subset` images of that
bundle's seeded test permutation, and recovery trains with the bundle's own seed, so cells of one bundle are paired.
Cells are kept under `--work` and results in NAME.json after every cell: a killed run continues where it stopped.
Bundles named `<label>-s<seed>` (e.g. adam-s0) are grouped by label; the table gives mean +- std over seeds and the
paired differences (with distillation minus without; SAM recovery minus Adam recovery) with a 95% t-interval.

    python benchmarks/recovery.py runs/r14/adam-s{0,1,2} runs/r14/sam-s{0,1,2} \
        --recipes 2:4+sparsegpt+bn+w8a8 w4a8+gptq+bn --recovery-optimizers adam,sam --name recovery-seeds
    python benchmarks/recovery.py runs/gpu/adam --recipes 2:4+sparsegpt+bn+w8a8 w4a8+gptq+bn --device cuda \
        --amp bf16 --threads 16 --recovery-optimizers adam --name recovery-cuda-bf16      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import FinetuneConfig
from craft_deploy.finetune import run as finetune
from craft_deploy.study.recipes import parse_recipe
from craft_deploy.study.report import mean_std, paired

DEFAULT_RECIPES = ("2:4+sparsegpt+bn+w8a8", "w4a8+gptq+bn")
RECOVERY_OPTIMIZERS = {"adam": {"optimizer": "adam"}, "sam": {"optimizer": "sam", "rho": 0.05}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="Study recipe tokens (mse default).")
    ap.add_argument("--recovery-optimizers", default="adam", help=f"Comma list of {', '.join(RECOVERY_OPTIMIZERS)}.")
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--work", default="runs/recovery")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="recovery", help="Stem of the result files (NAME.json, NAME.md).")
    ap.add_argument("--device", default="cpu", help="Fine-tuning device (cpu, cuda).")
    ap.add_argument("--amp", choices=["bf16", "fp16"], help="Mixed precision for the fine-tuning epochs.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kd-alphas", default="0,1", help="Distillation weights to recover with, e.g. 1 (KD only).")
    ap.add_argument("--data-root", help="Where Fashion-MNIST lives (default: the Debian package's directory).")
    args = ap.parse_args()
    recipes = [parse_recipe(text)[0] for text in args.recipes]
    optimizers = args.recovery_optimizers.split(",")
    for name in optimizers:
        if name not in RECOVERY_OPTIMIZERS:
            ap.error(f"--recovery-optimizers: unknown {name!r}; accepted: {', '.join(RECOVERY_OPTIMIZERS)}")
    alphas = [float(a) for a in args.kd_alphas.split(",")]
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / f"{args.name}.json"
    cells = json.loads(result_file.read_text())["cells"] if result_file.exists() else {}

    def save() -> None:  # after every cell: a killed run keeps what it measured
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "cells": cells}, indent=2) + "\n")
        tmp.replace(result_file)

    common = dict(epochs=1, train_subset=args.train_subset, eval_subset=args.eval_subset, threads=args.threads,
                  device=args.device, amp=args.amp, data_root=args.data_root)  # fmt: skip
    for path in args.bundles:
        bundle = Path(path).name
        seed = _seed(path)
        for recipe in recipes:
            key = f"{bundle}|{recipe.name}|one-shot"
            cdir = work / bundle / recipe.name.replace(":", "of").replace("+", "-")
            if key not in cells:
                t0 = time.perf_counter()
                conf = from_flags(**recipe.kwargs, calib_samples=args.calib_samples, eval_subset=args.eval_subset,
                                  data_root=args.data_root)  # fmt: skip
                crec = compress(conf, path, cdir, overwrite=True)
                cells[key] = {"dense": crec["metrics"]["test_top1_before"], "top1": crec["metrics"]["test_top1_after"],
                              "seconds": time.perf_counter() - t0}  # fmt: skip
                save()
            for opt in optimizers:
                for alpha in alphas:
                    key = f"{bundle}|{recipe.name}|{opt}-kd{alpha:g}"
                    if key in cells:
                        continue
                    conf = FinetuneConfig(init=str(cdir), teacher=path, kd_alpha=alpha, seed=seed,
                                          **RECOVERY_OPTIMIZERS[opt], **common)  # fmt: skip
                    rec = finetune(conf, Path(f"{cdir}-rec-{opt}-kd{alpha:g}"), overwrite=True)
                    cells[key] = {"top1": rec["metrics"]["test_top1"],
                                  "epoch_seconds": rec["timings"]["seconds_per_epoch"]}  # fmt: skip
                    save()
                    print(key, json.dumps(cells[key]), flush=True)
    table = render(cells, [r.name for r in recipes], optimizers, alphas)
    (out / f"{args.name}.md").write_text(table)
    print(table)


def render(cells: dict, recipes: list[str], optimizers: list[str], alphas: list[float]) -> str:
    """Mean +- std over seeds per fine-tune label, and the paired differences between recovery settings."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in cells:
        bundle = key.split("|")[0]
        if bundle not in groups[_split(bundle)[0]]:
            groups[_split(bundle)[0]].append(bundle)
    settings = ["one-shot"] + [f"{o}-kd{a:g}" for o in optimizers for a in alphas]
    head = ["fine-tune", "recipe", "n", "FP32"] + [_setting_title(s) for s in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    diffs = []
    for label, bundles in groups.items():
        for recipe in recipes:
            have = [b for b in bundles if all(f"{b}|{recipe}|{s}" in cells for s in settings)]
            if not have:
                continue
            dense = [cells[f"{b}|{recipe}|one-shot"]["dense"] for b in have]
            row = [label, recipe, str(len(have)), _mean_std(dense)]
            for s in settings:
                vals = [cells[f"{b}|{recipe}|{s}"]["top1"] for b in have]
                drop = sum(v - d for v, d in zip(vals, dense)) / len(vals)
                row.append(f"{_mean_std(vals)} ({drop:+.2f})")
            lines.append("| " + " | ".join(row) + " |")
            for a_set, b_set, what in _comparisons(optimizers, alphas):
                a = [cells[f"{b}|{recipe}|{a_set}"]["top1"] for b in have]
                b_ = [cells[f"{b}|{recipe}|{b_set}"]["top1"] for b in have]
                diffs.append((label, recipe, what, paired([y - x for x, y in zip(a, b_)])))
    labels = list(groups)
    for other in labels[1:]:  # fine-tunings against the first one, seed by seed (a seed's cells share test images)
        base = {_split(b)[1]: b for b in groups[labels[0]]}
        pairs = [(base[_split(b)[1]], b) for b in groups[other] if _split(b)[1] in base]
        for recipe in recipes:
            for s in settings:
                keys = [(f"{a}|{recipe}|{s}", f"{b}|{recipe}|{s}") for a, b in pairs]
                keys = [(ka, kb) for ka, kb in keys if ka in cells and kb in cells]
                if keys:
                    d = paired([cells[kb]["top1"] - cells[ka]["top1"] for ka, kb in keys])
                    diffs.append((f"{other} - {labels[0]}", recipe, f"{_setting_title(s)}: fine-tune", d))
    lines += ["", "| fine-tune | recipe | paired difference | mean [95% CI] | verdict |", "|---|---|---|---|---|"]
    for label, recipe, what, d in diffs:
        ci = (
            f"{d['mean']:+.2f} (one seed)"
            if d["ci"] is None
            else f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
        )
        lines.append(f"| {label} | {recipe} | {what} | {ci} | {d['verdict']} |")
    times = defaultdict(list)
    for key, cell in cells.items():
        if "epoch_seconds" in cell:
            times[key.split("|")[2]].append(cell["epoch_seconds"])
    lines += ["", "Recovery epoch seconds (median over cells; machine shared, see the docs page for a clean ratio): "
              + ", ".join(f"{s} {sorted(v)[len(v) // 2]:.0f}" for s, v in sorted(times.items()))]  # fmt: skip
    return "\n".join(lines) + "\n"


def _comparisons(optimizers: list[str], alphas: list[float]) -> list[tuple[str, str, str]]:
    """(baseline setting, other setting, title): distillation on vs off, and SAM vs Adam recovery."""
    out = []
    if len(alphas) > 1:
        lo, hi = min(alphas), max(alphas)
        out += [(f"{o}-kd{lo:g}", f"{o}-kd{hi:g}", f"{o}: KD {hi:g} - KD {lo:g}") for o in optimizers]
    if "adam" in optimizers and "sam" in optimizers:
        out += [(f"adam-kd{a:g}", f"sam-kd{a:g}", f"KD {a:g}: SAM - Adam recovery") for a in alphas]
    return out


def _setting_title(setting: str) -> str:
    if setting == "one-shot":
        return "one-shot"
    opt, kd = setting.split("-kd")
    return f"+1 epoch {opt}" + (" with KD" if float(kd) else "")


def _mean_std(vals: list[float]) -> str:
    m, sd = mean_std(vals)
    return f"{m:.2f} ± {sd:.2f}" if len(vals) > 1 else f"{m:.2f}"


def _split(bundle: str) -> tuple[str, str]:
    """'adam-s2' -> ('adam', '2'); a name without a seed suffix is its own label and seed."""
    m = re.fullmatch(r"(.*)-s(\d+)", bundle)
    return (m.group(1), m.group(2)) if m else (bundle, bundle)


def _seed(path: str) -> int:
    return int(json.loads((Path(path) / "manifest.json").read_text()).get("data", {}).get("seed", 0))


if __name__ == "__main__":
    main()
