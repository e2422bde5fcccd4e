"""The main job on the bundled default: finetune (Adam, SAM) -> compress -> export -> bench, then one table.

Compression: W8A8 (PyTorch accuracy, the CrAFT paper's setting); 2:4 + W8A8 as we recommend it (SparseGPT, MSE
calibration, BatchNorm re-estimation), one-shot and after one recovery epoch distilled from the dense model, with the
naive 2:4 (magnitude, min-max, no BatchNorm re-estimation) beside it as the contrast; and the INT8 model this CPU
runs fast and exactly: W7A8 with ONNX Runtime's quantizer placement, exported U8S8 (7-bit weights cannot overflow the
16-bit pair sums of x86 CPUs without VNNI), benchmarked against the FP32 ONNX.

Where OpenVINO is installed (the test extra has it), the deployed CPU model and its FP32 file are then run in ONNX
Runtime and OpenVINO side by side, round-robin (benchmarks/cpu_runtimes.py), and the demo says which runtime is faster
on this host.

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
        ft, cp, sp, cpu, ex32, ex8, rec, rrec = (out / f"{opt}{s}" for s in SUFFIXES)
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
            *("--sparsity", "2:4", "--prune-method", "sparsegpt", "--quant", "w8a8", "--calib-method", "mse"),
            *("--bn-recalibrate", "--calib-samples", "256", *common, "--out", str(rec)),
        )
        cli(
            "finetune",
            *("--init", str(rec), "--epochs", "1", "--train-subset", str(args.train_subset), *common),
            *("--threads", str(args.threads), "--out", str(rrec)),
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


def compare_runtimes(out: Path, args: argparse.Namespace) -> None:
    """The first fine-tune's FP32 and deployed CPU files in ONNX Runtime and OpenVINO, round-robin (if installed)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("\nOpenVINO is not installed (pip install 'craft-deploy[openvino]'): runtimes not compared", flush=True)
        return
    opt = OPTIMIZERS[0]
    files = [str(out / f"{opt}{s}" / "model.onnx") for s in ("-fp32-onnx", "-w7a8-cpu-onnx")]
    cmd = [sys.executable, str(Path(__file__).with_name("cpu_runtimes.py")), *files, "--images", str(args.eval_subset),
           "--rounds", "5", "--threads", str(args.threads), "--out", str(out / "cpu-runtimes")]  # fmt: skip
    print("\n$ python benchmarks/cpu_runtimes.py " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def runtimes_summary(out: Path) -> list[str]:
    """The side-by-side table and which runtime runs the deployed CPU model fastest, from cpu-runtimes.json."""
    path = out / "cpu-runtimes" / "cpu-runtimes.json"
    if not path.is_file():
        return []
    rec = load(path)
    cpu = [r for r in rec["rows"] if "w7a8" in Path(r["file"]).parent.name]
    best = min(cpu, key=lambda r: r["p50_ms_b16"])
    ort = next(r for r in cpu if r["runtime"] == "onnxruntime")
    return [
        "",
        f"{OPTIMIZERS[0]}'s files in ONNX Runtime and OpenVINO side by side (round-robin, 5 passes, p50 ms):",
        "",
        rec["table"],
        "",
        f"fastest runtime for the deployed CPU model on this host: {best['runtime']} ({best['p50_ms_b1']:.2f} / "
        f"{best['p50_ms_b16']:.2f} ms at batch 1 / 16, {ort['p50_ms_b16'] / best['p50_ms_b16']:.2f}x ONNX Runtime at "
        f"batch 16, top-1 {best['top1']:.2f})",
    ]


OPTIMIZERS = ("adam", "sam")
SUFFIXES = ("", "-w8a8", "-2of4-w8a8", "-w7a8-cpu", "-fp32-onnx", "-w7a8-cpu-onnx", "-2of4-sparsegpt-w8a8",
            "-2of4-sparsegpt-w8a8-rec")  # fmt: skip


def summarize(out: Path, args: argparse.Namespace, seconds: float | None) -> str:
    """The demo table, read back from the records the commands wrote."""
    rows = []
    for opt in OPTIMIZERS:
        ft, cp, sp, cpu, ex32, ex8, rec, rrec = (out / f"{opt}{s}" for s in SUFFIXES)
        f, c, s = load(ft / "finetune.json"), load(cp / "compress.json"), load(sp / "compress.json")
        r1, r2 = load(rec / "compress.json"), load(rrec / "finetune.json")
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
                "nm24_recommended_oneshot_top1": r1["metrics"]["test_top1_after"],
                "nm24_recommended_recovered_top1": r2["metrics"]["test_top1"],
                "cpu_int8_pytorch_top1": q["metrics"]["test_top1_after"],
                "cpu_int8_onnx_top1": pick(ex8, "top1"),
                "fp32_ms": {b: pick(ex32, "p50_ms", b) for b in (1, 16)},
                "cpu_int8_ms": {b: pick(ex8, "p50_ms", b) for b in (1, 16)},
            }
        )
    lines = [
        f"Fashion-MNIST test top-1 (%, first {args.eval_subset} of a seeded permutation of the 10k test images), "
        f"tf_efficientnet_lite0 at 64 px fine-tuned on {args.train_subset} training images x {args.epochs} epochs; "
        f"latency: ONNX Runtime CPU, {args.threads} threads, p50 ms. Recommended 2:4 = SparseGPT + MSE calibration + "
        "BatchNorm re-estimation (recovery: one epoch, distilled from the dense model); naive = magnitude + min-max, "
        "no re-estimation: the contrast, not a recipe.",
        "",
        "| fine-tune | s/epoch | FP32 | FP32 ONNX | W8A8 PyTorch | 2:4+W8A8 recommended, one-shot "
        "| 2:4+W8A8 recommended, 1 recovery epoch | 2:4+W8A8 naive (contrast) | W7A8 ort-cpu PyTorch "
        "| W7A8 ort-cpu ONNX | FP32 ONNX ms b1 / b16 | W7A8 ort-cpu ONNX ms b1 / b16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['seconds_per_epoch']:.0f} | {r['fp32_top1']:.2f} | {r['fp32_onnx_top1']:.2f} "
            f"| {r['w8a8_pytorch_top1']:.2f} | {r['nm24_recommended_oneshot_top1']:.2f} "
            f"| {r['nm24_recommended_recovered_top1']:.2f} | {r['nm24_w8a8_top1']:.2f} "
            f"| {r['cpu_int8_pytorch_top1']:.2f} "
            f"| {r['cpu_int8_onnx_top1']:.2f} | {r['fp32_ms'][1]:.2f} / {r['fp32_ms'][16]:.2f} "
            f"| {r['cpu_int8_ms'][1]:.2f} / {r['cpu_int8_ms'][16]:.2f} |"
        )
    lines += runtimes_summary(out)
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
        compare_runtimes(out, args)
        seconds = time.perf_counter() - t0
    print("\n" + summarize(out, args, seconds))


if __name__ == "__main__":
    main()
