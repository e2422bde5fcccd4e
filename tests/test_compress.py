import pytest
import torch
from torch import nn

from conftest import tiny_model_and_calib
from craft_deploy import CraftError
from craft_deploy.compress import METHODS, LowRankConfig, PruneConfig, QuantConfig
from craft_deploy.models import load_model
from craft_deploy.toolkit.primitives import as_input_groups, from_input_groups, nm_mask, unstructured_mask
from craft_deploy.toolkit.qmodules import ActQuantizer
from craft_deploy.toolkit.qparams import fake_quant, qmax_for, sqnr_db
from craft_deploy.toolkit.registry import apply_method

NM = [(2, 4), (4, 8), (16, 32), (1, 4)]


@pytest.mark.parametrize("n, m", NM)
def test_nm_mask_keeps_exactly_n_of_m_largest(n, m):
    score = torch.rand(16, 4 * m)
    keep = nm_mask(score, n, m)
    assert (keep.view(-1, m).sum(1) == n).all()
    kept_min = torch.where(keep, score, torch.inf).view(-1, m).min(1).values
    dropped_max = torch.where(keep, -torch.inf, score).view(-1, m).max(1).values
    assert (kept_min >= dropped_max).all()


def test_unstructured_mask_prunes_exactly_the_ratio():
    score = torch.rand(37, 11)
    keep = unstructured_mask(score, 0.3)
    assert int((~keep).sum()) == round(0.3 * score.numel())
    assert score[~keep].max() <= score[keep].min()


def test_conv_groups_run_along_input_channels():
    w = torch.randn(8, 16, 3, 3)
    rows = as_input_groups(w)
    assert rows.shape == (8 * 9, 16)
    assert torch.equal(rows[0], w[0, :, 0, 0])
    assert torch.equal(from_input_groups(rows, w), w)


def test_fake_quant_matches_integer_reference():
    """fake_quant == dequant(int grid) exactly, and the torch op used in modules agrees with it."""
    torch.manual_seed(0)
    x = torch.randn(4, 64) * 3
    scale = torch.rand(4) * 0.05 + 0.01
    for bits in (8, 6, 4):
        ref_int = torch.clamp(torch.round(x / scale[:, None]), -qmax_for(bits) - 1, qmax_for(bits)).to(torch.int32)
        assert torch.equal(fake_quant(x, scale, bits, axis=0), ref_int.float() * scale[:, None])
    op = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(4, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(op, fake_quant(x, scale, 8, axis=0))


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_act_quantizer_uses_the_narrow_grid(bits):
    q = ActQuantizer(bits)
    x = torch.linspace(-5, 5, 1001)
    q.set_range(-x[400:600].abs().max(), x[400:600].abs().max())  # the middle: the ends must clip
    assert torch.allclose(q.scale, x[400:600].abs().max() / qmax_for(bits))
    y = q(x)
    assert torch.equal(y, fake_quant(x, q.scale, bits))
    assert len(torch.unique(y)) <= 2**bits


# One small config per registered method; a method registered without one fails test_every_method_has_an_example.
METHOD_EXAMPLES = {"lowrank": LowRankConfig(rank_ratio=0.25), "prune": PruneConfig(n=2, m=4), "quantize": QuantConfig()}


def test_every_method_has_an_example():
    assert set(METHOD_EXAMPLES) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_changes_the_model_and_reports(name):
    model, calib, data = tiny_model_and_calib()
    cfg = METHOD_EXAMPLES[name]
    with torch.no_grad():
        before = model(data)
    report = apply_method(model, cfg, calib)
    with torch.no_grad():
        after = model(data)
    assert report["layers"] and not torch.equal(before, after)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit", "test_resnet"])
@pytest.mark.parametrize("n, m", NM)
def test_nm_pruning_is_exact_and_leaves_other_layers_alone(name, n, m):
    model, _, _ = tiny_model_and_calib(name)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_method(model, PruneConfig(n=n, m=m), None)
    pruned = set(report["layers"])
    assert pruned
    for layer in pruned:
        rows = as_input_groups(model.get_submodule(layer).weight)
        assert ((rows == 0).view(-1, m).sum(1) >= m - n).all(), layer
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in pruned:
            assert torch.equal(value, original[key]), key
    head = model.pretrained_cfg["classifier"]
    assert head not in pruned and head in report["skipped"]
    for layer, reason in report["skipped"].items():
        assert reason, layer


def test_layers_that_cannot_hold_the_pattern_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(9, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5))
    model.pretrained_cfg = {"classifier": "4", "first_conv": ""}
    report = apply_method(model, PruneConfig(n=2, m=3), None)
    assert list(report["layers"]) == ["0"]  # 9 inputs hold 2:3
    assert "input dim 10 is not a multiple of M=3" in report["skipped"]["2"]
    assert report["skipped"]["4"] == "classifier head"
    assert torch.count_nonzero(model[2].weight) == model[2].weight.numel()
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5))
    model.pretrained_cfg = {"classifier": "2", "first_conv": ""}
    with pytest.raises(CraftError, match="no layer could be pruned"):
        apply_method(model, PruneConfig(n=2, m=3), None)


def test_unstructured_pruning_hits_the_target_per_layer():
    model, _, _ = tiny_model_and_calib()
    report = apply_method(model, PruneConfig(ratio=0.6), None)
    for info in report["layers"].values():
        assert abs(info["achieved"] - 0.6) < 0.01


@pytest.mark.parametrize(
    "kw, message",
    [({"n": 4, "m": 2}, "0 < N < M"), ({"ratio": 1.0}, r"in \(0, 1\)"), ({"ratio": 0.5, "n": 2, "m": 4}, "not both")],
)
def test_prune_config_validates(kw, message):
    with pytest.raises(CraftError, match=message):
        PruneConfig(**kw)


def test_w8a8_layer_outputs_keep_sqnr_above_30db_on_real_data():
    """Each quantized conv of the pretrained default, on real Fashion-MNIST images, stays above 30 dB."""
    from craft_deploy.data import load_splits

    try:
        splits = load_splits("fashion-mnist", 64, [0.5] * 3, [0.5] * 3, train_subset=64)
    except CraftError as e:
        pytest.skip(str(e))
    images = torch.stack([splits.train[i][0] for i in range(64)])
    model = load_model("tf_efficientnet_lite0", num_classes=10).eval()
    ref_model = load_model("tf_efficientnet_lite0", num_classes=10).eval()
    ref_model.load_state_dict(model.state_dict())

    def calib(m):
        with torch.no_grad():
            m(images[:32])

    report = apply_method(model, QuantConfig(w_bits=8, a_bits=8), calib)
    outs, refs = {}, {}
    for store, m in ((outs, model), (refs, ref_model)):
        for name in report["layers"]:
            m.get_submodule(name).register_forward_hook(lambda mod, i, o, n=name, s=store: s.__setitem__(n, o))
    ins = {}
    for name in report["layers"]:
        ref_model.get_submodule(name).register_forward_pre_hook(lambda mod, a, n=name: ins.__setitem__(n, a[0]))
    with torch.no_grad():
        ref_model(images[32:])
        # each layer alone: the float input of the reference through the quantized layer
        worst = min(sqnr_db(refs[n], model.get_submodule(n)(ins[n])) for n in report["layers"])
    assert worst > 30.0, worst


def test_quantization_needs_calibration_for_activations():
    model, _, _ = tiny_model_and_calib()
    with pytest.raises(CraftError, match="needs calibration data"):
        apply_method(model, QuantConfig(w_bits=8, a_bits=8), None)
    model, _, _ = tiny_model_and_calib()
    apply_method(model, QuantConfig(w_bits=4, a_bits=16), None)  # weight-only: no data needed
