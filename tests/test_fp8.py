"""FP8 (E4M3) quantization: exact simulation, calibration, opset-19 Q/DQ export checked by ONNX Runtime and ONNX's
reference evaluator, and where FP8 is refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig, FinetuneConfig
from craft_deploy.export import run as export
from craft_deploy.finetune import run as finetune
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.qparams import FP8_E4M3_MAX, fake_quant_fp8, fp8_scale


@pytest.fixture(scope="module")
def fp8_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "fp8"
    compress(from_flags(quant="fp8", calib_samples=64), tiny_bundle, out)
    return out


def _onnx_qdq(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX's own QuantizeLinear -> DequantizeLinear to FLOAT8E4M3FN (the reference evaluator), an independent
    implementation of the rounding."""
    kw = {"axis": axis} if axis is not None else {}
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, list(scale.shape), [0.0] * scale.size)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **kw),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **kw),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x.shape)) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "qdq", [io[0]], [io[1]], [numpy_helper.from_array(scale, "s"), zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("axis", [None, 0])
def test_fp8_fake_quant_rounds_like_onnx_quantize_linear(axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-3, 1, 64)  # small, normal and saturating values
    amax = x.abs().amax(1) * 0.5 if axis == 0 else x.abs().amax().reshape(1) * 0.5  # half the range: some saturate
    scale = fp8_scale(amax)
    y = fake_quant_fp8(x, scale, axis)
    ref = _onnx_qdq(x.numpy(), scale.numpy() if axis == 0 else scale.reshape(()).numpy(), axis)
    np.testing.assert_array_equal(y.numpy(), ref)
    s = scale.reshape(-1, 1) if axis == 0 else scale
    assert float((y / s).abs().max()) == pytest.approx(FP8_E4M3_MAX)  # saturated at the format's largest value


def test_fp8_gradient_passes_inside_the_range_and_stops_where_it_saturates():
    x = torch.tensor([0.5, -1.0, 2.0, 10.0, -10.0], requires_grad=True)
    fake_quant_fp8(x, torch.tensor([2.0 / FP8_E4M3_MAX])).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_fp8_bundle_records_its_format_and_round_trips(fp8_bundle, tiny_bundle):
    state = next(
        e for e in json.loads((fp8_bundle / "manifest.json").read_text())["methods"] if e["method"] == "quantize"
    )
    assert state["state"]["number_format"] == "fp8" and state["state"]["config"] == "fp8"
    assert all(s["number_format"] == "fp8" for s in state["state"]["layers"].values())
    rec = json.loads((fp8_bundle / "compress.json").read_text())
    assert rec["metrics"]["test_top1_drop"] < 5.0
    a, b = load_bundle(fp8_bundle).model.eval(), load_bundle(fp8_bundle).model.eval()
    dense = load_bundle(tiny_bundle).model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), dense(x))
        w = a.conv_stem.weight  # on the E4M3 grid of its per-channel scale
        s = a.conv_stem.parametrizations.weight[0].scale.reshape(-1, 1, 1, 1)
        torch.testing.assert_close((w / s).to(torch.float8_e4m3fn).float(), w / s, rtol=1e-5, atol=0)


def test_fp8_per_tensor_weights_share_one_scale_and_export(tiny_bundle, tmp_path):
    """--weight-granularity tensor: one E4M3 scale per weight tensor (amax / 448), on convs whose last axis is not the
    channel axis, and a scalar scale in the exported QuantizeLinear."""
    out = tmp_path / "fp8-tensor"
    compress(from_flags(quant="fp8", weight_granularity="tensor", calib_samples=32), tiny_bundle, out)
    model, dense = load_bundle(out).model.eval(), load_bundle(tiny_bundle).model.eval()
    w0, q = dense.conv_stem.weight, model.conv_stem.parametrizations.weight[0]
    assert w0.shape[0] != w0.shape[-1]
    scale = fp8_scale(w0.abs().amax().reshape(1))
    torch.testing.assert_close(q.scale, scale.expand_as(q.scale))
    with torch.no_grad():
        expected = (w0 / scale).to(torch.float8_e4m3fn).float() * scale
        torch.testing.assert_close(model.conv_stem.weight, expected, rtol=0, atol=0)
    rec = export(ExportConfig(verify_samples=16), out, tmp_path / "onnx")
    assert rec["verification"]["onnxruntime"]["passed"]


def test_fp8_export_is_opset_19_qdq_checked_by_onnx_runtime_and_the_reference_evaluator(fp8_bundle, tmp_path):
    rec = export(ExportConfig(verify_samples=16), fp8_bundle, tmp_path / "onnx")
    assert rec["precision"] == "fp8" and rec["opset"] == 19 and rec["weights"] == "fp8"
    assert rec["verification"]["onnxruntime"]["passed"]
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    zero_points = [
        a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ] + list(proto.graph.initializer)
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) >= 10 and any(t.data_type == TensorProto.FLOAT8E4M3FN for t in zero_points)
    from torch.utils.data import DataLoader

    from craft_deploy.data import splits_for_manifest

    bundle = load_bundle(fp8_bundle)
    images = next(iter(DataLoader(splits_for_manifest(bundle.manifest, eval_subset=8).test, batch_size=8)))[0]
    with torch.no_grad():
        ref = bundle.model.eval()(images).numpy()
    got = ReferenceEvaluator(proto).run(None, {"input": images.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95 and np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_fp8_edge_package_for_hopper_and_refused_for_orin(fp8_bundle, tmp_path):
    export(ExportConfig(format="edge", device="hopper", verify_samples=16), fp8_bundle, tmp_path / "h")
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["precision"] == "fp8" and manifest["targets"]["device"] == {"name": "hopper", "sm": 9.0}
    assert manifest["targets"]["sm"].startswith("8.9+")
    with pytest.raises(CraftError, match="--device orin .* has no FP8 tensor cores.*--quant w8a8"):
        export(ExportConfig(format="edge", device="orin"), fp8_bundle, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(weight_rounding="gptq"), "fp8 takes per-channel or per-tensor weight scales and nearest rounding"),
        (dict(calib_method="entropy"), "fp8 calibrates with minmax, percentile or mse"),
        (dict(placement="ort-cpu", calib_method="mse"), "fp8 is symmetric and runs on TensorRT"),
    ],
)
def test_fp8_refuses_what_it_cannot_do(flags, message):
    with pytest.raises(CraftError, match=message):
        from_flags(quant="fp8", **flags)


def test_fp8_export_and_device_options_refuse_bad_combinations(fp8_bundle, tiny_bundle, tmp_path):
    with pytest.raises(CraftError, match="FP8 .* export with --target tensorrt"):
        export(ExportConfig(target="ort-cpu"), fp8_bundle, tmp_path / "a")
    with pytest.raises(CraftError, match="--precision fp8 needs a quantized bundle"):
        export(ExportConfig(precision="fp8"), tiny_bundle, tmp_path / "b")
    with pytest.raises(CraftError, match="exports as fp8 Q/DQ, not --precision int8"):
        export(ExportConfig(precision="int8"), fp8_bundle, tmp_path / "c")
    with pytest.raises(CraftError, match="use it with --format edge"):
        ExportConfig(device="orin")
    with pytest.raises(CraftError, match="--learn-scales .* this bundle is FP8"):
        finetune(FinetuneConfig(init=str(fp8_bundle), learn_scales=True, epochs=1, threads=2), tmp_path / "r")


def test_fp8_recovery_trains_through_the_e4m3_quantizers(fp8_bundle, tmp_path):
    finetune(
        FinetuneConfig(init=str(fp8_bundle), epochs=1, batch_size=32, threads=2, warmup_steps=5, calib_samples=64),
        tmp_path / "r",
    )
    before, after = load_bundle(fp8_bundle), load_bundle(tmp_path / "r")
    assert before.manifest["methods"] == after.manifest["methods"]
    w0 = before.model.conv_stem.parametrizations.weight.original
    w1 = after.model.conv_stem.parametrizations.weight.original
    assert not torch.equal(w0, w1)
