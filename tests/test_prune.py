"""Pruning: every score x pattern exact, Wanda's statistics, granularities, BN re-calibration, bad input."""

import pytest
import torch
from torch import nn

from conftest import tiny_model_and_calib
from craft_deploy import CraftError
from craft_deploy.compress import PruneConfig
from craft_deploy.compress.prune import _input_feature_norms, prune, recalibrate_batchnorm
from craft_deploy.toolkit.primitives import as_input_groups, row_mask

PATTERNS = [dict(n=2, m=4), dict(n=4, m=8), dict(n=16, m=32), dict(n=32, m=64), dict(ratio=0.3), dict(ratio=0.7)]


def _setup(name="test_efficientnet"):
    model, calib, _ = tiny_model_and_calib(name)
    return model, calib


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p['n']}:{p['m']}" if "n" in p else f"r{p['ratio']}")
@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])
def test_every_score_and_pattern_is_exact(name, pattern, score):
    model, calib = _setup(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(model, PruneConfig(score=score, **pattern), calib)
    assert report["layers"], report["skipped"]
    for layer, info in report["layers"].items():
        w = model.get_submodule(layer).weight
        if "n" in pattern:
            m, n = pattern["m"], pattern["n"]
            assert ((as_input_groups(w) == 0).reshape(-1, m).sum(1) >= m - n).all(), layer
        else:
            assert abs(info["achieved"] - pattern["ratio"]) < 0.01, (layer, info)
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in report["layers"]:
            assert torch.equal(value, before[key]), key  # unpruned layers (and BN stats) untouched
    for layer in report["skipped"]:
        assert report["skipped"][layer]


def test_wanda_norms_are_input_feature_l2_norms():
    lin, conv = nn.Linear(5, 3), nn.Conv2d(4, 6, 3)
    model = nn.ModuleDict({"lin": lin, "conv": conv})
    xl, xc = torch.randn(7, 2, 5), torch.randn(3, 4, 8, 8)

    def calib(_):
        lin(xl[:4]), lin(xl[4:]), conv(xc)

    norms = _input_feature_norms(model, {"lin": lin, "conv": conv}, calib)
    assert torch.allclose(norms["lin"], xl.reshape(-1, 5).norm(dim=0))
    assert torch.allclose(norms["conv"], xc.transpose(0, 1).reshape(4, -1).norm(dim=1))


def test_wanda_prefers_weights_on_loud_inputs():
    """Same |W| everywhere: Wanda must prune the columns whose inputs are small, magnitude cannot tell."""
    lin = nn.Linear(4, 2, bias=False)
    head = nn.Linear(2, 2)
    model = nn.Sequential(lin, head)
    model.pretrained_cfg = {"classifier": "1", "first_conv": ""}
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]))
    x = torch.tensor([[10.0, 0.1, 10.0, 0.1]]).repeat(8, 1)
    prune(model, PruneConfig(n=2, m=4, score="wanda"), lambda m: m(x))
    assert (lin.weight[:, [1, 3]] == 0).all() and (lin.weight[:, [0, 2]] != 0).all()


def test_sequential_wanda_sees_the_pruned_upstream_blocks():
    model, calib = _setup("test_vit")
    seq = prune(model, PruneConfig(ratio=0.5, score="wanda", sequential=True), calib)
    model2, calib2 = _setup("test_vit")
    one = prune(model2, PruneConfig(ratio=0.5, score="wanda", sequential=False), calib2)
    assert seq["steps"] > one["steps"] == 1
    late = [n for n in seq["layers"] if n.startswith("blocks.1")]
    assert late and any(not torch.equal(model.get_submodule(n).weight, model2.get_submodule(n).weight) for n in late)
    first = [n for n in seq["layers"] if n.startswith("blocks.0")]
    assert all(torch.equal(model.get_submodule(n).weight, model2.get_submodule(n).weight) for n in first)


def test_row_granularity_prunes_each_output_row_equally():
    model, calib = _setup()
    report = prune(model, PruneConfig(ratio=0.5, granularity="row"), calib)
    for layer in report["layers"]:
        w = model.get_submodule(layer).weight.flatten(1)
        per_row = (w == 0).float().mean(1)
        assert torch.allclose(per_row, torch.full_like(per_row, round(0.5 * w.shape[1]) / w.shape[1]))


def test_global_granularity_hits_the_overall_ratio():
    model, calib = _setup()
    report = prune(model, PruneConfig(ratio=0.6, granularity="global"), calib)
    total = sum(model.get_submodule(n).weight.numel() for n in report["layers"])
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in report["layers"])
    assert abs(zeros / total - 0.6) < 0.005
    per_layer = [info["achieved"] for info in report["layers"].values()]
    assert max(per_layer) - min(per_layer) > 0.05  # global: layers end up at different sparsities


def test_row_mask():
    keep = row_mask(torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.1, 0.4, 0.3, 0.2]]), 0.5)
    assert keep.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_bn_recalibration_matches_the_calibration_statistics():
    model, calib = _setup()
    prune(model, PruneConfig(n=2, m=4, bn_recalibrate=True), calib)
    bn = model.bn1
    seen = []
    h = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    calib(model)
    h.remove()
    x = torch.cat(seen)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and not bn.training


def test_recalibrate_batchnorm_counts_layers():
    model, calib = _setup()
    assert recalibrate_batchnorm(model, calib) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("cfg", [PruneConfig(ratio=0.5, score="wanda"), PruneConfig(n=2, m=4, bn_recalibrate=True)])
def test_data_hungry_options_need_calibration(cfg):
    model, _ = _setup()
    with pytest.raises(CraftError, match="need calibration data: give --calib-samples"):
        prune(model, cfg, None)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ratio=0.5, score="snip"), "--prune-method 'snip'"),
        (dict(ratio=0.5, granularity="block"), "--granularity 'block'"),
    ],
)
def test_unknown_options_are_named(kw, message):
    with pytest.raises(CraftError, match=message):
        PruneConfig(**kw)


@pytest.mark.gpu
def test_our_2_4_mask_is_accepted_by_semi_structured_sparse_kernels():
    """A Linear pruned 2:4 by craft-deploy converts to torch's semi-structured sparse format and computes the same."""
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    lin = nn.Linear(1024, 512, bias=False).half().cuda().eval()
    model = nn.Sequential(lin, nn.Linear(512, 2))
    model.pretrained_cfg = {"classifier": "1", "first_conv": ""}
    prune(model, PruneConfig(n=2, m=4), None)
    x = torch.randn(128, 1024, dtype=torch.half, device="cuda")
    dense = lin(x)
    lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight))
    sparse = lin(x)
    assert torch.allclose(dense, sparse, rtol=1e-2, atol=1e-2)
