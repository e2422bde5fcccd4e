import copy
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig
from craft_deploy.export import run as export
from craft_deploy.export.passes.folding import fold_shape_constants
from craft_deploy.export.prepare import static_same_padding
from craft_deploy.models import load_bundle
from craft_deploy.runtimes.metadata import read_metadata


def _check(out, bundle_path, batch=5):
    """export.json, the model (full checker), and PyTorch vs ONNX Runtime logits on fresh inputs of a new batch size."""
    rec = json.loads((out / "export.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = read_metadata(proto)
    bundle = load_bundle(bundle_path)
    assert meta["input_size"] == bundle.manifest["input_size"] and meta["mean"] == bundle.manifest["mean"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *bundle.input_size)
    with torch.no_grad():
        ref = bundle.model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert got.dtype == np.float32  # FP16 models keep FP32 input and output
    return rec, proto, ref, got


def _inits(proto):
    return {t.name: t for t in proto.graph.initializer}


def _weight_dqs(proto):
    inits = _inits(proto)
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


@pytest.fixture(scope="module")
def tiny_w6a6(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "w6a6"
    compress(from_flags(quant="w6a6", calib_samples=64, calib_method="mse"), tiny_bundle, out)
    return out


def test_fp32_export_matches_pytorch(tiny_bundle, tmp_path):
    rec = export(ExportConfig(verify_samples=32), tiny_bundle, tmp_path / "fp32")
    rec, proto, ref, got = _check(tmp_path / "fp32", tiny_bundle)
    v = rec["verification"]["onnxruntime"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and rec["precision"] == "fp32" and rec["opset"] == 17
    assert np.abs(ref - got).max() < 1e-3
    assert not any(n.op_type in ("QuantizeLinear", "Shape", "ConstantOfShape") for n in proto.graph.node)


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_fp16_export_keeps_layernorm_and_softmax_in_fp32(which, tiny_bundle, tiny_vit_bundle, tmp_path):
    bundle = tiny_bundle if which == "cnn" else tiny_vit_bundle
    rec = export(ExportConfig(precision="fp16", verify_samples=32), bundle, tmp_path / "fp16")
    rec, proto, ref, got = _check(tmp_path / "fp16", bundle)
    assert rec["precision"] == "fp16" and rec["verification"]["onnxruntime"]["passed"]
    inits = _inits(proto)
    weights = [
        inits[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") if n.input[1] in inits
    ]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(ref - got).max() < 2e-2 * scale and (ref.argmax(1) == got.argmax(1)).mean() >= 0.8
    if which == "vit":
        # the FP32 islands: every LayerNormalization/Softmax reads FP32 (a Cast from FP16 in front of it)
        producers = {o: n for n in proto.graph.node for o in n.output}
        kept = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert kept
        for node in kept:
            src = producers.get(node.input[0])
            assert src is not None and src.op_type == "Cast"
            assert next(a.i for a in src.attribute if a.name == "to") == onnx.TensorProto.FLOAT


def test_w8a8_exports_qdq_with_int8_weights(tiny_w8a8, tiny_w8a8_onnx):
    rec, proto, ref, got = _check(tiny_w8a8_onnx, tiny_w8a8)
    ops = rec["ops"]
    n_layers = len(load_bundle(tiny_w8a8).manifest["methods"][-1]["state"]["layers"])
    assert ops["QuantizeLinear"] == n_layers  # one per quantized input; weight Qs folded away
    assert ops["DequantizeLinear"] == 2 * n_layers and rec["rewrites"]["weights_folded"] == n_layers
    # BatchNorm folded into the Q/DQ convs (integers kept, scales and bias rescaled), so nothing sits between a Conv
    # and the next QuantizeLinear but its activation
    assert "BatchNormalization" not in ops and rec["rewrites"]["batchnorm_folded"] > 0
    inits = _inits(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == "Conv":
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert producers[node.input[0]].op_type == "DequantizeLinear"
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.8
    assert rec["verification"]["onnxruntime"]["top1_agreement"] >= 0.95


def test_ort_cpu_target_writes_uint8_activations_with_identical_results(tiny_w8a8, tiny_w8a8_onnx, tmp_path):
    rec = export(ExportConfig(target="ort-cpu", verify_samples=32), tiny_w8a8, tmp_path / "u8")
    proto = onnx.load(str(tmp_path / "u8" / "model.onnx"))
    inits = _inits(proto)
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert rec["activations"] == "uint8" and rec["rewrites"]["uint8_activations"] > 0
    # Conv -> Clip -> Q became Conv -> Q -> DQ -> Clip -> Q (ONNX Runtime's QLinearConv pattern); the comparison with
    # the S8S8 file below, which has no such pairs, shows the added pairs change no value
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    requantized = [c for c in convs if [n.op_type for n in consumers[c.output[0]]] == ["QuantizeLinear"]]
    assert len(requantized) >= rec["rewrites"]["requantized_outputs"]  # test_efficientnet's SiLU: often none
    for q in acts:
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.uint8 and (zp == 128).all()  # symmetric int8 grid = uint8 grid around 128
    for dq in _weight_dqs(proto):
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8  # U8S8
    x = np.random.default_rng(0).standard_normal((8, *load_bundle(tiny_w8a8).input_size)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic, unfused
    run = [
        ort.InferenceSession(str(p / "model.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})
        for p in (tiny_w8a8_onnx, tmp_path / "u8")
    ]
    np.testing.assert_allclose(run[0][0], run[1][0], rtol=0, atol=1e-5)


def _rewrite_outputs(nodes, init, x, out_shape, rewrite):
    """Build a one-input graph, apply `rewrite` to a copy (full checker after), and run both in ONNX's reference
    evaluator on `x`; returns (rewrite's return value, rewritten model, output before, output after)."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        init,
    )
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    model = copy.deepcopy(before)
    result = rewrite(model)
    onnx.checker.check_model(model, full_check=True)
    ref, got = (ReferenceEvaluator(m).run(None, {"x": x})[0] for m in (before, model))
    return result, model, ref, got


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_requantized_layer_outputs_change_no_value(act):
    from onnx import helper

    from craft_deploy.export.passes.qdq import requantize_layer_outputs

    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(4, 0.02, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.float32(0.05), "s0"),
        numpy_helper.from_array(np.float32(0.047), "s1"),  # 6.0 is not on this grid
        numpy_helper.from_array(np.int8(0), "z"),
        numpy_helper.from_array(np.float32(0.0), "lo"),
        numpy_helper.from_array(np.float32(6.0), "hi"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s0", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s0", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node(act, ["y", "lo", "hi"] if act == "Clip" else ["y"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s1", "z"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "s1", "z"], ["out"]),
    ]
    x = (rng.standard_normal((2, 3, 8, 8)) * 3).astype(np.float32)
    added, _, ref, got = _rewrite_outputs(nodes, init, x, [2, 4, 8, 8], requantize_layer_outputs)
    assert added == 1 and np.abs(ref).max() > 1 and np.array_equal(ref, got)


def test_requantized_pads_pools_and_adds_change_no_value():
    from onnx import helper

    from craft_deploy.export.passes.qdq import requantize_grid_ops, requantize_layer_outputs

    rng = np.random.default_rng(1)
    init = [
        numpy_helper.from_array(rng.integers(-63, 64, (3, 3, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(3, 0.02, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
        numpy_helper.from_array(np.float32(0.05), "s0"),
        numpy_helper.from_array(np.int8(-7), "z0"),  # asymmetric: 0 is on the grid, off its centre
        numpy_helper.from_array(np.float32(0.041), "s1"),
        numpy_helper.from_array(np.int8(-128), "z1"),  # a post-ReLU grid starting at 0
        numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s0", "z0"], ["xd"]),
        helper.make_node("Pad", ["xd", "pads"], ["xp"]),  # TensorFlow 'SAME' padding before a strided conv
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2]),
        helper.make_node("Add", ["y", "y"], ["y2"]),  # not from DQs: left alone
        helper.make_node("QuantizeLinear", ["y2", "s0", "z0"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s0", "z0"], ["yd"]),
        helper.make_node("Add", ["yd", "yd"], ["s"]),  # a residual add of dequantized inputs
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2]),
        helper.make_node("QuantizeLinear", ["m", "s1", "z1"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "s1", "z1"], ["out"]),
    ]
    x = (rng.standard_normal((2, 3, 9, 9)) * 3).astype(np.float32)

    def rewrite(model):
        # after the Add (through Relu and MaxPool; the Conv already has one), then after the Pad
        return requantize_layer_outputs(model), requantize_grid_ops(model)

    added, model, ref, got = _rewrite_outputs(nodes, init, x, [2, 3, 3, 4], rewrite)
    assert added == (1, 1)
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 5
    assert np.abs(ref).max() > 1 and np.array_equal(ref, got)


@pytest.mark.parametrize(
    "act, hi, zp, dropped",
    [
        ("Relu", None, -128, True),  # post-ReLU grid [0, 255 s]: the quantizer clamps at 0 itself
        ("Clip", 6.0, -128, True),  # ReLU6 with the grid's top (255 * 0.02 = 5.1) under 6
        ("Clip", 4.0, -128, False),  # the clip cuts inside the grid: kept
        ("Relu", None, -7, False),  # a grid with negative steps: kept
    ],
)
def test_clamps_before_post_relu_quantizers_are_dropped_exactly(act, hi, zp, dropped):
    from onnx import helper

    from craft_deploy.export.passes.qdq import drop_clamps_before_quantize

    init = [
        numpy_helper.from_array(np.float32(0.02), "s"),
        numpy_helper.from_array(np.int8(zp), "z"),
        numpy_helper.from_array(np.float32(0.0), "lo"),
        numpy_helper.from_array(np.float32(hi or 0.0), "hi"),
    ]
    nodes = [
        helper.make_node(act, ["x", "lo", "hi"] if act == "Clip" else ["x"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"]),
    ]
    x = np.linspace(-8, 8, 64, dtype=np.float32)
    removed, _, ref, got = _rewrite_outputs(nodes, init, x, [64], drop_clamps_before_quantize)
    assert removed == int(dropped) and np.array_equal(ref, got)


def test_w7a8_runs_exactly_in_fused_integer_kernels(tiny_bundle, tmp_path):
    # 7-bit weights cannot overflow the 16-bit u8 x s8 pair sums of AVX2 kernels, so fused kernels agree everywhere
    compress(from_flags(quant="w7a8", calib_samples=32), tiny_bundle, tmp_path / "w7a8")
    rec = export(ExportConfig(target="ort-cpu", verify_samples=32), tmp_path / "w7a8", tmp_path / "onnx")
    fused = rec["verification"]["onnxruntime_fused_kernels"]
    assert fused["within_tolerance"] and fused["top1_agreement"] >= 0.95 and "warning" not in rec


def test_w6a6_exports_the_narrow_grid_exactly(tiny_w6a6, tmp_path):
    rec = export(ExportConfig(verify_samples=32), tiny_w6a6, tmp_path / "w6a6")
    _, proto, ref, got = _check(tmp_path / "w6a6", tiny_w6a6)
    assert rec["verification"]["onnxruntime"]["passed"] and rec["weights"] == "int8"
    inits = _inits(proto)
    for dq in _weight_dqs(proto):
        w = numpy_helper.to_array(inits[dq.input[0]])
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 31  # INT6 values in INT8 storage
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.8


@pytest.mark.parametrize("group", [0, 8])
def test_w4a16_exports_int4_weights_at_opset_21(group, tiny_bundle, tmp_path):
    # groups of 8 do not divide the stem's 27 weights per channel, the depthwise 9, the SE expansions' 12
    extra = {"group_size": group, "exclude": ("conv_stem", "*conv_dw", "*se.*")} if group else {}
    compress(from_flags(quant="w4a16", calib_samples=32, **extra), tiny_bundle, tmp_path / "w4")
    with pytest.raises(CraftError, match="ort-cpu"):  # TensorRT has no INT4 convolutions
        export(ExportConfig(), tmp_path / "w4", tmp_path / "trt")
    with pytest.raises(CraftError, match="opset 21"):
        export(ExportConfig(target="ort-cpu", opset=17), tmp_path / "w4", tmp_path / "o17")
    assert not (tmp_path / "trt").exists() and not (tmp_path / "o17").exists()
    rec = export(ExportConfig(target="ort-cpu", verify_samples=32), tmp_path / "w4", tmp_path / "onnx")
    _, proto, ref, got = _check(tmp_path / "onnx", tmp_path / "w4")
    assert rec["opset"] == 21 and rec["weights"] == "int4" and rec["activations"] == "fp32"
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    inits = _inits(proto)
    dqs = _weight_dqs(proto)
    n_layers = len(load_bundle(tmp_path / "w4").manifest["methods"][-1]["state"]["layers"])
    assert len(dqs) == n_layers == rec["rewrites"]["int4_weights"]
    for dq in dqs:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        block = next((a.i for a in dq.attribute if a.name == "block_size"), 0)
        assert block == group
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # weight-only: float activations
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(ref - got).max() < 1e-3 * scale  # INT4 values dequantize exactly; only float rounding differs


def test_vit_w8a8_with_attention_matmuls_exports(tiny_vit_bundle, tmp_path):
    compress(
        from_flags(quant="w8a8", calib_samples=32, calib_method="mse", quant_attention=True),
        tiny_vit_bundle,
        tmp_path / "q",
    )
    rec = export(ExportConfig(verify_samples=32), tmp_path / "q", tmp_path / "onnx")
    _, proto, ref, got = _check(tmp_path / "onnx", tmp_path / "q")
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert any(all(producers[i].op_type == "DequantizeLinear" for i in n.input if i in producers) for n in matmuls)
    assert rec["verification"]["onnxruntime"]["top1_agreement"] >= 0.95


@pytest.mark.parametrize(
    "spec",
    [
        None,
        {"quant": "w8a8"},
        {"quant": "w6a6", "calib_method": "mse"},
        {"quant": "w4a16", "group_size": 32},
        {"sparsity": "2:4", "quant": "w8a8"},
    ],
    ids=["fp32", "w8a8", "w6a6", "w4a16", "2:4+w8a8"],
)
def test_every_compression_of_a_tiny_vit_exports_and_agrees(spec, tiny_vit_bundle, tmp_path):
    bundle = tiny_vit_bundle
    if spec is not None:
        bundle = tmp_path / "c"
        compress(from_flags(calib_samples=32, **spec), tiny_vit_bundle, bundle)
    rec = export(ExportConfig(target="ort-cpu", verify_samples=32), bundle, tmp_path / "onnx")
    _, proto, ref, got = _check(tmp_path / "onnx", bundle)  # full checker, fresh inputs, new batch size
    v = rec["verification"]["onnxruntime"]
    assert v["passed"] and rec["precision"] == ("fp32" if spec is None else "int8")
    scale = np.abs(ref).max()
    limit = 1e-3 if spec is None else 0.1  # float: accumulation order; Q/DQ: a few one-step rounding flips
    assert np.abs(ref - got).max() <= limit * scale
    if spec and "sparsity" in spec:
        assert v["weight_zeros_onnx"] >= v["weight_zeros_bundle"] > 0
    if spec and spec["quant"] == "w4a16":
        assert rec["weights"] == "int4" and rec["opset"] == 21


def test_pruned_weights_stay_zero_in_onnx(tiny_bundle, tmp_path):
    compress(from_flags(sparsity="2:4", quant="w8a8", calib_samples=32), tiny_bundle, tmp_path / "c")
    # 2:4 wrecks this tiny model (near-tied logits): the default Q/DQ judgement accepts it by |diff| <= 10% of scale
    rec = export(ExportConfig(verify_samples=16), tmp_path / "c", tmp_path / "e")
    v = rec["verification"]["onnxruntime"]
    assert v["weight_zeros_onnx"] >= v["weight_zeros_bundle"] > 0 and v["passed"]


def test_static_same_padding_matches_timm_and_exports_without_shape_arithmetic():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), Conv2dSame(8, 8, 5, stride=1), Conv2dSame(8, 4, 3, stride=2, groups=4)
    ).eval()
    static = {}
    for size in (32, 33):
        x = torch.randn(2, 3, size, size)
        static[size] = copy.deepcopy(model)
        assert static_same_padding(static[size], [3, size, size]) == 3
        with torch.no_grad():
            assert torch.equal(static[size](x), model(x))
    # a stride-2 3x3 conv pads (0, 1) on an even input: a constant Pad; (1, 1) on an odd one, inside the conv
    assert static[32][0].static_pad == (0, 1, 0, 1) and static[33][0].static_pad is None
    assert static[32][1].static_pad is None and static[32][1].static_padding == (2, 2)  # stride-1 5x5
    static = static[32]
    buf = io.BytesIO()
    torch.onnx.export(
        static,
        (torch.zeros(1, 3, 32, 32),),
        buf,
        dynamo=False,
        opset_version=17,
        dynamic_axes={"input": {0: "b"}},
        input_names=["input"],
    )
    proto = onnx.load_from_string(buf.getvalue())
    assert fold_shape_constants(proto) > 0
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Pad"}
    onnx.checker.check_model(proto, full_check=True)


def test_bad_input_is_refused_before_anything_is_written(tiny_bundle, tiny_w8a8, tmp_path):
    with pytest.raises(CraftError, match="compress .* --quant w8a8"):
        export(ExportConfig(precision="int8"), tiny_bundle, tmp_path / "a")
    with pytest.raises(CraftError, match="--precision int8"):
        export(ExportConfig(precision="fp16"), tiny_w8a8, tmp_path / "b")
    with pytest.raises(
        CraftError, match="--format 'tflite' is not supported; choose one of onnx, tensorrt, torch-tensorrt"
    ):
        export(ExportConfig(format="tflite"), tiny_bundle, tmp_path / "c")  # the target registry refuses it
    with pytest.raises(CraftError, match="--format tensorrt"):
        ExportConfig(sparse=True)
    assert not list(tmp_path.iterdir())


def test_a_mismatch_beyond_tolerance_fails_and_writes_nothing(tiny_w8a8, tmp_path):
    # an explicit --atol replaces top-1 agreement for Q/DQ; no quantized model meets 1e-9
    with pytest.raises(CraftError, match="disagrees with PyTorch beyond tolerance"):
        export(ExportConfig(verify_samples=16, atol=1e-9), tiny_w8a8, tmp_path / "strict")
    assert not list(tmp_path.iterdir())
    rec = export(ExportConfig(verify_samples=16, atol=10.0), tiny_w8a8, tmp_path / "loose")
    assert rec["verification"]["onnxruntime"]["tolerance"] == {"max_abs_diff": 10.0}


def test_tensorrt_without_tensorrt_gives_the_install_hint(tiny_w8a8, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; the install hint is for machines without it")
    except ImportError:
        pass
    with pytest.raises(CraftError, match=r"pip install 'craft-deploy\[tensorrt\]'"):
        export(ExportConfig(format="tensorrt"), tiny_w8a8, tmp_path / "trt")
    assert not list(tmp_path.iterdir())


def test_truncated_bundle_fails_cleanly(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CraftError, match="corrupt or truncated"):
        export(ExportConfig(), bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("sparse", [False, True])
def test_tensorrt_engine_from_w8a8_and_2_4(sparse, tiny_bundle, tmp_path):
    spec = {"sparsity": "2:4", "quant": "w8a8"} if sparse else {"quant": "w8a8"}
    compress(from_flags(calib_samples=32, **spec), tiny_bundle, tmp_path / "q")
    rec = export(
        ExportConfig(format="tensorrt", sparse=sparse, timing_cache=str(tmp_path / "cache.bin")),
        tmp_path / "q",
        tmp_path / "trt",
    )
    assert (tmp_path / "trt" / "model.engine").stat().st_size > 0 and (tmp_path / "trt" / "build.log").is_file()
    assert rec["verification"]["tensorrt"]["passed"] and rec["engine"]["layers"]["int8"] > 0
    assert (tmp_path / "cache.bin").stat().st_size > 0
    meta = json.loads((tmp_path / "trt" / "metadata.json").read_text())
    assert meta["engine"]["tensorrt"] and meta["input_size"] == load_bundle(tiny_bundle).manifest["input_size"]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_torch_tensorrt_program(tiny_bundle, tmp_path):
    rec = export(ExportConfig(format="torch-tensorrt", precision="fp16"), tiny_bundle, tmp_path / "tt")
    assert (tmp_path / "tt" / "model.ep").is_file() and rec["verification"]["torch_tensorrt"]["passed"]


def test_qdq_judgement_accepts_near_tie_flips_only():
    from craft_deploy.runtimes.tolerance import compare_outputs, judge

    ref = np.array([[1.00, 0.99, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]] * 4, np.float32)
    got = ref.copy()
    got[0] = [0.98, 1.00, 0.0]  # a near-tie flips: 1 of 12 disagree (92%), with logits 0.02 apart
    check = compare_outputs(ref, got)
    assert check["top1_agreement"] < 0.95 and judge(check, "int8", None)
    got[1] = [0.0, 2.5, 0.0]  # a confident prediction flips: no rounding effect does that
    assert not judge(compare_outputs(ref, got), "int8", None)


def test_an_ill_conditioned_model_is_judged_against_float64(tmp_path):
    # large inner activations (two near-equal halves) cancelled into small logits: FP32 rounding of the inner values
    # reaches the logits, so PyTorch's FP32 logits are themselves inexact. Whether ONNX Runtime's FP32 kernels on a
    # given CPU land within the plain tolerance of PyTorch's is the CPU's business (they did on an AMX Xeon, not on
    # an EPYC); what holds everywhere: a perfect FP32 implementation (the float64 result rounded once) fails the plain
    # check, passes the float64 one, and the real export passes one of them
    from craft_deploy.export.prepare import export_model
    from craft_deploy.runtimes.onnx_session import onnx_logits
    from craft_deploy.runtimes.tolerance import compare_outputs, judge, judge_against_float64, judge_export

    torch.manual_seed(0)
    w = torch.randn(64, 192) * 300
    inner = torch.nn.Linear(192, 128, bias=False)
    inner.weight.data = torch.cat([w, w + torch.randn_like(w) * 0.01])
    head = torch.nn.Linear(128, 10, bias=False)
    u = torch.randn(10, 64)
    head.weight.data = torch.cat([u, -u], 1)
    model = torch.nn.Sequential(torch.nn.Flatten(), inner, head).eval()
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    perfect = exact.astype(np.float32)
    check = compare_outputs(ref, perfect)
    assert not judge(check, "fp32", None)  # PyTorch FP32 is further from the truth than the tolerance
    assert judge_against_float64(check, model, x, ref, perfect)
    assert check["float64_reference"]["pytorch_fp32_max_abs_diff"] > check["tolerance"]["max_abs_diff"]
    # the second opinion is for the default tolerance only: an explicit --atol is the user's word
    assert judge_export(compare_outputs(ref, perfect), "fp32", None, model, x, ref, perfect)
    assert not judge_export(compare_outputs(ref, perfect), "fp32", 1e-3, model, x, ref, perfect)
    # an export that is wrong by 5% of the logit scale still fails both
    wrong = perfect + 0.05 * check["reference_logit_absmax"]
    bad = compare_outputs(ref, wrong)
    assert not judge(bad, "fp32", None) and not judge_against_float64(bad, model, x, ref, wrong)
    # the real export, in this CPU's ONNX Runtime, passes one way or the other
    path = tmp_path / "m.onnx"
    path.write_bytes(export_model(model, [3, 8, 8], 17).SerializeToString())
    got = onnx_logits(path, x)
    assert judge_export(compare_outputs(ref, got), "fp32", None, model, x, ref, got)


def test_aoti_package_is_verified_loads_without_craft_deploy_and_benches(tiny_bundle, tmp_path):
    import subprocess
    import sys

    from craft_deploy.bench import run as bench
    from craft_deploy.config import BenchConfig

    rec = export(ExportConfig(format="aoti", batch_sizes=(1, 8), verify_samples=16), tiny_bundle, tmp_path / "a")
    check = rec["verification"]["aoti"]
    assert rec["file"] == "model.pt2" and check["passed"] and check["top1_agreement"] == 1.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert rec["compile"]["device"] == device and rec["compile"]["batch_range"] == [1, 8]
    # PyTorch alone loads and runs it: no craft_deploy, no timm on the path
    code = (
        "import sys, torch; sys.modules['craft_deploy'] = None; sys.modules['timm'] = None; "
        f"m = torch._inductor.aoti_load_package({str(tmp_path / 'a' / 'model.pt2')!r}); "
        f"print(tuple(m(torch.randn(3, 3, 32, 32, device={device!r})).shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("(3, 10)")
    b = bench(
        BenchConfig(backend="aoti", batch_sizes=(1, 8), iters=2, min_seconds=0.0, eval_subset=64),
        tmp_path / "a",
        tmp_path / "b",
    )
    onnx_free = bench(
        BenchConfig(backend="pytorch", batch_sizes=(1,), iters=2, min_seconds=0.0, eval_subset=64),
        tiny_bundle,
        tmp_path / "p",
    )
    assert b["results"][0]["top1"] == pytest.approx(onnx_free["results"][0]["top1"], abs=2.0)
    with pytest.raises(
        CraftError, match="was compiled for batches up to 8, not 16: export it again with --batch-sizes 1,16"
    ):
        bench(BenchConfig(backend="aoti", batch_sizes=(16,), iters=1, eval_subset=16), tmp_path / "a", tmp_path / "c")


def test_a_broken_weight_scale_is_named_by_the_divergence_report(tiny_w8a8, tmp_path, monkeypatch):
    # one layer's weight scales made 4x larger in the file: export fails (exit 4), and the report says that the file
    # (not ONNX Runtime) is wrong, at the first activation quantizer after that layer, fed by that layer
    import craft_deploy.export.targets.onnx_model as onnx_model
    from craft_deploy import VerificationError
    from craft_deploy.runtimes.onnx_graph import initializers, producers

    passes, broken = onnx_model.apply_passes, {}

    def break_one_scale(proto, plan):
        proto, counts = passes(proto, plan)
        inits, writers = initializers(proto.graph), producers(proto.graph)
        convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in writers]
        conv = convs[1]  # the first block's conv: the 4x reaches the logits (an SE conv's is damped below the policy)
        scale = inits[writers[conv.input[1]].input[1]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
        broken["conv"] = conv.name
        return proto, counts

    monkeypatch.setattr(onnx_model, "apply_passes", break_one_scale)
    with pytest.raises(VerificationError, match="the file itself differs from PyTorch") as e:
        export(ExportConfig(verify_samples=32), tiny_w8a8, tmp_path / "e")
    assert f"fed by Conv {broken['conv']}" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "e").exists()


def test_the_divergence_report_clears_a_file_that_is_right(tiny_w8a8, tmp_path):
    # the file agrees with PyTorch in the reference evaluator, so whatever disagreed was the runtime
    from craft_deploy.export.diagnose import diagnose

    rec = export(ExportConfig(verify_samples=32), tiny_w8a8, tmp_path / "e")
    bundle = load_bundle(tiny_w8a8)
    images = torch.randn(4, 3, 32, 32)
    report = diagnose(tmp_path / "e" / rec["file"], bundle.model, images)
    assert report["wrong"] == "runtime" and report["images"] == 4
    assert report["reference_evaluator_vs_pytorch"]["top1_agreement"] == 1.0
    assert report["first_divergence"] is None  # this CPU's ONNX Runtime computes what the reference evaluator does
