#!/usr/bin/env python3
"""Verify this device package where it runs, without craft-deploy: every file's sha256 against manifest.json, then the
model's logits on inputs.npz (real test images, preprocessed) against outputs.npz (PyTorch's logits for them) under the
tolerance craft-deploy verified the export with; with TensorRT, also which kernels the engine chose (layers.json).

    python3 verify.py                  # TensorRT: model.engine (./build_engine.sh first); needs tensorrt + torch
                                       # or cuda-python for device memory
    python3 verify.py --runtime ort    # ONNX Runtime on model.onnx (any machine with onnxruntime)

Exit codes: 0 agrees, 4 disagrees or a file does not match its hash, 2 bad usage or a missing runtime.
Written by `craft-deploy export --format edge`; needs numpy, and tensorrt or onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXIT_USAGE, EXIT_FAILED = 2, 4


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def changed_files(manifest: dict) -> list[str]:
    """Files whose content is not what the package was written with."""
    bad = []
    for name, digest in manifest["files"].items():
        path = HERE / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif sha256(path) != digest:
            bad.append(f"{name}: sha256 differs from manifest.json")
    return bad


def chunks(images: np.ndarray, max_batch: int):
    for i in range(0, len(images), max_batch):
        yield images[i : i + max_batch]


def run_ort(images: np.ndarray, input_name: str, max_batch: int) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit(_usage_error("--runtime ort needs onnxruntime: pip install onnxruntime")) from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # what the file computes
    session = ort.InferenceSession(str(HERE / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: c})[0] for c in chunks(images, max_batch)])


class _TorchMemory:
    def __init__(self):
        import torch

        self.torch = torch

    def run(self, context, names, chunk, out_shape, out_dtype) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(chunk)).cuda()
        y = torch.empty(out_shape, dtype=torch.from_numpy(np.zeros(0, out_dtype)).dtype, device="cuda")
        context.set_tensor_address(names[0], x.data_ptr())
        context.set_tensor_address(names[1], y.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return y.cpu().numpy()


class _CudaPythonMemory:
    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.cudart = cudart

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    def run(self, context, names, chunk, out_shape, out_dtype) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(chunk)
        y = np.empty(out_shape, dtype=out_dtype)
        dx, dy = self._check(cudart.cudaMalloc(x.nbytes)), self._check(cudart.cudaMalloc(y.nbytes))
        try:
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(cudart.cudaMemcpy(dx, x.ctypes.data, x.nbytes, h2d))
            context.set_tensor_address(names[0], int(dx))
            context.set_tensor_address(names[1], int(dy))
            if not context.execute_async_v3(0):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self._check(cudart.cudaDeviceSynchronize())
            self._check(cudart.cudaMemcpy(y.ctypes.data, dy, y.nbytes, d2h))
        finally:
            cudart.cudaFree(dx)
            cudart.cudaFree(dy)
        return y


def run_trt(images: np.ndarray, max_batch: int) -> np.ndarray:
    try:
        import tensorrt as trt
    except ImportError:
        raise SystemExit(_usage_error("the TensorRT Python package is not installed (or use --runtime ort)")) from None
    engine_path = HERE / "model.engine"
    if not engine_path.is_file():
        raise SystemExit(_usage_error("model.engine is missing: run ./build_engine.sh first"))
    memory = None
    for kind in (_TorchMemory, _CudaPythonMemory):
        try:
            memory = kind()
            break
        except ImportError:
            continue
    if memory is None:
        raise SystemExit(_usage_error("device memory needs torch or cuda-python (pip install cuda-python)"))
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise SystemExit(_usage_error("model.engine does not load here (built for another GPU or TensorRT version?)"))
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    context = engine.create_execution_context()
    in_dtype, out_dtype = (np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in (inputs[0], outputs[0]))
    results = []
    for chunk in chunks(images.astype(in_dtype), max_batch):
        context.set_input_shape(inputs[0], chunk.shape)
        out_shape = tuple(context.get_tensor_shape(outputs[0]))
        results.append(memory.run(context, (inputs[0], outputs[0]), chunk, out_shape, out_dtype))
    return np.concatenate(results).astype(np.float32)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {
        "samples": int(len(ref)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


def passes(check: dict, tolerance: dict) -> bool:
    """craft-deploy's policy, as recorded at export: Q/DQ models need top-1 agreement OR every logit close; float
    models need every logit close (AND, for fp16, top-1 agreement)."""
    agree = check["top1_agreement"] >= tolerance.get("min_top1_agreement", 0.0)
    if "or_max_abs_diff" in tolerance:
        return agree or check["max_abs_diff"] <= tolerance["or_max_abs_diff"]
    return agree and check["max_abs_diff"] <= tolerance["max_abs_diff"]


def passes_against_float64(got: np.ndarray, exact: np.ndarray, tolerance: dict) -> dict:
    """The second opinion of an FP32 or Q/DQ model that misses the policy: every logit within
    `float64_max_abs_diff` of PyTorch's float64 logits (the usual tolerance plus twice PyTorch's own FP32 error,
    recorded at export), as an ill-conditioned model makes PyTorch's FP32 logits inexact too."""
    err = float(np.abs(got.astype(np.float64) - exact).max())
    allowed = tolerance["float64_max_abs_diff"]
    return {"export_max_abs_diff": err, "max_abs_diff_allowed": allowed, "passed": err <= allowed}


def _precision_of(fmt: str) -> str:
    fmt = fmt.lower()
    for key, name in (("int8", "int8"), ("fp8", "fp8"), ("half", "fp16"), ("fp16", "fp16"), ("bf16", "bf16")):
        if key in fmt:
            return name
    return "fp32"


def layer_report(path: Path, sparse: bool, quantized: bool) -> tuple[dict, list[str]]:
    """Counts of the engine's layers by output precision, sparse tactics and reformat layers, with warnings."""
    layers = json.loads(path.read_text()).get("Layers", [])
    layers = [layer for layer in layers if isinstance(layer, dict)]  # "brief" verbosity writes names only
    precisions: dict[str, int] = {}
    for layer in layers:
        outs = layer.get("Outputs") or [{}]
        p = _precision_of(str(outs[0].get("Format/Datatype", "")))
        precisions[p] = precisions.get(p, 0) + 1
    reformats = [
        x["Name"] for x in layers if x.get("LayerType") == "Reformat" or "reformat" in x.get("Name", "").lower()
    ]
    sparse_tactics = [x["Name"] for x in layers if "sparse" in str(x.get("TacticName", "")).lower()]
    report = {
        "layers": len(layers),
        "by_precision": precisions,
        "reformat_layers": len(reformats),
        "sparse_tactic_layers": len(sparse_tactics),
    }
    warnings = []
    if not layers:
        warnings.append("layers.json has no per-layer detail: build with --profilingVerbosity=detailed")
    if quantized and reformats:
        warnings.append(
            f"{len(reformats)} reformat layers (e.g. {reformats[0]}): precision or layout conversions around Q/DQ "
            "cost time; an INT8 engine with many of them can be slower than FP16"
        )
    if sparse and layers and not sparse_tactics:
        warnings.append(
            "the model is 2:4 sparse but TensorRT chose no sparse kernel: the dense tactics were faster for these "
            "shapes or this GPU has no sparse tensor cores (Ampere and newer do)"
        )
    return report, warnings


def _usage_error(message: str) -> str:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE  # SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["tensorrt", "ort"], default="tensorrt")
    ap.add_argument("--json", help="Also write the result to this JSON file.")
    args = ap.parse_args(argv)
    manifest = json.loads((HERE / "manifest.json").read_text())
    result: dict = {"runtime": args.runtime}
    bad = changed_files(manifest)
    if bad:
        result.update(passed=False, changed_files=bad)
        print("FAILED: " + "; ".join(bad), file=sys.stderr)
    else:
        model = manifest["model"]
        images = np.load(HERE / "inputs.npz")["images"]
        ref = np.load(HERE / "outputs.npz")["logits"]
        max_batch = max(manifest["batch_sizes"])
        if args.runtime == "ort":
            got = run_ort(images, model["input_name"], max_batch)
        else:
            got = run_trt(images, max_batch)
        check = compare(ref, got)
        check["passed"] = passes(check, manifest["tolerance"])
        outputs = np.load(HERE / "outputs.npz")
        if not check["passed"] and "logits_float64" in outputs and "float64_max_abs_diff" in manifest["tolerance"]:
            check["float64_reference"] = passes_against_float64(got, outputs["logits_float64"], manifest["tolerance"])
            check["passed"] = check["float64_reference"]["passed"]
        labels = np.load(HERE / "inputs.npz").get("labels")
        if labels is not None:
            check["top1_on_package_images"] = float(100.0 * (got.argmax(1) == labels).mean())
        result.update(check, tolerance=manifest["tolerance"])
        if args.runtime == "tensorrt" and (HERE / "layers.json").is_file():
            sparse = manifest.get("sparsity") == "2:4"
            report, warnings = layer_report(HERE / "layers.json", sparse, manifest["precision"] in ("int8", "fp8"))
            result.update(engine_layers=report, warnings=warnings)
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
        verdict = "PASSED" if check["passed"] else "FAILED"
        exact = check.get("float64_reference")
        second = (
            f"; vs PyTorch in float64 {exact['export_max_abs_diff']:.3g} (allowed {exact['max_abs_diff_allowed']:.3g}"
            ": an ill-conditioned model, whose FP32 logits are inexact in PyTorch too)"
            if exact
            else ""
        )
        print(
            f"{verdict}: {args.runtime} vs PyTorch on {check['samples']} images: top-1 agreement "
            f"{100 * check['top1_agreement']:.1f}%, max |diff| {check['max_abs_diff']:.3g} "
            f"(tolerance {manifest['tolerance']}){second}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
