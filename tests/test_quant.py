"""Post-training quantization: calibrators, granularities, asymmetric and twin-uniform quantizers, PTQ4ViT, bundles."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_model_and_calib
from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress.quant import QuantConfig
from craft_deploy.toolkit.attention import QuantMatMul
from craft_deploy.toolkit.calibrators import CALIBRATORS, RangeObserver, compute_range
from craft_deploy.toolkit.qmodules import ActQuantizer, TwinActQuantizer, WeightQuantizer, activation_quantizers
from craft_deploy.toolkit.qparams import sqnr_db
from craft_deploy.toolkit.registry import apply_method


def _observe(x: torch.Tensor, symmetric: bool = True, batches: int = 4) -> RangeObserver:
    obs = RangeObserver(symmetric)
    for chunk in x.chunk(batches):
        obs.observe(chunk)
    obs.start_histogram()
    for chunk in x.chunk(batches):
        obs.observe(chunk)
    return obs


def test_streaming_histogram_equals_one_shot_histogram():
    x = torch.randn(10_000) * 2
    streamed, whole = _observe(x, batches=7), _observe(x, batches=1)
    assert torch.equal(streamed.hist, whole.hist)
    assert streamed.hist.sum() == x.numel()


def test_calibrators_on_known_distributions():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(99_990), torch.full((10,), 50.0)])  # uniform [0, 1) plus 0.01% outliers at 50
    obs = _observe(x)
    assert compute_range(obs, "minmax", 8) == (-50.0, 50.0)
    lo, hi = compute_range(obs, "percentile", 8, percentile=99.9)
    assert hi == -lo and 0.99 <= hi <= 1.1  # the outliers are beyond the 99.9th percentile
    assert compute_range(obs, "mse", 8)[1] < 50.0
    # heavy-tailed activations with rare outliers: entropy and MSE clip well inside the maximum
    heavy = _observe(torch.cat([torch.distributions.Laplace(0.0, 1.0).sample((100_000,)), torch.full((10,), 50.0)]))
    assert compute_range(heavy, "entropy", 8)[1] < 25.0
    assert compute_range(heavy, "mse", 8)[1] > 40.0  # MSE keeps them: at 8 bits clipping 10 outliers costs more
    laplace = _observe(torch.distributions.Laplace(0.0, 1.0).sample((100_000,)))
    assert compute_range(laplace, "mse", 4)[1] < 0.7 * laplace.hi  # at 4 bits the tail is worth clipping
    # a uniform distribution without outliers: every method keeps (nearly) the whole range
    u = _observe(torch.rand(100_000))
    for method in ("percentile", "mse", "entropy"):
        assert compute_range(u, method, 8, 99.99)[1] > 0.9, method


def test_entropy_ignores_the_zero_spike_of_post_relu_activations():
    """70% exact zeros (post-ReLU6) must not drag the KL threshold down to its smallest candidate."""
    torch.manual_seed(0)
    x = torch.cat([torch.zeros(70_000), torch.rand(29_000) * 3, torch.full((1_000,), 6.0)])
    lo, hi = compute_range(_observe(x), "entropy", 8)
    assert hi > 2.5  # the bulk (up to 3) stays inside; the old spike-driven answer was 128 bins = 0.375


def test_asymmetric_observer_keeps_zero_in_range_and_uses_the_full_grid():
    x = torch.rand(10_000) * 6  # post-ReLU6-like: all >= 0
    obs = _observe(x, symmetric=False)
    lo, hi = compute_range(obs, "minmax", 8)
    assert lo == 0.0 and hi == pytest.approx(float(x.max()))
    q = ActQuantizer(8, symmetric=False)
    q.set_range(lo, hi)
    assert int(q.zero_point) == -128  # 0 maps to the lowest integer: all 256 levels cover [0, hi]
    y = q(x)
    assert len(torch.unique(y)) > 200 and float((y - x).abs().max()) <= float(q.scale) / 2 + 1e-6


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (6, True), (5, False), (4, True)])
def test_quantized_linear_matches_an_integer_matmul(bits, symmetric):
    """A quantized Linear computes dequant(int(x) @ int(w)^T) exactly, for the scales it was given."""
    torch.manual_seed(bits)
    lin = nn.Linear(32, 16)
    x = torch.randn(8, 32) * 2 + (0 if symmetric else 1.5)
    model = nn.Sequential(lin)
    apply_method(model, QuantConfig(w_bits=bits, a_bits=bits, act_asymmetric=not symmetric), lambda m: m(x))
    wq, aq = lin.parametrizations.weight[0], lin.input_quantizer
    w = lin.parametrizations.weight.original
    half = 2 ** (bits - 1)
    qw = torch.clamp(torch.round(w / wq.scale[:, None]), -(half - 1), half - 1).to(torch.int64)
    zp = int(aq.zero_point)
    qx = torch.clamp(torch.round(x / aq.scale) + zp, -half, half - 1).to(torch.int64)
    acc = (qx - zp) @ qw.T  # the integer accumulation an INT8 kernel performs
    ref = acc.double() * (aq.scale.double() * wq.scale.double()[None, :]) + lin.bias.double()
    with torch.no_grad():
        got = model(x).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert int(qw.abs().max()) <= half - 1


@pytest.mark.parametrize("granularity, group", [("channel", 0), ("tensor", 0), ("group", 8)])
def test_weight_granularities(granularity, group):
    torch.manual_seed(0)
    w = torch.randn(4, 16) * torch.tensor([[0.1], [1.0], [5.0], [0.5]])
    wq = WeightQuantizer(w.shape, 4, granularity, group)
    wq.calibrate(w)
    expected = {"channel": 4, "tensor": 4, "group": 8}[granularity]
    assert wq.scale.numel() == expected
    if granularity == "tensor":
        assert torch.all(wq.scale == wq.scale[0])
    y = wq(w)
    for row, scale in zip(wq.rows(y), wq.scale):  # every value is an integer multiple of its own scale, |q| <= 7
        q = row / scale
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 7 + 1e-4
    # finer granularity, smaller error
    errors = {}
    for g, gs in (("tensor", 0), ("channel", 0), ("group", 8)):
        q = WeightQuantizer(w.shape, 4, g, gs)
        q.calibrate(w)
        errors[g] = float((q(w) - w).pow(2).sum())
    assert errors["group"] <= errors["channel"] < errors["tensor"]


def test_mse_weight_calibration_beats_minmax_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    err = {}
    for method in ("minmax", "mse"):
        q = WeightQuantizer(w.shape, 4)
        q.calibrate(w, method)
        err[method] = float((q(w) - w).pow(2).sum())
    assert err["mse"] < 0.9 * err["minmax"]


def test_twin_uniform_quantizers():
    q = TwinActQuantizer(4, "softmax")  # 8 levels each; delta2 = 1/8
    q.set_deltas(1 / 8, 3)  # delta1 = 1/64: fine grid covers [0, 8/64)
    x = torch.tensor([0.0, 0.01, 0.05, 0.2, 0.5, 0.99])
    y = q(x)
    assert torch.allclose(y[:3], torch.round(x[:3] * 64) / 64)
    assert torch.allclose(y[3:], torch.clamp(torch.round(x[3:] * 8), 0, 7) / 8)
    g = TwinActQuantizer(4, "gelu")
    g.set_range(-0.17, 3.0)
    assert float(g.delta1) * 8 >= 0.17 and float(g.delta1) * 4 < 0.17  # finest power-of-two step covering -0.17
    y = g(torch.tensor([-0.17, -0.05, 0.0, 1.3, 5.0]))
    assert y[0] < 0 and y[2] == 0 and torch.isclose(y[-1], g.delta2 * 7)


@pytest.mark.parametrize("method", [m for m, c in CALIBRATORS.items() if not c.twin_quantizers])
@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])
def test_every_calibrator_quantizes_real_models(name, method):
    model, calib, data = tiny_model_and_calib(name)
    with torch.no_grad():
        ref = model(data)
    report = apply_method(model, QuantConfig(w_bits=8, a_bits=8, calib_method=method), calib)
    assert report["calibration"] == method and report["timings"]["activations_seconds"] > 0
    scales = [q.scale for q in activation_quantizers(model).values()]
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales)
    with torch.no_grad():
        assert sqnr_db(ref, model(data)) > 20.0


def test_bn_recalibration_re_estimates_statistics_under_the_quantized_forward():
    model, calib, data = tiny_model_and_calib("test_efficientnet")
    report = apply_method(model, QuantConfig(w_bits=4, a_bits=4, bn_recalibrate=True), calib)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert report["bn_recalibrated"] == len(bns) > 0 and report["timings"]["bn_recalibrate_seconds"] > 0
    # the stem BN's running mean is now the per-channel mean of the quantized stem conv's outputs on the data
    seen = []
    handle = model.conv_stem.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        calib(model)
    handle.remove()
    out = torch.cat(seen)
    assert torch.allclose(model.bn1.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, out.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-3, atol=1e-6)
    vit, vit_calib, _ = tiny_model_and_calib("test_vit")
    report = apply_method(vit, QuantConfig(w_bits=8, a_bits=8, bn_recalibrate=True), vit_calib)
    assert report["bn_recalibrated"] == 0 and "no BatchNorm" in report["notes"][0]


def test_attention_matmuls_get_quantizers_and_still_compute_attention():
    model, calib, data = tiny_model_and_calib("test_vit")
    original = copy.deepcopy(model)
    report = apply_method(model, QuantConfig(quant_attention=True), calib)
    with torch.no_grad():  # calibration moved the biases onto their int32 grids (compress.bias_bound): the same here
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.bias is not None:
                original.get_submodule(name).bias.copy_(mod.bias)
        ref = original.double()(data.double())  # float64: timm's fused attention and ours agree to 1e-12 on any CPU
    matmuls = [m for m in model.modules() if isinstance(m, QuantMatMul)]
    assert len(matmuls) == 2 * len(report["matmuls"]) > 0
    for mm in matmuls:
        mm.a_quantizer.enabled = mm.b_quantizer.enabled = False
    for mod in model.modules():
        if hasattr(mod, "input_quantizer"):
            mod.input_quantizer.enabled = False
        if hasattr(mod, "parametrizations"):
            mod.parametrizations.weight[0].enabled = False
    with torch.no_grad():  # all quantizers off: the unfused attention equals timm's fused one
        assert torch.allclose(model.double()(data.double()), ref, atol=1e-10)


def test_ptq4vit_search_lowers_the_hessian_weighted_error_on_a_vit():
    model, calib, data = tiny_model_and_calib("test_vit")
    with torch.no_grad():
        ref = model(data)
    mse_model = copy.deepcopy(model)
    report = apply_method(model, QuantConfig(w_bits=6, a_bits=6, calib_method="ptq4vit", search_points=8), calib)
    assert report["calibration"] == "ptq4vit"
    twins = [q for q in activation_quantizers(model).values() if isinstance(q, TwinActQuantizer)]
    modes = {q.mode for q in twins}
    assert modes == {"softmax", "gelu"}  # post-softmax probabilities and post-GELU fc2 inputs
    apply_method(mse_model, QuantConfig(w_bits=6, a_bits=6, calib_method="mse"), calib)
    with torch.no_grad():
        assert sqnr_db(ref, model(data)) > 10.0 and np.isfinite(sqnr_db(ref, mse_model(data)))


def test_ptq4vit_reports_per_op_errors_and_never_worsens_them():
    from craft_deploy.compress.ptq4vit import hessian_guided_search

    model, calib, _ = tiny_model_and_calib("test_vit")
    apply_method(model, QuantConfig(w_bits=4, a_bits=4, calib_method="minmax", quant_attention=True), calib)
    result = hessian_guided_search(model, calib, QuantConfig(search_points=6, search_rounds=1))
    assert len(result) > 10
    assert all(r["error_searched"] <= r["error_minmax"] * (1 + 1e-9) for r in result.values())
    assert sum(r["error_searched"] for r in result.values()) < sum(r["error_minmax"] for r in result.values())


def test_ptq4vit_falls_back_to_mse_on_a_cnn():
    model, calib, _ = tiny_model_and_calib("test_efficientnet")
    report = apply_method(model, QuantConfig(calib_method="ptq4vit"), calib)
    assert report["calibration"] == "mse" and "ptq4vit needs a ViT" in report["notes"][0]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(quant="w8a8", group_size=128), "weight-only"),
        (dict(quant="w4a16", group_size=1), "--group-size must be >= 2"),
        (dict(quant="w8a8", calib_method="entropy", act_asymmetric=True), "entropy calibrates symmetric"),
        (dict(quant="w8a8", percentile=101.0), "--percentile must be in"),
        (dict(quant="w8a8", calib_method="kl"), "choose one of minmax, percentile, mse, entropy, ptq4vit"),
        (dict(sparsity="2:4", calib_method="mse"), "need --quant"),
    ],
)
def test_quantization_options_are_validated(kw, message):
    with pytest.raises(CraftError, match=message):
        from_flags(**kw)


def test_calibrated_scales_round_trip_through_the_bundle(tiny_bundle, tmp_path):
    from craft_deploy.compress import run
    from craft_deploy.models import load_bundle

    out = tmp_path / "q"
    rec = run(from_flags(quant="w6a6", calib_method="mse", act_asymmetric=True, calib_samples=64), tiny_bundle, out)
    assert rec["methods"][0]["calibration"] == "mse"
    bundle = load_bundle(out)
    assert bundle.manifest["methods"][-1]["state"]["weight_calibration"] == "mse"
    loaded = activation_quantizers(bundle.model)
    ranges = rec["methods"][0]["activation_ranges"]
    assert set(ranges) == set(loaded)
    for name, q in loaded.items():
        assert not q.symmetric
        assert q.range() == pytest.approx(ranges[name], abs=1e-5)
    assert any(int(q.zero_point) != 0 for q in loaded.values())


def test_ptq4vit_bundles_are_refused_by_export_with_the_alternative():
    from craft_deploy.config import ExportConfig
    from craft_deploy.export import plan_export

    state = {"config": "w8a8", "layers": {"a": {"a_twin": "gelu", "w_bits": 8}}, "matmuls": {}}
    manifest = {"methods": [{"method": "quantize", "config": None, "state": state}]}
    with pytest.raises(CraftError, match="--calib-method mse"):
        plan_export(ExportConfig(), manifest, "runs/vit-w8a8")
