"""Our INT8 files against NNCF's on this CPU, side by side: the same FP32 model, the same calibration images, the same
test images, every (file, runtime) timed round-robin in one process.

Peers (run in a benchmark venv: NNCF is not a dependency of craft-deploy):
- NNCF `quantize` of the FP32 ONNX (read by OpenVINO), on the calibration images craft-deploy's `compress` uses
  (the first `--calib-samples` of the training split's seeded permutation);
- NNCF `quantize_with_accuracy_control`, max drop `--max-drop` points absolute, validated on the validation split
  (never the test images).
Ours: the ONNX files `craft-deploy export` wrote (FP32 and Q/DQ INT8), in ONNX Runtime and in OpenVINO (f32 and,
where the CPU has it, bf16 precision hints); each OpenVINO run of our files checked against the file in ONNX Runtime
first. Top-1 on the first `--images` test images; p50 per batch, the median over `--rounds` round-robin passes.

    python -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        -e '.[openvino]' nncf
    /work/bench-venv/bin/python benchmarks/cpu_peers.py FP32.onnx OURS_1.onnx [OURS_2.onnx ...] \
        --calib-samples 512 --images 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from harness import add_common, batch_sizes, round_robin, write_results
from torch.utils.data import DataLoader
from tqdm import tqdm

from craft_deploy.bench import REFERENCE_IMAGES, resolve_model
from craft_deploy.bench.backends import OpenVino, OrtCpu
from craft_deploy.bench.measure import measure_accuracy
from craft_deploy.config import CompressConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.runtimes.metadata import read_metadata


def nncf_peers(fp32: Path, meta: dict, args: argparse.Namespace) -> dict[str, tuple[Path, float]]:
    """NNCF's two quantizations of the FP32 file, saved as IR beside a copy of its metadata; name -> (IR, seconds)."""
    import nncf
    import openvino as ov

    splits = splits_for_manifest(meta, None, args.images)
    seed = next(f.default for f in dataclasses.fields(CompressConfig) if f.name == "seed")
    calib = calibration_subset(splits.train, args.calib_samples, seed)  # the images `compress` draws
    to_input = lambda item: item[0].numpy()  # noqa: E731
    calib_ds = nncf.Dataset(DataLoader(calib, batch_size=1), to_input)
    core = ov.Core()
    out: dict[str, tuple[Path, float]] = {}

    def save(name: str, model, seconds: float) -> None:
        d = args.work / name
        d.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(d / "model.xml"), compress_to_fp16=False)
        (d / "metadata.json").write_text(json.dumps(meta))
        out[name] = (d / "model.xml", seconds)

    t0 = time.perf_counter()
    save("nncf-quantize", nncf.quantize(core.read_model(str(fp32)), calib_ds, subset_size=args.calib_samples),
         time.perf_counter() - t0)  # fmt: skip

    val = DataLoader(splits.val, batch_size=64)

    def validate(compiled, items) -> float:
        hits = total = 0
        for x, y in items:
            logits = compiled(x.numpy())[0]
            hits += int((logits.argmax(1) == y.numpy()).sum())
            total += len(y)
        return hits / total

    t0 = time.perf_counter()
    controlled = nncf.quantize_with_accuracy_control(
        core.read_model(str(fp32)),
        calibration_dataset=calib_ds,
        validation_dataset=nncf.Dataset(val),
        validation_fn=validate,
        max_drop=args.max_drop / 100.0,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=args.calib_samples,
    )
    save("nncf-accuracy-control", controlled, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", type=Path, help="The FP32 ONNX file craft-deploy exported (the peers quantize it).")
    ap.add_argument("ours", nargs="*", type=Path, help="Our Q/DQ ONNX files of the same model.")
    add_common(ap)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("runs/cpu-peers"), help="Where the peers' IR files are saved.")
    ap.add_argument("--max-drop", type=float, default=0.5, help="quantize_with_accuracy_control's budget, points.")
    ap.add_argument("--precisions", default="fp32,bf16", help="OpenVINO precision hints to run.")
    ap.add_argument("--stem", default="cpu-peers", help="Results file names (one per kind of host: cpu-peers-amd).")
    args = ap.parse_args()
    batches = batch_sizes(args)
    fp32, meta = resolve_model(args.fp32, "onnx")
    if any(n.op_type == "QuantizeLinear" for n in onnx.load(str(fp32), load_external_data=False).graph.node):
        sys.exit(f"error: {fp32} holds Q/DQ nodes; the peers need the FP32 file craft-deploy exported")
    ds = splits_for_manifest(meta, None, args.images).test
    images = next(iter(DataLoader(ds, batch_size=max(REFERENCE_IMAGES, *batches))))[0].numpy()
    peers = nncf_peers(fp32, meta, args)

    candidates: list[tuple[str, str, object, float | None]] = []
    for path in [fp32, *(resolve_model(p, "onnx")[0] for p in args.ours)]:
        candidates.append((path.parent.name, "onnxruntime", OrtCpu(path, args.threads), None))
        for p in args.precisions.split(","):
            candidates.append((path.parent.name, f"openvino {p}", OpenVino(path, args.threads, precision=p), None))
    for name, (xml, seconds) in peers.items():
        for p in args.precisions.split(","):
            candidates.append((name, f"openvino {p}", OpenVino(xml, args.threads, precision=p), seconds))
    rows, runners = [], {}
    for name, runtime, backend, seconds in tqdm(candidates, desc="accuracy", unit="model"):
        ours = seconds is None
        check = backend.reference_check(images[:REFERENCE_IMAGES]) if ours and backend.checks_reference else None
        acc = measure_accuracy(backend, ds)
        rows.append({"file": name, "runtime": runtime, "top1": acc["top1"], "images": acc["samples"], "check": check,
                     "peer": not ours, "quantize_seconds": seconds})  # fmt: skip
        for bs in batches:
            runners[(len(rows) - 1, bs)] = (backend, np.ascontiguousarray(images[:bs]))
    for (i, bs), p50s in round_robin(runners, args.rounds).items():
        rows[i][f"p50_ms_b{bs}"] = float(np.median(p50s))
        rows[i][f"round_p50_ms_b{bs}"] = p50s
    import nncf

    write_results(
        args.out,
        args.stem,
        _table(rows, batches, args.images, args.calib_samples),
        environment_extra={"nncf": nncf.__version__},
        fp32_metadata=read_metadata(onnx.load(str(fp32), load_external_data=False)),
        rows=rows,
    )


def _table(rows: list[dict], batches: list[int], images: int, calib: int) -> str:
    head = " | ".join(f"batch {b} ms" for b in batches)
    fp32 = next(r for r in rows if r["runtime"] == "onnxruntime")  # the first file is the FP32 one
    lines = [
        f"| file | runtime | {head} | x ONNX Runtime FP32 (b{batches[-1]}) | top-1 % ({images} images) | check |",
        "|---|---|" + "---|" * (len(batches) + 3),
    ]
    for r in rows:
        check = r["check"]
        if r["peer"]:
            verdict = f"peer (NNCF, {calib} calibration images, {r['quantize_seconds']:.0f} s)"
        else:
            verdict = "-" if check is None else f"{'ok' if check['passed'] else 'FAILED'} vs ONNX Runtime"
        times = " | ".join(f"{r[f'p50_ms_b{b}']:.2f}" for b in batches)
        speedup = fp32[f"p50_ms_b{batches[-1]}"] / r[f"p50_ms_b{batches[-1]}"]
        lines.append(f"| {r['file']} | {r['runtime']} | {times} | {speedup:.2f}x | {r['top1']:.2f} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
