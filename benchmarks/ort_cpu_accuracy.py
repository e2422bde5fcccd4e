"""Is our INT8 export as accurate as ONNX Runtime's `quantize_static`? A paired comparison on the same test images.

    python benchmarks/ort_cpu_accuracy.py --calib-samples 256 1024

On the default (the SAM fine-tune of the seed sweep), for each calibration size: ours = `compress --quant w7a8
--placement ort-cpu --calib-method mse --bn-recalibrate` + `export --target ort-cpu`; the peer = `quant_pre_process`
+ `quantize_static` U8S8 with `reduce_range` (7-bit weights, ONNX Runtime's most accurate setting on this AVX2 CPU),
on the same calibration images. Both run in ONNX Runtime with every optimisation (this CPU's integer kernels) on the
same test images; the images only one of them classifies right are counted, with McNemar's exact two-sided p-value.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from ort_cpu_speed import TRAINED, peer_quantize, session

from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.export import run as export
from craft_deploy.models import load_bundle


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs (binomial test of b against p = 1/2)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def predictions(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    sess = session(path, threads)
    return np.concatenate([sess.run(None, {"input": images[i : i + 64]})[0] for i in range(0, len(images), 64)]).argmax(
        1
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/ort_cpu_accuracy")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle, work = Path(TRAINED["default"]), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    splits = splits_for_manifest(load_bundle(bundle).manifest, eval_subset=args.eval_subset)
    xs, ys = zip(*(splits.test[i] for i in range(len(splits.test))))
    images, labels = torch.stack(xs).numpy(), np.array(ys)
    fp32 = work / "fp32"
    if not fp32.exists():
        export(ExportConfig(verify_samples=16), bundle, fp32)
    rows = []
    for n in args.calib_samples:
        calib_ds = calibration_subset(splits.train, n)
        calib = np.stack([calib_ds[i][0].numpy() for i in range(len(calib_ds))])
        peer = peer_quantize(fp32 / "model.onnx", work / f"ort-rr-{n}.onnx", calib, "uint8", True)
        cfg = from_flags(
            quant="w7a8", calib_method="mse", bn_recalibrate=True, calib_samples=n, eval_subset=200, placement="ort-cpu"
        )
        compress(cfg, bundle, work / f"ours-{n}", overwrite=True)
        export(
            ExportConfig(target="ort-cpu", verify_samples=64),
            work / f"ours-{n}",
            work / f"ours-{n}-onnx",
            overwrite=True,
        )
        ours = predictions(work / f"ours-{n}-onnx" / "model.onnx", images, args.threads) == labels
        theirs = predictions(peer, images, args.threads) == labels
        b, c = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
        row = {
            "calib_samples": n,
            "test_images": len(labels),
            "ours_top1": float(ours.mean() * 100),
            "ort_reduce_range_top1": float(theirs.mean() * 100),
            "only_ours_right": b,
            "only_ort_right": c,
            "mcnemar_p": mcnemar_p(b, c),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = [
        "| calibration images | ours W7A8 ort-placement | ORT U8S8 reduce-range | only ours right | only ORT right "
        "| McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['calib_samples']} | {r['ours_top1']:.2f} | {r['ort_reduce_range_top1']:.2f} "
            f"| {r['only_ours_right']} | {r['only_ort_right']} | {r['mcnemar_p']:.2f} |"
        )
    out = Path(args.out)
    (out / "ort_cpu_accuracy.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "ort_cpu_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
