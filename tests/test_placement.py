"""ONNX Runtime's CPU quantizer placement (`--placement ort-cpu`): where the quantizers go, what they calibrate to,
and that the exported graph runs as integer kernels only."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY
from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig, FinetuneConfig
from craft_deploy.export import run as export
from craft_deploy.models import load_bundle, load_model
from craft_deploy.toolkit.placement import ort_cpu_tensors
from craft_deploy.toolkit.qmodules import activation_quantizers
from craft_deploy.toolkit.registry import method_state

FLOAT_CONVS = ("Conv", "FusedConv", "NhwcFusedConv")


def test_residual_blocks_get_output_branch_and_shortcut_quantizers():
    resnet = ort_cpu_tensors(load_model("test_resnet", num_classes=10, pretrained=False, img_size=32))
    # BasicBlock with an avg-pool + conv shortcut, Bottleneck ends on bn3; block inputs and outputs; the pooled head
    assert resnet["layer2.0"] == ["input", "output"] and resnet["layer2.0.bn2"] == ["output"]
    assert resnet["layer2.0.downsample"] == ["output"] and resnet["layer3.0.bn3"] == ["output"]
    assert resnet["global_pool"] == ["input", "output"]
    effnet = ort_cpu_tensors(load_model("tf_efficientnet_lite0", num_classes=10, pretrained=False, img_size=64))
    assert "blocks.0.0" not in effnet and "blocks.1.0" not in effnet  # no skip: their convs' inputs suffice
    assert effnet["blocks.1.1"] == ["input", "output"] and effnet["blocks.1.1.bn3"] == ["output"]
    assert not ort_cpu_tensors(load_model("test_vit", num_classes=10, pretrained=False, img_size=32))


def test_a_block_that_keeps_a_float_layer_keeps_float_boundaries():
    """With the quantized layers named (a per-layer recipe), only blocks whose layers are all quantized get their
    add's tensors quantized; with every layer named it is the uniform placement."""
    from craft_deploy.toolkit.layers import select_layers

    model = load_model("test_resnet", num_classes=10, pretrained=False, img_size=32)
    ordered = list(select_layers(model, skip_stem=False, skip_depthwise=False)[0])  # in module order
    every = set(ordered)
    assert ort_cpu_tensors(model, every) == ort_cpu_tensors(model)
    partial = ort_cpu_tensors(model, every - {"layer2.0.conv1"})
    assert not [k for k in partial if k == "layer2.0" or k.startswith("layer2.0.")]
    assert {k: v for k, v in ort_cpu_tensors(model).items() if not k.startswith("layer2.0")} == partial
    assert "global_pool" not in ort_cpu_tensors(model, every - {ordered[-1]})  # the last conv before the pool


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """test_resnet (ReLU, residual adds, max pool, avg-pool shortcut) fine-tuned one epoch on digits at 32 px."""
    from craft_deploy.finetune import run

    out = tmp_path_factory.mktemp("resnet") / "bundle"
    run(FinetuneConfig(**{**TINY, "model": "test_resnet"}), out)
    return out


@pytest.fixture(scope="module")
def resnet_ort(tiny_resnet, tmp_path_factory):
    """W7A8 (exact in AVX2's fused u8 x s8 kernels too) with ONNX Runtime's placement, exported U8S8."""
    d = tmp_path_factory.mktemp("resnet-ort")
    cfg = from_flags(quant="w7a8", calib_method="mse", calib_samples=64, placement="ort-cpu")
    compress(cfg, tiny_resnet, d / "bundle")
    export(ExportConfig(target="ort-cpu", verify_samples=64), d / "bundle", d / "onnx")
    return d


def test_post_relu_ranges_start_at_zero_and_the_bundle_round_trips(resnet_ort):
    bundle = load_bundle(resnet_ort / "bundle")
    quant = method_state(bundle.manifest, "quantize")
    assert quant["placement"] == "ort-cpu" and quant["tensors"]["layer1.0"]["sides"] == ["input", "output"]
    acts = activation_quantizers(bundle.model)
    assert "layer1.0.output_quantizer" in acts and "global_pool.input_quantizer" in acts
    assert all(not q.symmetric for q in acts.values())
    # a BasicBlock's output is ReLU(x + shortcut): its grid starts at 0 (int8 zero point -128) and uses all 256 steps
    lo, hi = acts["layer1.0.output_quantizer"].range()
    assert lo == 0.0 and hi > 0 and int(acts["layer1.0.output_quantizer"].zero_point) == -128
    rec = json.loads((resnet_ort / "bundle" / "compress.json").read_text())
    assert set(rec["methods"][0]["activation_ranges"]) == set(acts)


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs after all its optimisations (this host's kernels)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_ort_placement_runs_every_conv_and_add_as_integer_kernels(tiny_resnet, resnet_ort, tmp_path):
    rec = json.loads((resnet_ort / "onnx" / "export.json").read_text())
    assert rec["verification"]["onnxruntime"]["passed"]
    assert rec["verification"]["onnxruntime_fused_kernels"]["within_tolerance"] and "warning" not in rec
    assert rec["rewrites"]["requantized_outputs"] > 0 and rec["rewrites"]["scalar_qparams"] > 0
    ops = _optimized_ops(resnet_ort / "onnx" / "model.onnx", tmp_path)
    adds = sum(1 for n in onnx.load(str(resnet_ort / "onnx" / "model.onnx")).graph.node if n.op_type == "Add")
    assert adds == 4 and ops.get("QLinearAdd") == adds  # every residual add (test_resnet has 4 blocks)
    assert not any(ops.get(op) for op in FLOAT_CONVS), ops  # no conv left in float
    assert ops.get("QLinearConv", 0) >= 10 and ops.get("QLinearGlobalAveragePool") == 1
    # nothing dequantized and requantized between integer kernels: one Q at the input, one DQ before the float Gemm
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear") == 1
    assert rec["rewrites"]["clamps_dropped"] > 0  # ReLUs before post-ReLU grids
    # the default (TensorRT) placement of the same model leaves convs in float on ONNX Runtime CPU
    compress(from_flags(quant="w7a8", calib_samples=64), tiny_resnet, tmp_path / "trt-bundle")
    export(ExportConfig(target="ort-cpu", verify_samples=16), tmp_path / "trt-bundle", tmp_path / "trt-onnx")
    default_ops = _optimized_ops(tmp_path / "trt-onnx" / "model.onnx", tmp_path)
    assert sum(default_ops.get(op, 0) for op in FLOAT_CONVS) > 0 and not default_ops.get("QLinearAdd")


def test_ort_placement_exports_agree_with_pytorch(resnet_ort):
    bundle = load_bundle(resnet_ort / "bundle")
    x = torch.randn(6, *bundle.input_size)
    with torch.no_grad():
        ref = bundle.model(x).numpy()
    sess = ort.InferenceSession(str(resnet_ort / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    scale = np.abs(ref).max()
    assert np.abs(ref - got).max() <= 0.1 * scale  # a few one-step rounding flips at most


def test_asymmetric_bundles_are_refused_for_tensorrt(resnet_ort, tmp_path):
    with pytest.raises(CraftError, match="TensorRT's INT8 is symmetric.*--target ort-cpu"):
        export(ExportConfig(target="tensorrt"), resnet_ort / "bundle", tmp_path / "trt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(quant="w4a16", placement="ort-cpu"), "got --quant w4a16 .* quantize activations"),
        (dict(quant="w8a8", calib_method="entropy", placement="ort-cpu"), "minmax, percentile or mse"),
        (dict(quant="w8a8", placement="openvino"), "must be one of tensorrt, ort-cpu"),
        (dict(sparsity="2:4", placement="ort-cpu"), "need --quant"),
    ],
)
def test_placement_options_are_validated(kw, message):
    with pytest.raises(CraftError, match=message):
        from_flags(**kw)
