"""PyTorch on a CUDA GPU: FP32, BF16 (eager and torch.compile) and, for a ViT's Linear layers, real INT8 / FP8 / 2:4
kernels (`bench --backend pytorch --kernels ...`), timed round-robin in one run, as ratios against BF16 compiled.

Builds its own bundles (no download): the default (tf_efficientnet_lite0, bundled weights, 64 px) fine-tuned for one
short epoch, and vit_small_patch16_224 from random init trained for one short epoch at 224 px (not a foundation model:
speed and kernel agreement are what is measured here, not accuracy). The ViT is compressed to 2:4 (magnitude) + W8A8
and the kernels run that bundle; each kernel model is checked against the fake-quant bundle's logits by the bench
tolerance policy before it is timed.

Timing: CUDA events around `iters` calls, `rounds` times, the variants interleaved (round-robin) so that clock and
thermal drift hit them alike; p50 over rounds, and the CV of the per-round times (repeatability).

    python benchmarks/gpu_kernels.py --data-root DIR --out benchmarks/results     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from craft_deploy.bench.backends import PyTorchEager
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import FinetuneConfig
from craft_deploy.data import splits_for_manifest
from craft_deploy.finetune import run as finetune


def _bundles(work: Path, data_root: str | None) -> dict[str, Path]:
    common = dict(epochs=1, device="cuda", amp="bf16", data_root=data_root, threads=16, eval_subset=512)
    out = {"default": work / "effnet", "vit": work / "vit", "vit-24-w8a8": work / "vit-24-w8a8"}
    if not (out["default"] / "manifest.json").is_file():
        finetune(FinetuneConfig(train_subset=4000, **common), out["default"], overwrite=True)
    if not (out["vit"] / "manifest.json").is_file():
        cfg = FinetuneConfig(
            model="vit_small_patch16_224", pretrained=False, img_size=224, train_subset=2048, lr=5e-4, **common
        )
        finetune(cfg, out["vit"], overwrite=True)
    if not (out["vit-24-w8a8"] / "manifest.json").is_file():
        flags = dict(sparsity="2:4", quant="w8a8", calib_samples=128, eval_subset=512, data_root=data_root)
        compress(from_flags(**flags), out["vit"], out["vit-24-w8a8"], overwrite=True)
    return out


def _variants(bundles: dict[str, Path]) -> dict[str, list[tuple[str, Path, dict]]]:
    vit = [
        ("fp32", bundles["vit"], {}),
        ("bf16", bundles["vit"], dict(precision="bf16")),
        ("bf16+compile", bundles["vit"], dict(precision="bf16", compile=True)),
        ("int8+compile", bundles["vit-24-w8a8"], dict(precision="bf16", kernels="int8", compile=True)),
        ("fp8+compile", bundles["vit-24-w8a8"], dict(precision="bf16", kernels="fp8", compile=True)),
        # 2:4 eager: torch.compile of the semi-structured tensor subclass hit dynamo's recompile limit on torch 2.11
        ("2:4 eager", bundles["vit-24-w8a8"], dict(precision="bf16", kernels="sparse24")),
    ]
    default = [
        ("fp32", bundles["default"], {}),
        ("bf16", bundles["default"], dict(precision="bf16")),
        ("bf16+compile", bundles["default"], dict(precision="bf16", compile=True)),
        ("fp16+compile", bundles["default"], dict(precision="fp16", compile=True)),
    ]
    return {"vit_small_patch16_224": vit, "tf_efficientnet_lite0": default}


def _test_images(bundle: Path, data_root: str | None, n: int) -> np.ndarray:
    manifest = json.loads((bundle / "manifest.json").read_text())
    test = splits_for_manifest(manifest, data_root, eval_subset=n).test
    return next(iter(DataLoader(test, batch_size=n)))[0].numpy()


def _time(model, x, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        start.record()
        for _ in range(iters):
            model(x)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _linear_micro() -> list[dict]:
    """One ViT-S MLP Linear (384 -> 1536 and back) at 32 images x 197 tokens: dense BF16 vs the kernels, alone."""
    from torch import nn

    from craft_deploy.bench.torch_kernels import TORCH_KERNELS

    rows = []
    for k, n in ((384, 1536), (1536, 384)):
        lin = nn.Linear(k, n, device="cuda")
        with torch.no_grad():
            lin.weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0], device="cuda").repeat(k // 4))  # 2:4 along inputs
        x = torch.randn(32 * 197, k, device="cuda", dtype=torch.bfloat16)
        mods = {"bf16": lin.to(torch.bfloat16)}
        for name in ("int8", "fp8", "sparse24"):
            mods[name] = TORCH_KERNELS[name]().convert(lin, torch.bfloat16)
        for name, mod in mods.items():
            _time(mod, x, 5)
            rows.append({"in": k, "out": n, "rows": len(x), "kernel": name, "ms": _time(mod, x, 50)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--work", default="runs/gpu-kernels")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument(
        "--variants", help="Comma-separated variant names to run (default: all), e.g. bf16+compile,int8+compile"
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per timed batch size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundles = _bundles(Path(args.work), args.data_root)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args), "models": {}}
    for arch, variants in _variants(bundles).items():
        if args.variants:
            variants = [v for v in variants if v[0] in args.variants.split(",")]
        if not variants:
            continue
        size = json.loads((variants[0][1] / "manifest.json").read_text())["input_size"]
        runners, checks = {}, {}
        for name, path, kw in variants:
            t0 = time.perf_counter()
            try:
                backend = PyTorchEager(path, **kw)
                # 32 real test images (batch 32 is a timed shape, so the check compiles nothing extra); random inputs
                # would be outside the calibrated activation ranges and clip in the fake-quant reference
                check = backend.reference_check(_test_images(path, args.data_root, 32))
                for b in batches:  # compile (and warm up) every shape before any timing
                    x = torch.randn(b, *size, device="cuda", dtype=backend.dtype)
                    _time(backend.model, x, 3)
            except Exception as e:  # a variant that cannot run here is reported, not fatal
                checks[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{arch} {name}: {checks[name]['error']}", flush=True)
                continue
            runners[name] = backend
            checks[name] = {
                "setup_seconds": round(time.perf_counter() - t0, 1),
                "verification": check,
                "kernel_info": {k: v for k, v in backend.kernel_info.items() if k != "converted"},
                "converted_layers": len(backend.kernel_info.get("converted", [])),
            }
            print(f"{arch} {name}: ready in {checks[name]['setup_seconds']} s", flush=True)
        rows = []
        for b in batches:
            xs = {n: torch.randn(b, *size, device="cuda", dtype=r.dtype) for n, r in runners.items()}
            times: dict[str, list[float]] = {n: [] for n in runners}
            for _ in range(args.rounds):
                for n, r in runners.items():
                    times[n].append(_time(r.model, xs[n], args.iters))
            ref = statistics.median(times["bf16+compile"]) if "bf16+compile" in times else None
            for n, t in times.items():
                p50 = statistics.median(t)
                rows.append(
                    {
                        "variant": n,
                        "batch": b,
                        "p50_ms": p50,
                        "cv": statistics.pstdev(t) / statistics.mean(t),
                        "images_per_second": b * 1000 / p50,
                        "speedup_vs_bf16_compile": ref / p50 if ref else None,
                    }
                )
                print(json.dumps({"model": arch, **rows[-1]}), flush=True)
            record["models"][arch] = {"variants": checks, "rows": rows}
            (out / "gpu-kernels.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    record["linear_micro"] = _linear_micro()
    (out / "gpu-kernels.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = [f"GPU: {record['gpu']}, torch {record['torch']}", ""]
    for arch, m in record["models"].items():
        lines += [
            f"### {arch}",
            "",
            "| variant | batch | p50 ms | CV | img/s | x vs bf16+compile |",
            "|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            sp = f"{r['speedup_vs_bf16_compile']:.2f}" if r["speedup_vs_bf16_compile"] else "-"
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.3f} | {100 * r['cv']:.1f}% | "
                f"{r['images_per_second']:.0f} | {sp} |"
            )
        lines.append("")
    (out / "gpu-kernels.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
