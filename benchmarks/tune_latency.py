"""`craft-deploy tune --objective latency` on the default against the uniform CPU recipe, timed side by side.

For every seed: the demo's Adam fine-tune (shared with benchmarks/tune.py), then
- `tune --objective latency --backend ort-cpu --max-drop` (W7A8 per layer with ONNX Runtime's placement, each layer
  priced by ONNX Runtime's profiler, finalists timed by tune itself);
- the uniform recipe craft-deploy ships for ONNX Runtime: `compress --quant w7a8 --placement ort-cpu --calib-method
  mse --bn-recalibrate`, with the same calibration images (512, seed 0 of the training split);
- the three exported for ONNX Runtime (float: FP32; the two recipes: `--target ort-cpu`), then one
  `bench --rounds R` of the three files together, so the latency ratios come from one round-robin run; and, where
  OpenVINO is installed, one more `bench --backend openvino` of the same three files.
Test top-1 drop from the compress / tune records (2000 held-out test images); p50 per batch from bench.

    python benchmarks/tune_latency.py --seeds 0,1,2 --work runs/tune-bench [--max-drop 1.0] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import write_results
from tune import add_tune_bench_options, cli, finetuned, mean_std

from craft_deploy.bench.backends import OpenVino

UNIFORM = ["--quant", "w7a8", "--placement", "ort-cpu", "--calib-method", "mse", "--bn-recalibrate"]
ROWS = ("float", "uniform w7a8+ort-cpu+bn", "tune latency")


def exported(bundle: Path, out: Path, *flags: str) -> Path:
    if not (out / "model.onnx").exists():
        cli("export", str(bundle), *flags, "--out", str(out), "--overwrite")
    return out / "model.onnx"


def benched(files: dict[str, Path], out: Path, backend: str, args: argparse.Namespace) -> dict[str, dict]:
    """name -> {p50 ms per batch, top1} from one round-robin bench of all the files."""
    if not (out / "bench.json").exists():
        timing = ["--rounds", str(args.rounds), "--batch-sizes", "1,16", "--threads", "2"]
        cli("bench", *map(str, files.values()), "--backend", backend, *timing, "--eval-subset", str(args.eval_subset),
            "--out", str(out), "--overwrite")  # fmt: skip
    rec = json.loads((out / "bench.json").read_text())
    by_file = {str(p): name for name, p in files.items()}
    got: dict[str, dict] = {name: {"p50_ms": {}} for name in files}
    for r in rec["results"]:
        got[by_file[r["model"]]]["p50_ms"][r["batch"]] = r["p50_ms"]
        got[by_file[r["model"]]]["top1"] = r["top1"]
    return got


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict]:
    work = args.work
    ft = finetuned(seed, work)
    common = ["--calib-samples", "512", "--eval-subset", str(args.eval_subset), "--seed", "0"]
    tuned = work / f"tune-latency-d{args.max_drop}-s{seed}"
    refused = tuned.with_name(tuned.name + ".refused")
    if not (tuned / "tune.json").exists() and not refused.exists():
        if cli("tune", str(ft), "--objective", "latency", "--backend", "ort-cpu", "--max-drop", str(args.max_drop),
               "--threads", "2", *common, "--out", str(tuned), "--overwrite", refusal_ok=True) is None:  # fmt: skip
            refused.touch()
    uniform = work / f"uniform-w7a8-ort-cpu-bn-s{seed}"
    if not (uniform / "compress.json").exists():
        cli("compress", str(ft), *UNIFORM, *common, "--out", str(uniform), "--overwrite")
    drops = {
        "float": 0.0,
        "uniform w7a8+ort-cpu+bn": json.loads((uniform / "compress.json").read_text())["metrics"]["test_top1_drop"],
    }
    files = {
        "float": exported(ft, work / f"onnx-float-s{seed}"),
        "uniform w7a8+ort-cpu+bn": exported(uniform, work / f"onnx-uniform-s{seed}", "--target", "ort-cpu"),
    }
    extra: dict = {}
    if not refused.exists():
        rec = json.loads((tuned / "tune.json").read_text())
        best = next(f for f in rec["finalists"] if f["search"] == rec["chosen"])
        drops["tune latency"] = best["test_top1_drop"]
        files["tune latency"] = exported(tuned / "bundle", tuned.with_name(f"onnx-{tuned.name}"), "--target", "ort-cpu")
        extra = {"search": rec["chosen"], "layers": best["counts"], "predicted_drop": best["predicted_drop"],
                 "val_top1_drop": best["val_top1_drop"], "tune_timing": rec["timing"],
                 "tune_seconds": rec["timings"]["total_seconds"],
                 "priced_ms": rec["latency"]["priced_ms"], "unpriced_ms": rec["latency"]["unpriced_ms"]}  # fmt: skip
    runtimes = {"onnxruntime": benched(files, work / f"bench-ort-d{args.max_drop}-s{seed}", "ort-cpu", args)}
    if OpenVino.availability()[0]:
        runtimes["openvino"] = benched(files, work / f"bench-ov-d{args.max_drop}-s{seed}", "openvino", args)
    rows = {}
    for name in ROWS:
        if name not in files:
            rows[name] = {"refused": True, "test_top1_drop": None, "within_budget": False}
            continue
        rows[name] = {"test_top1_drop": drops[name], "within_budget": drops[name] <= args.max_drop,
                      **{rt: got[name] for rt, got in runtimes.items()}}  # fmt: skip
        if name == "tune latency":
            rows[name].update(extra)
    return rows


def table(per_seed: dict[int, dict[str, dict]], max_drop: float) -> str:
    runtimes = [
        rt for rt in ("onnxruntime", "openvino") if any(rt in r for rows in per_seed.values() for r in rows.values())
    ]
    head = "".join(f" {rt} b1 ms | {rt} b16 ms | {rt} x float (b16) |" for rt in runtimes)
    lines = [f"| recipe (--max-drop {max_drop}) | test top-1 drop | within budget |{head}",
             "|---|---|---|" + "---|---|---|" * len(runtimes)]  # fmt: skip
    for name in ROWS:
        rs = [per_seed[s][name] for s in per_seed]
        cells = [mean_std([r["test_top1_drop"] for r in rs]), f"{sum(r['within_budget'] for r in rs)}/{len(rs)}"]
        for rt in runtimes:
            ms = {b: [r[rt]["p50_ms"][b] if rt in r else None for r in rs] for b in (1, 16)}
            base = [per_seed[s]["float"][rt]["p50_ms"][16] for s in per_seed]
            ratio = [None if m is None else f / m for f, m in zip(base, ms[16])]
            cells += [mean_std(ms[1]), mean_std(ms[16]), mean_std(ratio)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_bench_options(ap)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stem", default="tune-latency-default")
    args = ap.parse_args()
    per_seed = {int(s): run_seed(int(s), args) for s in args.seeds.split(",")}
    note = "mean +- std over seeds; each seed's latencies from one round-robin bench of its three files"
    write_results(args.out, args.stem, table(per_seed, args.max_drop), seeds=per_seed, max_drop=args.max_drop,
                  spread=note)  # fmt: skip


if __name__ == "__main__":
    main()
