"""Low-rank factorisation (compress --rank-ratio/--rank-energy): activation-aware initialisation, exact ranks,
restore on load, export as two layers."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from craft_deploy import CraftError
from craft_deploy.compress import LowRankConfig, calib_loop, from_flags
from craft_deploy.compress import run as compress
from craft_deploy.compress.lowrank import (
    LowRankConv,
    LowRankLinear,
    channel_rms,
    choose_rank,
    factorise,
    weight_2d,
)
from craft_deploy.config import ExportConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.export import run as export
from craft_deploy.models import load_bundle


def _inputs(bundle_dir, layer: str, n: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A layer of a trained bundle and its real inputs on `n` training images (channels last, rows = samples)."""
    bundle = load_bundle(bundle_dir)
    model, mod = bundle.model.eval(), bundle.model.get_submodule(layer)
    seen = []
    handle = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    train = splits_for_manifest(bundle.manifest).train
    with torch.no_grad():
        for x, _ in DataLoader(calibration_subset(train, n), batch_size=64):
            model(x)
    handle.remove()
    x = torch.cat(seen)
    x = x.transpose(1, -1) if isinstance(mod, nn.Conv2d) else x
    rms = channel_rms(model, {layer: mod}, calib_loop(calibration_subset(train, n)))[layer]
    return mod, x.reshape(-1, x.shape[-1]), rms


@pytest.mark.parametrize("which, layer", [("vit", "blocks.0.mlp.fc2"), ("cnn", "blocks.3.0.conv_pw")])
def test_activation_aware_init_has_lower_output_error_than_plain_svd(which, layer, tiny_bundle, tiny_vit_bundle):
    mod, x, rms = _inputs(tiny_vit_bundle if which == "vit" else tiny_bundle, layer)
    w = weight_2d(mod)
    rank = max(1, min(w.shape) // 4)
    errors = {}
    for name, scale in (("activation-aware", rms), ("plain", None)):
        a, b, r = factorise(w, scale, rank)
        assert r == rank and a.shape == (rank, w.shape[1]) and b.shape == (w.shape[0], rank)
        errors[name] = float((x @ (b @ a).T - x @ w.T).norm() / (x @ w.T).norm())
    assert errors["activation-aware"] < errors["plain"], errors


def test_full_rank_factorisation_is_exact():
    w = torch.randn(24, 16)
    a, b, r = factorise(w, torch.rand(16) + 0.1, 16)
    torch.testing.assert_close(b @ a, w, rtol=1e-4, atol=1e-4)


def test_ranks_reach_their_targets_exactly(tiny_vit_bundle, tmp_path):
    compress(from_flags(rank_ratio=0.25, calib_samples=64), tiny_vit_bundle, tmp_path / "r")
    dense, low = load_bundle(tiny_vit_bundle).model, load_bundle(tmp_path / "r").model
    factored = {n: m for n, m in low.named_modules() if isinstance(m, LowRankLinear)}
    linears = {n for n, m in dense.named_modules() if isinstance(m, nn.Linear)} - {"head"}
    assert set(factored) == linears
    for name, m in factored.items():
        w = dense.get_submodule(name).weight
        assert m.a.out_features == math.ceil(0.25 * min(w.shape)) == m.b.in_features
    cfg = LowRankConfig(rank_energy=0.9)
    w = weight_2d(dense.get_submodule("blocks.0.mlp.fc1"))
    _, _, r = factorise(w, None, None, cfg)
    energy = torch.linalg.svdvals(w.double()).pow(2)
    share = energy.cumsum(0) / energy.sum()
    assert share[r - 1] >= 0.9 > share[r - 2]


def test_ranks_round_up_to_their_multiple_and_stay_within_the_layer(tiny_bundle, tmp_path):
    sv = torch.ones(40)
    assert choose_rank(sv, (40, 240), LowRankConfig(rank_ratio=0.25)) == 10
    assert choose_rank(sv, (40, 240), LowRankConfig(rank_ratio=0.25, rank_multiple=16)) == 16
    assert choose_rank(sv, (12, 100), LowRankConfig(rank_ratio=0.9, rank_multiple=16)) == 12  # capped at min(shape)
    rec = compress(from_flags(rank_ratio=0.25, rank_multiple=8, calib_samples=32, eval_subset=32), tiny_bundle,
                   tmp_path / "r")  # fmt: skip
    model = load_bundle(tmp_path / "r").model
    ranks = [m.a.out_channels for m in model.modules() if isinstance(m, LowRankConv)]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert {n: v["rank"] for n, v in rec["methods"][0]["layers"].items()} == {
        n: m.a.out_channels for n, m in model.named_modules() if isinstance(m, LowRankConv)
    }


def test_bn_recalibration_after_factorisation_re_estimates_the_cnns_batchnorms(tiny_bundle, tmp_path):
    flags = dict(rank_ratio=0.5, calib_samples=64, eval_subset=200)  # here: 15.5% -> 33.5% with re-estimation
    plain = compress(from_flags(**flags), tiny_bundle, tmp_path / "plain")
    rec = compress(from_flags(**flags, bn_recalibrate=True), tiny_bundle, tmp_path / "bn")
    bns = [m for m in load_bundle(tiny_bundle).model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert rec["methods"][0]["bn_recalibrated"] == len(bns) > 0 and "bn_recalibrated" not in plain["methods"][0]
    before = load_bundle(tmp_path / "plain").model.state_dict()
    after = load_bundle(tmp_path / "bn").model.state_dict()
    means = [k for k in before if k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in means)
    assert rec["metrics"]["test_top1_after"] > plain["metrics"]["test_top1_after"] + 5


def test_a_factorised_bundle_round_trips_and_exports_as_two_layers(tiny_bundle, tmp_path):
    rec = compress(from_flags(rank_ratio=0.25, calib_samples=64, eval_subset=64), tiny_bundle, tmp_path / "r")
    report = rec["methods"][0]
    assert report["method"] == "lowrank" and report["params_after"] < report["params_before"]
    a, b = load_bundle(tmp_path / "r").model.eval(), load_bundle(tmp_path / "r").model.eval()
    n = sum(isinstance(m, LowRankConv) for m in a.modules())
    assert n == len(report["layers"]) > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ex = export(ExportConfig(verify_samples=32), tmp_path / "r", tmp_path / "onnx")
    assert ex["verification"]["onnxruntime"]["passed"]
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node)
    dense_convs = sum(isinstance(m, nn.Conv2d) for m in load_bundle(tiny_bundle).model.modules())
    assert convs == dense_convs + n  # one more Conv per factorised 1x1 conv


def test_low_rank_then_w8a8_round_trips_and_exports(tiny_vit_bundle, tmp_path):
    compress(from_flags(rank_ratio=0.5, quant="w8a8", calib_samples=64), tiny_vit_bundle, tmp_path / "rq")
    bundle = load_bundle(tmp_path / "rq")
    assert [e["method"] for e in bundle.manifest["methods"]] == ["lowrank", "quantize"]
    quantized = next(e for e in bundle.manifest["methods"] if e["method"] == "quantize")["state"]["layers"]
    assert "blocks.0.mlp.fc1.a" in quantized and "blocks.0.mlp.fc1.b" in quantized
    assert export(ExportConfig(verify_samples=32), tmp_path / "rq", tmp_path / "onnx")["verification"]


def test_a_rank_that_does_not_pay_keeps_the_layer_dense(tiny_vit_bundle, tmp_path):
    rec = compress(from_flags(rank_ratio=0.9, calib_samples=32, eval_subset=32), tiny_vit_bundle, tmp_path / "r")
    skipped = rec["methods"][0]["skipped"]
    assert "blocks.0.attn.proj" in skipped and "would not be smaller; kept dense" in skipped["blocks.0.attn.proj"]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rank_ratio=0.5, rank_energy=0.9), "exactly one of --rank-ratio"),
        (dict(rank_ratio=1.5), "--rank-ratio must be in \\(0, 1\\)"),
        (dict(rank_energy=0.0), "--rank-energy must be in \\(0, 1\\)"),
        (dict(rank_ratio=0.25, rank_multiple=0), "--rank-multiple must be a positive integer"),
    ],
)
def test_bad_low_rank_options(kw, message):
    with pytest.raises(CraftError, match=message):
        from_flags(**kw)


def test_a_tampered_low_rank_state_is_refused(tiny_vit_bundle, tmp_path):
    import json

    compress(from_flags(rank_ratio=0.25, calib_samples=32, eval_subset=32), tiny_vit_bundle, tmp_path / "r")
    path = tmp_path / "r" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["methods"][0]["state"]["layers"]["blocks.0.mlp.fc1"]["rank"] = 10_000
    path.write_text(json.dumps(manifest))
    with pytest.raises(CraftError, match="lowrank state for 'blocks.0.mlp.fc1' does not fit the model"):
        load_bundle(tmp_path / "r")
