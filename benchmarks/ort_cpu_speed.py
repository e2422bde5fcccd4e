"""Our INT8 ONNX against FP32 and against ONNX Runtime's own `quantize_static`, on ONNX Runtime CPU.

    python benchmarks/ort_cpu_speed.py --models default vit resnet50 vit_small

For each model: FP32 export; ours = `compress --quant w8a8` (and w7a8: 7-bit weights, exact in the fused kernels of
x86 CPUs without VNNI) with MSE calibration and BatchNorm re-estimation, then `export` for `--target ort-cpu` (U8S8)
and `--target tensorrt` (S8S8), with the default quantizer placement (TensorRT's: layer inputs only) and with
`--placement ort-cpu` (also residual adds and pooling, asymmetric activations; exported U8S8); the peer =
`quant_pre_process` + `quantize_static` (QDQ, MinMax, per-channel weights) as U8S8, S8S8 and U8S8 with
`reduce_range` (7-bit weights), on the same calibration images.
Latency: median of timed runs after warm-up, batch 1 and 16, `--threads` intra-op threads, all graph optimisations;
`--rounds` round-robin passes over the variants, each figure the median of its rounds (this VM's speed drifts).
Accuracy (same sessions, so fused kernels) on the test split for trained bundles (`default` and `vit` are our
fine-tunes; `resnet50` and `vit_small` are randomly initialised at 224 px, for speed only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.export import run as export
from craft_deploy.models import load_bundle, load_model, save_bundle
from craft_deploy.models.bundle import make_manifest, read_manifest

TRAINED = {"default": "runs/seed_sweep/sam-0.05-s0", "vit": "runs/vit-adam"}
RANDOM = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224"}
PEERS = [("uint8", False, "ORT U8S8"), ("int8", False, "ORT S8S8"), ("uint8", True, "ORT U8S8 reduce-range")]
# (compressed bundle dir, compress --quant, --placement, export --target, label)
OURS = [
    ("w8a8", "w8a8", "tensorrt", "ort-cpu", "ours W8A8 U8S8"),
    ("w8a8", "w8a8", "tensorrt", "tensorrt", "ours W8A8 S8S8"),
    ("w7a8", "w7a8", "tensorrt", "ort-cpu", "ours W7A8 U8S8"),
    ("w8a8-ortplace", "w8a8", "ort-cpu", "ort-cpu", "ours W8A8 ort-placement"),
    ("w7a8-ortplace", "w7a8", "ort-cpu", "ort-cpu", "ours W7A8 ort-placement"),
]
VARIANTS = ["fp32", *(label for *_, label in OURS), *(label for _, _, label in PEERS)]


def random_bundle(arch: str, like: str, out: Path) -> Path:
    """A randomly initialised `arch` at 224 px, with the data description of bundle `like` (for calibration)."""
    if (out / "manifest.json").is_file():
        return out
    src = read_manifest(like)
    torch.manual_seed(0)
    model = load_model(arch, num_classes=src["num_classes"], pretrained=False, img_size=224).eval()
    manifest = make_manifest(
        arch, src["num_classes"], [3, 224, 224], src["mean"], src["std"], src["class_names"], src["dataset"]
    )
    manifest["data"] = {**src["data"], "img_size": 224}
    save_bundle(model, out, manifest)
    return out


def session(path: Path, threads: int, optimize: bool = True, save_to: Path | None = None):
    """A CPU session with every graph optimisation (or none, for a file optimised offline); `save_to` keeps the
    optimised graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def offline_optimized(path: Path, threads: int, calib: np.ndarray, min_seconds: float) -> dict[str, float]:
    """Graph optimisation saved offline: session start-up and latency of `path` optimised at load time vs its
    optimised graph saved once and loaded with optimisations off (the saved graph is specific to this CPU)."""
    saved = path.with_name(path.stem + "-optimized.onnx")
    session(path, threads, save_to=saved)
    res: dict[str, float] = {}
    for key, file, optimize in (("at_load", path, True), ("saved", saved, False)):
        starts = []
        for _ in range(5):
            t0 = time.perf_counter()
            sess = session(file, threads, optimize)
            starts.append((time.perf_counter() - t0) * 1e3)
        res[f"{key}_session_ms"] = statistics.median(starts)
        for b in (1, 16):
            res[f"{key}_b{b}_ms"] = latency_ms(sess, calib[:b], min_seconds)
    return res


def latency_ms(sess, batch: np.ndarray, min_seconds: float, min_iters: int = 10) -> float:
    """Median wall time of one run, after 3 warm-up runs, over at least `min_iters` runs and `min_seconds`."""
    feed = {sess.get_inputs()[0].name: batch}
    for _ in range(3):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def top1(sess, images: np.ndarray, labels: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)])
    return float((logits.argmax(1) == labels).mean() * 100)


def peer_quantize(fp32: Path, out: Path, calib: np.ndarray, activation: str, reduce_range: bool) -> Path:
    """ONNX Runtime's quantize_static (after its quant_pre_process), QDQ, MinMax, per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*TRAINED, *RANDOM])
    ap.add_argument("--work", default="runs/ort_cpu_speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="round-robin passes over the variants; medians reported")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--prepare", action="store_true", help="build every model file, time nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        bundle = (
            Path(TRAINED[name])
            if name in TRAINED
            else random_bundle(RANDOM[name], TRAINED["default"], work / name / "fp32")
        )
        manifest = load_bundle(bundle).manifest
        splits = splits_for_manifest(manifest, eval_subset=args.eval_subset)
        calib_ds = calibration_subset(splits.train, args.calib_samples)
        calib = np.stack([calib_ds[i][0].numpy() for i in range(len(calib_ds))])
        files: dict[str, Path] = {}
        d = work / name
        if not (d / "fp32-onnx").exists():
            export(ExportConfig(verify_samples=16), bundle, d / "fp32-onnx")
        files["fp32"] = d / "fp32-onnx" / "model.onnx"
        for bundle_dir, quant, placement, target, label in OURS:
            if not (d / bundle_dir).exists():
                t0 = time.perf_counter()
                qcfg = from_flags(
                    quant=quant,
                    calib_method="mse",
                    calib_samples=args.calib_samples,
                    eval_subset=200,
                    bn_recalibrate=True,
                    placement=placement,
                )
                compress(qcfg, bundle, d / bundle_dir)
                print(f"{name}: compress {bundle_dir} {time.perf_counter() - t0:.0f} s", flush=True)
            out = d / f"{bundle_dir}-{target}"
            if not out.exists():
                export(ExportConfig(target=target, verify_samples=64), d / bundle_dir, out)
            files[label] = out / "model.onnx"
        for act, reduce, label in PEERS:
            path = d / f"ort-{act}{'-rr' if reduce else ''}.onnx"
            if not path.exists():
                t0 = time.perf_counter()
                peer_quantize(files["fp32"], path, calib, act, reduce)
                print(f"{name}: quantize_static {label} {time.perf_counter() - t0:.0f} s", flush=True)
            files[label] = path
        if args.prepare:
            continue
        row = {"model": name, "architecture": manifest["architecture"], "input": manifest["input_size"], "results": {}}
        images = labels = None
        if name in TRAINED:
            xs, ys = zip(*(splits.test[i] for i in range(len(splits.test))))
            images, labels = torch.stack(xs).numpy(), np.array(ys)
        sessions = {label: session(path, args.threads) for label, path in files.items()}
        # round-robin over the variants: on a shared VM whose speed drifts for minutes, every variant is sampled in
        # every round, and each figure is the median of its rounds
        samples: dict[str, dict[int, list[float]]] = {label: {1: [], 16: []} for label in files}
        for _ in range(args.rounds):
            for label, sess in sessions.items():
                for b in (1, 16):
                    samples[label][b].append(latency_ms(sess, calib[:b], args.min_seconds))
        for label, path in files.items():
            res = {"size_mb": path.stat().st_size / 1e6}
            for b in (1, 16):
                res[f"b{b}_ms"] = statistics.median(samples[label][b])
                res[f"b{b}_rounds_ms"] = samples[label][b]
            if images is not None:
                res["top1"] = top1(sessions[label], images, labels)
            row["results"][label] = res
            print(json.dumps({"model": name, "variant": label, **res}), flush=True)
        best = "ours W7A8 ort-placement"
        row["offline_optimized"] = offline_optimized(files[best], args.threads, calib, args.min_seconds)
        print(json.dumps({"model": name, "offline_optimized": row["offline_optimized"]}), flush=True)
        rows.append(row)
    if args.prepare:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_cpu_speed.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "ort_cpu_speed.md").write_text(table(rows) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Latency (ms, median) per model, batch and variant, then top-1 (fused kernels) for the trained models."""
    lines = ["| model | batch | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for r in rows:
        for b in (1, 16):
            cells = [f"{r['results'][v][f'b{b}_ms']:.2f}" for v in VARIANTS]
            lines.append(f"| {r['architecture']} {r['input'][-1]}px | {b} | " + " | ".join(cells) + " |")
    lines += ["", "| model (test top-1, %) | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for r in rows:
        if "top1" in r["results"]["fp32"]:
            cells = [f"{r['results'][v]['top1']:.2f}" for v in VARIANTS]
            lines.append(f"| {r['architecture']} {r['input'][-1]}px | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ours W7A8 ort-placement | session start ms (optimised at load / saved offline) | b1 ms | b16 ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        o = r["offline_optimized"]
        lines.append(
            f"| {r['architecture']} {r['input'][-1]}px | {o['at_load_session_ms']:.0f} / {o['saved_session_ms']:.0f} "
            f"| {o['at_load_b1_ms']:.2f} / {o['saved_b1_ms']:.2f} "
            f"| {o['at_load_b16_ms']:.2f} / {o['saved_b16_ms']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
