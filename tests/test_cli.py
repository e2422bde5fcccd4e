"""The CLI end to end on a tiny real model and real data, and its answers to bad input."""

import importlib.util
import json
import re

import pytest
from click.testing import CliRunner

from conftest import TINY as TINY_CONFIG
from conftest import cli_args
from craft_deploy.cli.main import main

TINY = cli_args(TINY_CONFIG)


def _ok(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _fails(args, message):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    return res.output


def test_four_verbs_chain_through_directories(tmp_path):
    ft, cp, ex, be = (tmp_path / d for d in ("ft", "cp", "ex", "be"))
    out = _ok(["finetune", *TINY, "--optimizer", "sam", "--out", str(ft)])
    assert "test top-1" in out and (ft / "model.safetensors").is_file()
    # BatchNorm re-estimation keeps the 2:4 model alive; without it the logits nearly tie and the export's top-1
    # agreement check turns into a coin toss (seen on a GPU-trained bundle)
    out = _ok(
        [
            "compress",
            str(ft),
            "--sparsity",
            "2:4",
            "--quant",
            "w8a8",
            "--calib-samples",
            "64",
            "--bn-recalibrate",
            "--out",
            str(cp),
        ]
    )
    assert "pruned 2:4" in out and "quantized w8a8" in out
    rec = json.loads((cp / "compress.json").read_text())
    assert all(layer["nm_valid"] for layer in rec["methods"][0]["layers"].values())
    out = _ok(["export", str(cp), "--out", str(ex)])
    assert "top-1 agreement" in out and (ex / "model.onnx").is_file()
    out = _ok(
        [
            "bench",
            str(ex / "model.onnx"),
            "--batch-sizes",
            "1,4",
            "--iters",
            "3",
            "--min-seconds",
            "0",
            "--out",
            str(be),
        ]
    )
    assert "p50 ms" in out and json.loads((be / "bench.json").read_text())["results"][0]["dataset"] == "digits"


def test_help_shows_examples():
    for verb in ("finetune", "compress", "export", "bench"):
        assert "Examples:" in _ok([verb, "--help"])


def test_info_lists_backends():
    out = _ok(["info"])
    assert "ort-cpu         usable" in out and "tensorrt" in out
    if "openvino        usable" in out:  # the test extra installs it: its version and devices are listed
        assert "openvino CPU: " in out and re.search(r"^  openvino\s+\d{4}\.", out, re.M)


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--model", "resnet9000", "--data", "digits"], "unknown model 'resnet9000'"),
        (
            ["finetune", "--model", "test_efficientnet", "--no-pretrained", "--data", "mnist-3d"],
            "unknown dataset 'mnist-3d'",
        ),
        (["finetune", *TINY, "--rho", "-1"], "--rho must be positive"),
        (["finetune", *TINY, "--optimizer", "lion"], "'lion' is not one of 'adam', 'sgd', 'sam', 'asam', 'cram'"),
    ],
)
def test_bad_finetune_input(tmp_path, args, message):
    _fails([*args, "--out", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "4:2"], "try --sparsity 2:4"),
        (["--sparsity", "1.5"], "must be in (0, 1)"),
        (["--quant", "w9a3"], "weight bits must be 2..8"),
        (["--quant", "w8a8", "--calib-samples", "100000"], "larger than the training split"),
    ],
)
def test_bad_compress_input_writes_nothing(tiny_bundle, tmp_path, args, message):
    _fails(["compress", str(tiny_bundle), *args, "--out", str(tmp_path / "o")], message)
    assert not list(tmp_path.iterdir())


def test_missing_and_corrupt_bundles(tmp_path):
    _fails(["compress", str(tmp_path / "nope"), "--quant", "w8a8", "--out", str(tmp_path / "o")], "does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{")
    _fails(["export", str(bad), "--out", str(tmp_path / "o")], "corrupt")


def test_out_not_empty_needs_overwrite(tiny_bundle, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    _fails(["compress", str(tiny_bundle), "--quant", "w8a16", "--out", str(out)], "--overwrite")
    assert (out / "x").read_text() == "keep"
    _ok(["compress", str(tiny_bundle), "--quant", "w8a16", "--out", str(out), "--overwrite"])
    assert not (out / "x").exists() and (out / "compress.json").is_file()


def test_bench_bad_batch_sizes(tiny_w8a8_onnx, tmp_path):
    _fails(["bench", str(tiny_w8a8_onnx), "--batch-sizes", "0", "--out", str(tmp_path / "b")], "positive integer")


def test_sparsity_report_of_a_pruned_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "p"
    _ok(
        [
            "compress",
            str(tiny_bundle),
            "--sparsity",
            "0.5",
            "--prune-method",
            "wanda",
            "--granularity",
            "row",
            "--bn-recalibrate",
            "--calib-samples",
            "64",
            "--out",
            str(out),
        ]
    )
    rec = json.loads((out / "compress.json").read_text())["methods"][0]
    assert rec["score"] == "wanda" and rec["granularity"] == "row" and rec["bn_recalibrated"] > 0
    report = _ok(["sparsity", str(out)])
    assert "pattern: unstructured 0.5" in report and "0.500" in report
    dense = _ok(["sparsity", str(tiny_bundle)])
    assert "none recorded" in dense


def test_export_precision_and_target_flags(tiny_bundle, tiny_w8a8, tmp_path):
    out = _ok(["export", str(tiny_bundle), "--precision", "fp16", "--out", str(tmp_path / "fp16")])
    assert "(fp16, weights fp16" in out and "top-1 agreement" in out
    out = _ok(["export", str(tiny_w8a8), "--target", "ort-cpu", "--out", str(tmp_path / "u8")])
    rec = json.loads((tmp_path / "u8" / "export.json").read_text())
    assert rec["activations"] == "uint8" and "onnxruntime_fused_kernels" in out
    _fails(["export", str(tiny_bundle), "--precision", "int8", "--out", str(tmp_path / "x")], "--quant w8a8")
    if importlib.util.find_spec("tensorrt") is None:
        _fails(["export", str(tiny_w8a8), "--format", "tensorrt", "--out", str(tmp_path / "y")], "[tensorrt]")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _tree(path) -> dict[str, int]:
    """Every file under `path` with its size: what a refused command must leave untouched."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_option_that_is_not_finite_is_refused(value, tiny_bundle, tmp_path):
    _fails(["study", "--max-drop", value, "--out", str(tmp_path / "s")], "--max-drop must be a finite number")
    _fails(
        ["compress", str(tiny_bundle), "--quant", "w8a8", "--percentile", value, "--out", str(tmp_path / "c")],
        "--percentile must be a finite number",
    )
    _fails(["finetune", *TINY, "--lr", value, "--out", str(tmp_path / "f")], "--lr must be a finite number")
    assert not any(tmp_path.iterdir())


def test_an_out_inside_the_input_bundle_is_refused(tiny_bundle, tmp_path):
    before = _tree(tiny_bundle)
    _fails(["compress", str(tiny_bundle), "--quant", "w8a8", "--out", str(tiny_bundle / "c")], "is inside the input")
    _fails(["export", str(tiny_bundle), "--out", str(tiny_bundle)], "is the same path as the input")
    _fails(["analyze", str(tiny_bundle), "--out", str(tiny_bundle / "a"), "--overwrite"], "is inside the input")
    # an --out that holds the input would be emptied by --overwrite
    _fails(
        ["compress", str(tiny_bundle), "--quant", "w8a8", "--out", str(tiny_bundle.parent), "--overwrite"],
        "a directory holding",
    )
    assert _tree(tiny_bundle) == before


def test_a_group_size_that_does_not_divide_every_layer_is_refused(tiny_bundle, tmp_path):
    out = _fails(
        ["compress", str(tiny_bundle), "--quant", "w4a16", "--group-size", "7", "--out", str(tmp_path / "c")],
        "--group-size 7 does not divide the weights per output channel of",
    )
    assert "conv_stem (27)" in out and "--group-size" in out and "--exclude" in out
    assert not (tmp_path / "c").exists()
