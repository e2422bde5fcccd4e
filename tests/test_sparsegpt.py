"""SparseGPT: the Cholesky / lazy-batch solver against a direct optimal-brain-surgeon loop, the unfolded conv inputs
against the conv itself, and the registered method on real timm models."""

from __future__ import annotations

import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from conftest import tiny_model_and_calib
from craft_deploy import CraftError
from craft_deploy.compress import PruneConfig
from craft_deploy.compress.prune import PRUNE_SCORES
from craft_deploy.compress.sparsegpt import (
    DAMPENING,
    HessianAccumulator,
    layer_columns,
    sparsegpt_prune,
    weight_matrix,
)
from craft_deploy.toolkit.registry import apply_method


def _direct_obs(w: torch.Tensor, h: torch.Tensor, n=None, m=None, ratio=None, block=8):
    """The dense computation SparseGPT's factorisation stands for: visit columns left to right; for every pruned weight
    apply the OBS update with the inverse Hessian of the columns not yet visited, inverted explicitly each time."""
    w, h = w.double().clone(), h.double().clone()
    h += DAMPENING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    hinv = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i in range(cols):
        if ratio is not None and i % block == 0:
            j = torch.arange(i, min(i + block, cols))
            saliency = w[:, j].pow(2) / torch.stack([hinv[k][0, 0] for k in j.tolist()])[None, :]
            k = int(round(ratio * saliency.numel()))
            flat = torch.zeros(saliency.numel(), dtype=torch.bool)
            flat[saliency.flatten().topk(k, largest=False).indices] = True
            pruned[:, j] = flat.reshape(saliency.shape)
        if n is not None and i % m == 0:
            saliency = w[:, i : i + m].pow(2) / torch.stack([hinv[i + k][0, 0] for k in range(m)])[None, :]
            pruned[:, i : i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
        rows = pruned[:, i]
        w[rows, i:] -= (w[rows, i] / hinv[i][0, 0])[:, None] * hinv[i][0][None, :]
        w[rows, i] = 0.0
    return w, ~pruned


def _correlated_inputs(features: int, samples: int = 256) -> torch.Tensor:
    torch.manual_seed(0)
    mix = torch.randn(features, features) / features**0.5 + torch.eye(features)
    return (torch.randn(samples, features) * torch.linspace(0.2, 3.0, features)) @ mix


@pytest.mark.parametrize("pattern", [dict(n=2, m=4), dict(n=1, m=4), dict(ratio=0.5), dict(ratio=0.7)])
def test_solver_equals_the_direct_obs_computation_on_a_linear(pattern):
    x = _correlated_inputs(32)
    lin = nn.Linear(32, 6, bias=False)
    acc = HessianAccumulator(lin)
    acc(lin, (x,))
    h = acc.hessian()
    assert torch.allclose(h, (x.double().T @ x.double()) / len(x), rtol=1e-9)
    got, keep = sparsegpt_prune(lin.weight.detach(), h, block_size=8, **pattern)
    want, want_keep = _direct_obs(lin.weight.detach(), h, block=8, **pattern)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(got, want, atol=1e-9)
    assert (got[~keep] == 0).all()
    if "n" in pattern:
        assert (keep.view(-1, pattern["m"]).sum(1) == pattern["n"]).all()
    else:
        assert int((~keep).sum()) == sum(round(pattern["ratio"] * 6 * 8) for _ in range(4))


def test_solver_equals_the_direct_obs_computation_on_a_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    x = torch.randn(6, 8, 7, 7) * torch.linspace(0.3, 2.0, 8)[None, :, None, None]
    acc = HessianAccumulator(conv)
    acc(conv, (x,))
    w = weight_matrix(conv.weight.detach())
    got, keep = sparsegpt_prune(w, acc.hessian(), n=2, m=4, block_size=16)
    want, want_keep = _direct_obs(w, acc.hessian(), n=2, m=4, block=16)
    assert torch.equal(keep, want_keep) and torch.allclose(got, want, atol=1e-9)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 5, 3, padding=1, bias=False),
        nn.Conv2d(8, 5, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(8, 5, 1, bias=False),
        Conv2dSame(8, 5, 3, stride=2, bias=False),
    ],
)
def test_unfolded_columns_reproduce_the_conv(conv):
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = conv(x)
        cols = layer_columns(conv, x)  # (kh*kw*C, N*L)
        out = weight_matrix(conv.weight) @ cols  # (O, N*L)
    assert torch.allclose(out.reshape(conv.out_channels, 2, -1).permute(1, 0, 2).reshape(ref.shape), ref, atol=1e-5)


def test_sparsegpt_reconstructs_a_layer_better_than_magnitude():
    x = _correlated_inputs(64, 512)
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    acc = HessianAccumulator(nn.Linear(64, 16))
    acc(nn.Linear(64, 16), (x,))
    sgpt, keep = sparsegpt_prune(w, acc.hessian(), n=2, m=4)
    mag = w * (w.abs().view(-1, 4).argsort(1).argsort(1) >= 2).view_as(w)
    err = {name: float((x @ (w - v.float()).T).pow(2).mean()) for name, v in (("sparsegpt", sgpt), ("magnitude", mag))}
    assert err["sparsegpt"] < 0.7 * err["magnitude"], err


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit", "test_resnet"])
@pytest.mark.parametrize("pattern", [dict(n=2, m=4), dict(n=4, m=8), dict(ratio=0.5)])
def test_registered_sparsegpt_prunes_real_models_exactly(name, pattern):
    model, calib, data = tiny_model_and_calib(name)
    with torch.no_grad():
        ref = model(data)
    mag_model, _, _ = tiny_model_and_calib(name)
    apply_method(mag_model, PruneConfig(score="magnitude", **pattern), calib)
    report = apply_method(model, PruneConfig(score="sparsegpt", **pattern), calib)
    assert report["layers"] and report["steps"] >= 1
    for layer, row in report["layers"].items():
        if "n" in pattern:
            assert row["nm_valid"], layer
        else:
            assert row["achieved"] == pytest.approx(pattern["ratio"], abs=0.02), layer
    with torch.no_grad():
        err = (model(data) - ref).pow(2).mean()
        mag_err = (mag_model(data) - ref).pow(2).mean()
    assert err < mag_err  # on the calibration images themselves, reconstruction beats plain magnitude


def test_sparsegpt_is_registered_and_refuses_what_it_cannot_do():
    assert PRUNE_SCORES["sparsegpt"].updates_weights
    with pytest.raises(CraftError, match="drop --granularity global"):
        PruneConfig(ratio=0.5, score="sparsegpt", granularity="global")
    model, _, _ = tiny_model_and_calib()
    with pytest.raises(CraftError, match="sparsegpt pruning need calibration data"):
        apply_method(model, PruneConfig(n=2, m=4, score="sparsegpt"), None)
    dw = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(CraftError, match="grouped conv"):
        layer_columns(dw, torch.randn(1, 8, 5, 5))


def test_grouped_conv_columns_reproduce_each_group():
    conv = nn.Conv2d(8, 4, 3, padding=1, groups=4, bias=False)  # 2 input channels per group
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = conv(x)
        cols = layer_columns(conv, x, grouped=True)  # (4, 3*3*2, N*L)
        mats = weight_matrix(conv.weight).reshape(4, 1, -1)  # one output channel per group
        out = torch.cat([m @ c for m, c in zip(mats, cols)])  # (O, N*L)
    assert cols.shape == (4, 18, 2 * 36)
    assert torch.allclose(out.reshape(4, 2, -1).permute(1, 0, 2).reshape(ref.shape), ref, atol=1e-5)
