"""Our exported files on this CPU's runtimes side by side: ONNX Runtime and OpenVINO (f32, and bf16 where the CPU has
it), p50 per batch round-robin over every (file, runtime), top-1 on the same test images, each OpenVINO run checked
against the file in ONNX Runtime first (the bench backend's check).

python benchmarks/cpu_runtimes.py runs/demo/adam-fp32-onnx/model.onnx runs/demo/adam-w7a8-cpu-onnx/model.onnx \
    --images 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from craft_deploy.bench import REFERENCE_IMAGES, resolve_model
from craft_deploy.bench.backends import OpenVino, OrtCpu
from craft_deploy.bench.measure import measure_accuracy, measure_latency
from craft_deploy.data import splits_for_manifest
from craft_deploy.records import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="Exported ONNX files.")
    ap.add_argument(
        "--images", type=int, default=2000, help="Test images for top-1 (the first of a seeded permutation)."
    )
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="Round-robin passes; each row's p50 is the median pass's.")
    ap.add_argument("--precisions", default="fp32,bf16", help="OpenVINO precision hints to run.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    runners, rows = {}, []
    for path in args.models:
        path, meta = resolve_model(path, "onnx")
        ds = splits_for_manifest(meta, None, args.images).test
        candidates = {"onnxruntime": OrtCpu(path, args.threads)}
        for p in args.precisions.split(","):
            candidates[f"openvino {p}"] = OpenVino(path, args.threads, precision=p)
        images = next(iter(DataLoader(ds, batch_size=max(REFERENCE_IMAGES, *batches))))[0].numpy()
        for runtime, backend in candidates.items():
            check = backend.reference_check(images[:REFERENCE_IMAGES]) if backend.checks_reference else None
            acc = measure_accuracy(backend, ds)
            row = {"file": str(path), "runtime": runtime, "top1": acc["top1"], "images": acc["samples"], "check": check}
            rows.append(row)
            for bs in batches:
                runners[(len(rows) - 1, bs)] = (backend, np.ascontiguousarray(images[:bs]))
    passes: dict = {k: [] for k in runners}
    for _ in tqdm(range(args.rounds), desc="round-robin passes", unit="pass"):
        for key, (backend, batch) in runners.items():
            passes[key].append(measure_latency(backend, batch, warmup=5, iters=30, min_seconds=0.3)["p50_ms"])
    for (i, bs), p50s in passes.items():
        rows[i][f"p50_ms_b{bs}"] = float(np.median(p50s))
        rows[i][f"round_p50_ms_b{bs}"] = p50s
    table = _table(rows, batches, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "environment": environment(), "rows": rows, "table": table}
    (args.out / "cpu-runtimes.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (args.out / "cpu-runtimes.md").write_text(table + "\n")
    print(table)


def _table(rows: list[dict], batches: list[int], images: int) -> str:
    head = " | ".join(f"batch {b} ms" for b in batches)
    lines = [
        f"| file | runtime | {head} | top-1 % ({images} images) | check vs ONNX Runtime |",
        "|---|---|" + "---|" * (len(batches) + 2),
    ]
    for r in rows:
        check = r["check"]
        verdict = (
            "-" if check is None else f"{'ok' if check['passed'] else 'FAILED'}, max diff {check['max_abs_diff']:.2g}"
        )
        times = " | ".join(f"{r[f'p50_ms_b{b}']:.2f}" for b in batches)
        lines.append(f"| {Path(r['file']).parent.name} | {r['runtime']} | {times} | {r['top1']:.2f} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
