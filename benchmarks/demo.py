"""The main job on the bundled default: finetune (Adam, SAM) -> compress -> export -> bench, then one table.

Compression: W8A8 and 2:4+W8A8 (PyTorch accuracy, the CrAFT paper's settings) and the INT8 model this CPU runs
fast and exactly: W7A8 with ONNX Runtime's quantizer placement, exported U8S8 (7-bit weights cannot overflow the
16-bit pair sums of x86 CPUs without VNNI), benchmarked against the FP32 ONNX.

Runs the real `craft-deploy` commands one after another (as a user would) and reads their JSON records.
    python benchmarks/demo.py --out runs/demo [--overwrite] [--train-subset 6000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "craft_deploy.cli.main", *args]
    print("\n$ craft-deploy " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def run_pipeline(out: Path, args: argparse.Namespace) -> None:
    common = ["--eval-subset", str(args.eval_subset)]
    for opt in OPTIMIZERS:
        ft, cp, sp, cpu, ex32, ex8 = (out / f"{opt}{s}" for s in SUFFIXES)
        cli(
            "finetune",
            "--data",
            "fashion-mnist",
            "--optimizer",
            opt,
            "--epochs",
            str(args.epochs),
            "--img-size",
            "64",
            "--train-subset",
            str(args.train_subset),
            *common,
            "--threads",
            str(args.threads),
            "--out",
            str(ft),
        )
        cli("compress", str(ft), "--quant", "w8a8", "--calib-samples", "256", *common, "--out", str(cp))
        cli(
            "compress",
            str(ft),
            "--sparsity",
            "2:4",
            "--quant",
            "w8a8",
            "--calib-samples",
            "256",
            *common,
            "--out",
            str(sp),
        )
        cli(
            "compress",
            str(ft),
            "--quant",
            "w7a8",
            "--placement",
            "ort-cpu",
            "--calib-method",
            "mse",
            "--bn-recalibrate",
            "--calib-samples",
            "256",
            *common,
            "--out",
            str(cpu),
        )
        cli("export", str(ft), "--format", "onnx", "--out", str(ex32))
        cli("export", str(cpu), "--format", "onnx", "--target", "ort-cpu", "--out", str(ex8))
        cli(
            "bench",
            str(ex32 / "model.onnx"),
            str(ex8 / "model.onnx"),
            "--backend",
            "ort-cpu",
            "--batch-sizes",
            "1,16",
            *common,
            "--threads",
            str(args.threads),
            "--out",
            str(out / f"{opt}-bench"),
        )


OPTIMIZERS = ("adam", "sam")
SUFFIXES = ("", "-w8a8", "-2of4-w8a8", "-w7a8-cpu", "-fp32-onnx", "-w7a8-cpu-onnx")


def summarize(out: Path, args: argparse.Namespace, seconds: float | None) -> str:
    """The demo table, read back from the records the commands wrote."""
    rows = []
    for opt in OPTIMIZERS:
        ft, cp, sp, cpu, ex32, ex8 = (out / f"{opt}{s}" for s in SUFFIXES)
        f, c, s = load(ft / "finetune.json"), load(cp / "compress.json"), load(sp / "compress.json")
        q = load(cpu / "compress.json")
        bench = load(out / f"{opt}-bench" / "bench.json")["results"]

        def pick(export_dir: Path, key: str, batch: int | None = None) -> float:
            name = os.path.normpath(str(export_dir / "model.onnx"))
            return next(r[key] for r in bench if r["model"] == name and (batch is None or r["batch"] == batch))

        rows.append(
            {
                "optimizer": opt,
                "seconds_per_epoch": f["timings"]["seconds_per_epoch"],
                "fp32_top1": f["metrics"]["test_top1"],
                "fp32_onnx_top1": pick(ex32, "top1"),
                "w8a8_pytorch_top1": c["metrics"]["test_top1_after"],
                "nm24_w8a8_top1": s["metrics"]["test_top1_after"],
                "cpu_int8_pytorch_top1": q["metrics"]["test_top1_after"],
                "cpu_int8_onnx_top1": pick(ex8, "top1"),
                "fp32_ms": {b: pick(ex32, "p50_ms", b) for b in (1, 16)},
                "cpu_int8_ms": {b: pick(ex8, "p50_ms", b) for b in (1, 16)},
            }
        )
    lines = [
        f"Fashion-MNIST test top-1 (%, first {args.eval_subset} of a seeded permutation of the 10k test images), "
        f"tf_efficientnet_lite0 at 64 px fine-tuned on {args.train_subset} training images x {args.epochs} epochs; "
        f"latency: ONNX Runtime CPU, {args.threads} threads, p50 ms.",
        "",
        "| fine-tune | s/epoch | FP32 | FP32 ONNX | W8A8 PyTorch | 2:4+W8A8 PyTorch | W7A8 ort-cpu PyTorch "
        "| W7A8 ort-cpu ONNX | FP32 ONNX ms b1 / b16 | W7A8 ort-cpu ONNX ms b1 / b16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['seconds_per_epoch']:.0f} | {r['fp32_top1']:.2f} | {r['fp32_onnx_top1']:.2f} "
            f"| {r['w8a8_pytorch_top1']:.2f} | {r['nm24_w8a8_top1']:.2f} | {r['cpu_int8_pytorch_top1']:.2f} "
            f"| {r['cpu_int8_onnx_top1']:.2f} | {r['fp32_ms'][1]:.2f} / {r['fp32_ms'][16]:.2f} "
            f"| {r['cpu_int8_ms'][1]:.2f} / {r['cpu_int8_ms'][16]:.2f} |"
        )
    if seconds is not None:
        lines.append(f"\ndemo wall time: {seconds:.0f} s")
    table = "\n".join(lines)
    (out / "demo.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "args": vars(args)}, indent=2) + "\n")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--eval-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summarize-only", action="store_true", help="Rebuild the table from an earlier run's records.")
    args = ap.parse_args()
    out = Path(args.out)
    seconds = None
    if not args.summarize_only:
        if out.exists() and any(out.iterdir()):
            if not args.overwrite:
                sys.exit(f"error: {out} is not empty; pass --overwrite or choose another --out")
            shutil.rmtree(out)
        t0 = time.perf_counter()
        run_pipeline(out, args)
        seconds = time.perf_counter() - t0
    print("\n" + summarize(out, args, seconds))


if __name__ == "__main__":
    main()
