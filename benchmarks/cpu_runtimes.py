"""Our exported files on this CPU's runtimes side by side: ONNX Runtime and OpenVINO (f32, and bf16 where the CPU has
it), p50 per batch round-robin over every (file, runtime), top-1 on the same test images, each OpenVINO run checked
against the file in ONNX Runtime first (the bench backend's check).

python benchmarks/cpu_runtimes.py runs/demo/adam-fp32-onnx/model.onnx runs/demo/adam-w7a8-cpu-onnx/model.onnx \
    --images 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import add_common, batch_sizes, round_robin, write_results
from torch.utils.data import DataLoader

from craft_deploy.bench import REFERENCE_IMAGES, resolve_model
from craft_deploy.bench.backends import OpenVino, OrtCpu
from craft_deploy.bench.measure import measure_accuracy
from craft_deploy.data import splits_for_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="Exported ONNX files.")
    add_common(ap)
    ap.add_argument("--precisions", default="fp32,bf16", help="OpenVINO precision hints to run.")
    args = ap.parse_args()
    batches = batch_sizes(args)
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
    for (i, bs), p50s in round_robin(runners, args.rounds).items():
        rows[i][f"p50_ms_b{bs}"] = float(np.median(p50s))
        rows[i][f"round_p50_ms_b{bs}"] = p50s
    write_results(args.out, "cpu-runtimes", _table(rows, batches, args.images), rows=rows)


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
