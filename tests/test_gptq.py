"""GPTQ weight rounding: the solver against a direct error-feedback loop, its scale layout against the weight
quantizer, and the registered option on real timm models (alone and after SparseGPT pruning)."""

from __future__ import annotations

import pytest
import torch
from test_sparsegpt import _correlated_inputs
from torch import nn

from conftest import tiny_model_and_calib
from craft_deploy import CraftError
from craft_deploy.compress import PruneConfig, QuantConfig
from craft_deploy.compress.gptq import gptq_round, weight_scales_matrix
from craft_deploy.compress.sparsegpt import DAMPENING, from_weight_matrix, weight_matrix
from craft_deploy.toolkit.qmodules import WeightQuantizer, quantized_layers
from craft_deploy.toolkit.qparams import qmax_for
from craft_deploy.toolkit.registry import apply_method


def _direct(w, h, s, bits):
    """Round columns left to right; each column's error moves the later columns along the explicit inverse of the
    Hessian of the columns not yet rounded."""
    w, h = w.double().clone(), h.double().clone()
    h += DAMPENING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    qmax = qmax_for(bits)
    zero = w == 0
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.clamp(torch.round(w[:, i] / s[:, i]), -qmax, qmax) * s[:, i]
        q[zero[:, i]] = 0
        w[:, i:] -= ((w[:, i] - q) / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_gptq_equals_the_direct_error_feedback_loop(bits):
    x = _correlated_inputs(32)
    torch.manual_seed(3)
    w = torch.randn(6, 32)
    w[0, :8] = 0  # pruned weights must stay pruned
    h = (x.T @ x).double() / len(x)
    s = (w.abs().amax(1, keepdim=True) / qmax_for(bits)).expand_as(w).double()
    got = gptq_round(w, h, s, bits, block_size=8)
    assert torch.allclose(got, _direct(w, h, s, bits), atol=1e-9)
    k = got / s
    assert torch.allclose(k, k.round(), atol=1e-6) and k.abs().max() <= qmax_for(bits)
    assert (got[0, :8] == 0).all()


def test_gptq_reconstructs_a_layer_better_than_nearest_rounding():
    x = _correlated_inputs(64, 512)
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    s = (w.abs().amax(1, keepdim=True) / qmax_for(4)).expand_as(w)
    nearest = torch.clamp(torch.round(w / s), -7, 7) * s
    gptq = gptq_round(w, (x.T @ x).double() / len(x), s, 4).float()
    err = {name: float((x @ (w - v).T).pow(2).mean()) for name, v in (("gptq", gptq), ("nearest", nearest))}
    assert err["gptq"] < 0.8 * err["nearest"], err


@pytest.mark.parametrize("granularity, group_size", [("channel", 0), ("tensor", 0), ("group", 8)])
def test_scale_layout_matches_the_weight_quantizer(granularity, group_size):
    """With an identity Hessian there is no error feedback, so GPTQ is nearest rounding: it must then equal the
    weight quantizer's own fake-quant, which checks where every weight's scale comes from."""
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 6, 3, bias=False)
    wq = WeightQuantizer(conv.weight.shape, 4, granularity, group_size)
    wq.calibrate(conv.weight)
    mat = weight_matrix(conv.weight.detach())
    eye = torch.eye(mat.shape[1], dtype=torch.float64)
    got = from_weight_matrix(gptq_round(mat, eye, weight_scales_matrix(wq, conv.weight), 4).float(), conv.weight)
    assert torch.allclose(got, wq(conv.weight.detach()), atol=1e-6)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])
def test_registered_gptq_rounding_beats_nearest_on_real_models(name):
    model, calib, data = tiny_model_and_calib(name)
    with torch.no_grad():
        ref = model(data)
    errs = {}
    for rounding in ("nearest", "gptq"):
        m, _, _ = tiny_model_and_calib(name)
        report = apply_method(m, QuantConfig(w_bits=4, a_bits=16, weight_rounding=rounding), calib)
        assert report["weight_rounding"] == rounding
        with torch.no_grad():
            errs[rounding] = float((m(data) - ref).pow(2).mean())
    assert errs["gptq"] < errs["nearest"], errs


def test_gptq_after_sparsegpt_keeps_the_masks_exact():
    model, calib, _ = tiny_model_and_calib()
    pruned = apply_method(model, PruneConfig(n=2, m=4, score="sparsegpt"), calib)["layers"]
    apply_method(model, QuantConfig(w_bits=4, a_bits=8, weight_rounding="gptq"), calib)
    layers = quantized_layers(model)
    for name in pruned:
        w = layers[name].weight  # the fake-quantized weight
        from craft_deploy.toolkit.primitives import as_input_groups

        assert (as_input_groups(w).reshape(-1, 4).ne(0).sum(1) <= 2).all(), name


def test_gptq_needs_calibration_data_and_a_known_rounding():
    model, _, _ = tiny_model_and_calib()
    with pytest.raises(CraftError, match="--weight-rounding gptq needs calibration data"):
        apply_method(model, QuantConfig(w_bits=4, a_bits=16, weight_rounding="gptq"), None)
    with pytest.raises(CraftError, match="--weight-rounding must be one of nearest, gptq"):
        QuantConfig(weight_rounding="adaround")
