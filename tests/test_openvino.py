"""The OpenVINO backend: runs our FP32 and Q/DQ INT8 ONNX files of tiny real models, checked against the same file in
ONNX Runtime before timing; bf16 under its own tolerance; a missing OpenVINO is an error naming the extra."""

from __future__ import annotations

import os
import sys

import pytest

from craft_deploy import CraftError, VerificationError
from craft_deploy.bench import run as bench
from craft_deploy.config import BenchConfig, ExportConfig
from craft_deploy.export import run as export

pytest.importorskip("openvino", reason="openvino is in the test extra: pip install -e '.[test]'")

FAST = dict(backend="openvino", batch_sizes=(1, 4), iters=3, min_seconds=0.0, eval_subset=64, threads=2)


@pytest.fixture(scope="module")
def fp32_onnx(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "fp32"
    export(ExportConfig(verify_samples=32), tiny_bundle, out)
    return out


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_openvino_runs_our_files_and_agrees_with_onnx_runtime(which, fp32_onnx, tiny_w8a8_onnx, tmp_path):
    model = fp32_onnx if which == "fp32" else tiny_w8a8_onnx
    rec = bench(BenchConfig(**FAST), model, tmp_path / "ov")
    ort = bench(BenchConfig(**{**FAST, "backend": "ort-cpu"}), model, tmp_path / "ort")
    info = next(iter(rec["models"].values()))
    check = info["verification"]
    assert check["passed"] and check["samples"] == 64 and "ONNX Runtime" in check["against"]
    if which == "fp32":  # float: every logit within 1e-3 of the scale
        assert check["tolerance"] == {"max_abs_diff": pytest.approx(1e-3 * max(1.0, check["reference_logit_absmax"]))}
    else:  # Q/DQ: OpenVINO's own integer kernels, judged by the INT8 policy
        assert "min_top1_agreement" in check["tolerance"]
    assert info["backend_info"]["openvino"] and info["backend_info"]["precision_hint"] == "f32"
    assert [r["batch"] for r in rec["results"]] == [1, 4] and all(r["p50_ms"] > 0 for r in rec["results"])
    assert abs(rec["results"][0]["top1"] - ort["results"][0]["top1"]) <= 100 * 2 / 64  # two images at most


def test_bf16_is_judged_by_its_own_tolerance(fp32_onnx, tmp_path):
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # OpenVINO sees bf16 in CPUID, its oneDNN may not use it: a named error
        with pytest.raises(CraftError, match="OpenVINO could not compile .* with precision hint bf16 on this CPU"):
            bench(BenchConfig(**FAST, precision="bf16"), fp32_onnx, tmp_path / "b")
        return
    rec = bench(BenchConfig(**FAST, precision="bf16"), fp32_onnx, tmp_path / "b")
    info = next(iter(rec["models"].values()))
    check = info["verification"]
    assert info["backend_info"]["precision_hint"] == "bf16"
    assert check["tolerance"]["max_abs_diff"] == pytest.approx(0.16 * max(1.0, check["reference_logit_absmax"]))
    assert check["tolerance"]["min_top1_agreement"] == 0.98 and check["passed"]


def test_openvino_that_computes_something_else_fails_the_check(fp32_onnx, tmp_path, monkeypatch):
    from craft_deploy.bench.backends import OpenVino

    real = OpenVino.run
    monkeypatch.setattr(OpenVino, "run", lambda self, x: real(self, x) * -1.0)
    with pytest.raises(VerificationError, match="disagrees with the same file in ONNX Runtime"):
        bench(BenchConfig(**FAST), fp32_onnx, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_missing_openvino_is_an_error_naming_the_extra(fp32_onnx, tmp_path, monkeypatch):
    from craft_deploy.bench.backends import BACKENDS

    monkeypatch.setitem(sys.modules, "openvino", None)
    ok, why = BACKENDS["openvino"].availability()
    assert not ok and "craft-deploy[openvino]" in why
    with pytest.raises(
        CraftError, match=r"backend openvino is not usable here: .*pip install 'craft-deploy\[openvino\]'"
    ):
        bench(BenchConfig(**FAST), fp32_onnx, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_precision_is_for_backends_that_set_it():
    with pytest.raises(CraftError, match="--precision applies to --backend pytorch .* and openvino"):
        BenchConfig(backend="ort-cpu", precision="bf16")
    assert BenchConfig(backend="openvino", precision="fp16").precision == "fp16"


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_export_format_openvino_writes_a_verified_ir_that_bench_runs(which, tiny_bundle, tiny_w8a8, tmp_path):
    bundle = tiny_bundle if which == "fp32" else tiny_w8a8
    rec = export(ExportConfig(format="openvino", verify_samples=32), bundle, tmp_path / "ir")
    d = tmp_path / "ir"
    assert {"model.xml", "model.bin", "model.onnx", "metadata.json", "export.json"} <= {p.name for p in d.iterdir()}
    assert rec["format"] == "openvino" and rec["file"] == "model.xml"
    assert rec["size_bytes"] == (d / "model.xml").stat().st_size + (d / "model.bin").stat().st_size
    check = rec["verification"]["openvino"]
    assert check["passed"] and check["samples"] == 32 and check["inference_precision"] == "f32"
    assert rec["verification"]["onnxruntime"]["passed"]  # the ONNX it was converted from, verified first
    if which == "int8":  # the IR holds OpenVINO's quantization ops, and is judged by the INT8 policy
        import openvino as ov

        types = {op.get_type_name() for op in ov.Core().read_model(str(d / "model.xml")).get_ops()}
        assert "FakeQuantize" in types and "min_top1_agreement" in check["tolerance"]
    out = bench(BenchConfig(**FAST), d / "model.xml", tmp_path / "b")
    info = next(iter(out["models"].values()))
    assert info["verification"]["passed"] and info["file"].endswith("model.xml")
    assert all(r["p50_ms"] > 0 for r in out["results"])
    with pytest.raises(CraftError, match="is an OpenVINO IR; bench it with --backend openvino"):
        bench(BenchConfig(**{**FAST, "backend": "ort-cpu"}), d / "model.xml", tmp_path / "c")


def test_export_format_openvino_without_openvino_names_the_extra(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(CraftError, match=r"--format openvino needs OpenVINO.*craft-deploy\[openvino\]"):
        export(ExportConfig(format="openvino"), tiny_bundle, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_study_takes_a_runtime_at_a_precision_hint_as_a_backend(tmp_path):
    """`openvino@bf16`: the same exported files benched with the bf16 hint, a backend of its own in the report; its
    rows are judged against PyTorch's FP32 (its own FP32 row is bf16), and its commands carry --precision."""
    import json

    from click.testing import CliRunner

    from craft_deploy.cli.main import main
    from craft_deploy.config import StudyConfig
    from craft_deploy.study import plan

    cfg = StudyConfig(backends=("ort-cpu@bf16",))
    with pytest.raises(CraftError, match="--precision applies to --backend pytorch .* and openvino"):
        plan.bench_config(cfg, "ort-cpu@bf16")
    assert plan.bench_config(cfg, "openvino@bf16")["precision"] == "bf16"
    config = tmp_path / "s.json"
    config.write_text(json.dumps({
        "model": "test_efficientnet", "data": "digits", "pretrained": False, "optimizers": ["adam"], "seeds": [0],
        "finetune": {"epochs": 1, "img_size": 32, "warmup_steps": 5}, "calib_samples": 64, "eval_subset": None,
        "grid": ["w8a8+minmax"], "analyze": False, "recover_worst": 0, "tunecomp": [],
        "backends": ["openvino", "openvino@bf16"], "batch_sizes": [1], "bench_seconds": 0.05, "speed_rounds": 2,
    }))  # fmt: skip
    res = CliRunner().invoke(main, ["study", str(config), "--threads", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "study.json").read_text())
    deployed = {c["id"]: c for c in rec["cells"] if c["kind"] == "deploy"}
    assert deployed["adam-s0/deploy/openvino@bf16/fp32"]["spec"]["config"]["bench"]["precision"] == "bf16"
    assert deployed["adam-s0/deploy/openvino/fp32"]["spec"]["config"]["bench"]["precision"] == "fp32"
    picks = rec["report"]["recommendation"]
    assert set(picks) == {"openvino", "openvino@bf16"}
    assert any("--backend openvino --precision bf16" in c for c in picks["openvino@bf16"]["commands"])
    assert rec["report"]["across_backends"]["backend"] in picks
