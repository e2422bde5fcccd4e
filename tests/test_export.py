import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from craft_deploy import CraftError
from craft_deploy.compress import run as compress
from craft_deploy.config import CompressConfig, ExportConfig
from craft_deploy.export import run as export
from craft_deploy.export.onnx import read_metadata
from craft_deploy.models import load_bundle


def _check(out, bundle_path):
    rec = json.loads((out / "export.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = read_metadata(proto)
    bundle = load_bundle(bundle_path)
    assert meta["input_size"] == bundle.manifest["input_size"] and meta["mean"] == bundle.manifest["mean"]
    # run the file ourselves too, on fresh inputs with a batch size the export never saw
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *bundle.input_size)
    with torch.no_grad():
        ref = bundle.model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    return rec, proto, ref, got


def test_fp32_export_matches_pytorch(tiny_bundle, tmp_path):
    rec = export(ExportConfig(verify_samples=32), tiny_bundle, tmp_path / "fp32")
    rec, proto, ref, got = _check(tmp_path / "fp32", tiny_bundle)
    assert rec["verification"]["passed"] and rec["verification"]["top1_agreement"] == 1.0
    assert np.abs(ref - got).max() < 1e-3
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


def test_w8a8_exports_qdq_with_int8_weights(tiny_w8a8, tiny_w8a8_onnx):
    rec, proto, ref, got = _check(tiny_w8a8_onnx, tiny_w8a8)
    ops = rec["ops"]
    n_layers = len(load_bundle(tiny_w8a8).manifest["quantization"]["layers"])
    assert ops["QuantizeLinear"] == n_layers  # one per quantized input; weight Qs folded away
    assert ops["DequantizeLinear"] == 2 * n_layers and rec["weights_folded_to_int8"] == n_layers
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == "Conv":
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert producers[node.input[0]].op_type == "DequantizeLinear"
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.8
    assert rec["verification"]["top1_agreement"] >= 0.95


def test_pruned_weights_stay_zero_in_onnx(tiny_bundle, tmp_path):
    compress(CompressConfig(sparsity="2:4", quant="w8a8", calib_samples=32), tiny_bundle, tmp_path / "c")
    rec = export(ExportConfig(verify_samples=16), tmp_path / "c", tmp_path / "e")
    v = rec["verification"]
    assert v["weight_zeros_onnx"] >= v["weight_zeros_bundle"] > 0


def test_truncated_bundle_fails_cleanly(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CraftError, match="corrupt or truncated"):
        export(ExportConfig(), bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_format_names_what_is_needed():
    with pytest.raises(CraftError, match="tensorrt"):
        ExportConfig(format="tensorrt")
