"""`craft-deploy tune` on the default against the study's uniform recipes, over fine-tuning seeds.

For every seed: the demo's Adam fine-tune (tf_efficientnet_lite0, Fashion-MNIST at 64 px, 6000 training images, two
epochs) with `--seed`, then `tune --objective size` and `tune --objective sparse-share` with `--max-drop`, and the
uniform one-shot recipes beside them with the same calibration images (512, seed 0 of the training split) and the same
held-out test images (2000): W8A8, W4A16 + BN, W3A16 + BN (tune's most aggressive size option on every layer), 2:4
magnitude + BN and 2:4 SparseGPT + BN. Every row is read from the commands' own JSON records: test top-1 drop
(points), weight megabytes (bits per weight as tune counts them, N:M index included, every Linear/Conv layer), the
share of weights in N:M, and whether the row is within the budget.

Runs the real commands, as a user would (resumable: a finished step is not run again):
    python benchmarks/tune.py --seeds 0,1,2 --work runs/tune-bench [--max-drop 1.0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import write_results

from craft_deploy.models import load_bundle
from craft_deploy.toolkit.registry import method_state
from craft_deploy.tune import weight_megabytes

UNIFORM = {
    "w8a8": ["--quant", "w8a8", "--calib-method", "mse"],
    "w4a16+bn": ["--quant", "w4a16", "--calib-method", "mse", "--bn-recalibrate"],
    "w3a16+bn": ["--quant", "w3a16", "--calib-method", "mse", "--bn-recalibrate"],
    "2:4 magnitude+bn": ["--sparsity", "2:4", "--prune-method", "magnitude", "--bn-recalibrate"],
    "2:4 sparsegpt+bn": ["--sparsity", "2:4", "--prune-method", "sparsegpt", "--bn-recalibrate"],
}
OBJECTIVES = ("size", "sparse-share")


def cli(*args: str, refusal_ok: bool = False) -> float | None:
    """Run one craft-deploy command; its wall seconds, or None when it refused (exit 2) and `refusal_ok`."""
    print("$ craft-deploy " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "craft_deploy.cli.main", *args]).returncode
    if rc == 2 and refusal_ok:
        return None
    if rc:
        raise SystemExit(f"craft-deploy {args[0]} exited {rc}")
    return time.perf_counter() - t0


def treatments_of_bundle(path: Path) -> dict[str, str]:
    """Each compressed layer's treatment as tune names them (2:4, int8, w4, wXaY, joined by +), from the manifest."""
    manifest = load_bundle(path).manifest
    pruned = (method_state(manifest, "prune") or {}).get("layers", {})
    quant = (method_state(manifest, "quantize") or {}).get("layers", {})
    short = {(8, 8): "int8", (4, 16): "w4"}
    out = {}
    for name in {**pruned, **quant}:
        parts = [pruned[name]] if name in pruned else []
        if name in quant:
            bits = (quant[name]["w_bits"], quant[name]["a_bits"])
            parts.append(short.get(bits, f"w{bits[0]}a{bits[1]}"))
        out[name] = "+".join(parts)
    return out


def row(path: Path, drop: float, max_drop: float, seconds: float) -> dict:
    mb = weight_megabytes(load_bundle(path).model, treatments_of_bundle(path))
    return {"test_top1_drop": drop, "megabytes": mb["tuned"], "dense_megabytes": mb["dense"],
            "nm_share": mb["nm_share_of_all_weights"], "within_budget": drop <= max_drop,
            "seconds": seconds}  # fmt: skip


def finetuned(seed: int, work: Path) -> Path:
    """The demo's Adam fine-tune with this seed, in `work` (kept: tune_latency.py shares it)."""
    ft = work / f"adam-s{seed}"
    if not (ft / "finetune.json").exists():
        cli("finetune", "--data", "fashion-mnist", "--optimizer", "adam", "--epochs", "2", "--img-size", "64",
            "--train-subset", "6000", "--eval-subset", "1000", "--threads", "2", "--seed", str(seed),
            "--out", str(ft), "--overwrite")  # fmt: skip
    return ft


def run_seed(seed: int, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    ft = finetuned(seed, work)
    rows: dict[str, dict] = {}
    common = ["--calib-samples", "512", "--eval-subset", str(args.eval_subset), "--seed", "0"]
    for objective in OBJECTIVES:
        out = work / f"tune-{objective}-s{seed}"
        refused = out.with_name(out.name + ".refused")
        seconds = None
        if not (out / "tune.json").exists() and not refused.exists():
            seconds = cli("tune", str(ft), "--objective", objective, "--max-drop", str(args.max_drop), *common,
                          "--out", str(out), "--overwrite", refusal_ok=True)  # fmt: skip
            if seconds is None:
                refused.touch()
        if refused.exists():  # no recipe within the budget on the held-out images: tune said so and wrote nothing
            rows[f"tune {objective}"] = {"test_top1_drop": None, "megabytes": None, "nm_share": None,
                                         "within_budget": False, "refused": True}  # fmt: skip
            continue
        rec = json.loads((out / "tune.json").read_text())
        best = next(f for f in rec["finalists"] if f["search"] == rec["chosen"])
        r = row(out / "bundle", best["test_top1_drop"], args.max_drop, seconds or rec["timings"]["total_seconds"])
        r.update(search=rec["chosen"], layers=best["counts"], sensitivity_seconds=rec["timings"]["sensitivity_seconds"],
                 finalists=[{k: f.get(k) for k in ("search", "counts", "val_top1_drop", "predicted_drop",
                                                   "test_top1_drop", "passed", "value_share")}
                            for f in rec["finalists"]])  # fmt: skip
        rows[f"tune {objective}"] = r
    for name, flags in UNIFORM.items():
        out = work / f"uniform-{name.replace(' ', '-').replace(':', '')}-s{seed}"
        seconds = 0.0
        if not (out / "compress.json").exists():
            seconds = cli("compress", str(ft), *flags, *common, "--out", str(out), "--overwrite")
        metrics = json.loads((out / "compress.json").read_text())["metrics"]
        rows[name] = row(out, metrics["test_top1_drop"], args.max_drop, seconds)
    return rows


def mean_std(values: list[float | None], scale: float = 1.0) -> str:
    """mean +- std over the seeds that have a value; the others (tune refused) are counted apart."""
    refused = values.count(None)
    values = [scale * v for v in values if v is not None]
    note = f" ({refused} refused)" if refused else ""
    if not values:
        return "-" + note
    if len(values) < 2:
        return f"{values[0]:.2f}{note}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}{note}"


def table(per_seed: dict[int, dict[str, dict]], max_drop: float) -> str:
    names = list(next(iter(per_seed.values())))
    lines = [
        f"| recipe (--max-drop {max_drop}) | test top-1 drop | weight MB | N:M share of weights | within budget |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        rs = [per_seed[s][name] for s in per_seed]
        ok = sum(r["within_budget"] for r in rs)
        lines.append(
            f"| {name} | {mean_std([r['test_top1_drop'] for r in rs])} | {mean_std([r['megabytes'] for r in rs])} | "
            f"{mean_std([r['nm_share'] for r in rs], 100)}% | {ok}/{len(rs)} |"
        )
    dense = next(r["dense_megabytes"] for rows in per_seed.values() for r in rows.values() if "dense_megabytes" in r)
    lines.append(f"| float32 | 0 | {dense:.2f} | 0% | - |")
    return "\n".join(lines)


def add_tune_bench_options(ap: argparse.ArgumentParser) -> None:
    """--seeds, --work (shared fine-tunes), --max-drop, --eval-subset, --out: what every tune benchmark takes."""
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=Path("runs/tune-bench"))
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_bench_options(ap)
    args = ap.parse_args()
    per_seed = {int(s): run_seed(int(s), args.work, args) for s in args.seeds.split(",")}
    write_results(args.out, "tune-default", table(per_seed, args.max_drop), seeds=per_seed, max_drop=args.max_drop)


if __name__ == "__main__":
    main()
