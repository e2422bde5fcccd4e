"""Recovery fine-tuning of compressed bundles: exact masks, QAT through fake-quant, distillation, round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig, FinetuneConfig
from craft_deploy.export import run as export
from craft_deploy.finetune import run as finetune
from craft_deploy.finetune.recovery import DistillationLoss, MaskKeeper, prunable_weight
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.primitives import as_input_groups

RECOVER = dict(epochs=1, batch_size=32, threads=2, warmup_steps=5, calib_samples=64)


def _zeros(bundle_dir) -> dict[str, torch.Tensor]:
    bundle = load_bundle(bundle_dir)
    layers = next(e for e in bundle.manifest["methods"] if e["method"] == "prune")["state"]["layers"]
    return {name: prunable_weight(bundle.model.get_submodule(name)) == 0 for name in layers}


@pytest.mark.parametrize(
    "flags",
    [
        dict(sparsity="2:4"),
        dict(sparsity="4:8", quant="w8a8"),
        dict(sparsity="1:4", quant="w4a16", prune_method="sparsegpt"),
        dict(sparsity="0.6"),
    ],
)
def test_recovery_keeps_every_pruning_mask_exact(flags, tiny_bundle, tmp_path):
    compress(from_flags(calib_samples=64, **flags), tiny_bundle, tmp_path / "c")
    finetune(FinetuneConfig(init=str(tmp_path / "c"), optimizer="sam", **RECOVER), tmp_path / "r")
    before, after = _zeros(tmp_path / "c"), _zeros(tmp_path / "r")
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name  # the same zeros, no more, no fewer
    w = prunable_weight(load_bundle(tmp_path / "r").model.get_submodule(next(iter(after))))
    if ":" in flags["sparsity"]:
        n, m = (int(v) for v in flags["sparsity"].split(":"))
        assert ((as_input_groups(w) != 0).reshape(-1, m).sum(1) <= n).all()
    rec = json.loads((tmp_path / "r" / "finetune.json").read_text())
    assert rec["recovery"]["pruned_layers"] == len(before) and rec["teacher"] == str(tiny_bundle.resolve())


def test_recovery_trains_the_weights_and_keeps_quantizers_and_scales(tiny_bundle, tmp_path):
    compress(from_flags(sparsity="2:4", quant="w8a8", calib_samples=64), tiny_bundle, tmp_path / "c")
    finetune(FinetuneConfig(init=str(tmp_path / "c"), kd_alpha=0.0, **RECOVER), tmp_path / "r")
    c, r = load_bundle(tmp_path / "c"), load_bundle(tmp_path / "r")
    assert c.manifest["methods"] == r.manifest["methods"]
    sc, sr = c.model.state_dict(), r.model.state_dict()
    assert sc.keys() == sr.keys()
    acts = [k for k in sc if k.endswith("input_quantizer.scale")]
    assert acts and all(torch.equal(sc[k], sr[k]) for k in acts)  # activation scales frozen
    originals = [k for k in sc if k.endswith("parametrizations.weight.original")]
    assert any(not torch.equal(sc[k], sr[k]) for k in originals)  # the weights did train
    assert r.manifest["stages"][-1]["stage"] == "finetune" and "teacher" not in r.manifest["stages"][-1]


def test_qat_forward_at_step_0_is_the_ptq_forward(tiny_w8a8):
    """The model recovery starts from is the compressed bundle itself: same logits in eval mode, and gradients reach
    the weights through the fake-quant ops (straight-through)."""
    ptq = load_bundle(tiny_w8a8).model
    qat = load_bundle(tiny_w8a8).model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ptq(x), qat(x))
    qat.train()
    qat(x).sum().backward()
    grads = [p.grad for n, p in qat.named_parameters() if n.endswith("parametrizations.weight.original")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads[:3])


def test_mask_keeper_zeroes_gradients_and_updates_of_pruned_weights(tiny_bundle, tmp_path):
    compress(from_flags(sparsity="2:4", calib_samples=64), tiny_bundle, tmp_path / "c")
    bundle = load_bundle(tmp_path / "c")
    keeper = MaskKeeper(bundle.model, bundle.manifest)
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=0.1, weight_decay=0.5)
    bundle.model.train()
    bundle.model(torch.randn(8, 3, 32, 32)).pow(2).sum().backward()
    for w, mask in keeper.masks.values():
        assert (w.grad[mask == 0] == 0).all()
    opt.step()
    keeper.apply()
    for w, mask in keeper.masks.values():
        assert (w[mask == 0] == 0).all() and (w[mask == 1] != 0).any()


def test_distillation_loss_against_a_hand_computation():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 1, 2])
    t, alpha = 3.0, 0.7
    p = torch.softmax(teacher / t, 1)
    q = torch.softmax(logits / t, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = F.cross_entropy(logits, labels) + alpha * t * t * kl
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), t, alpha)
    assert torch.allclose(loss(logits, DistillationLoss.pack(labels, teacher)), expected, atol=1e-6)
    assert loss.kd(teacher, teacher).abs() < 1e-6


def test_a_recovered_bundle_round_trips_and_exports(tiny_bundle, tmp_path):
    compress(
        from_flags(sparsity="2:4", quant="w8a8", calib_samples=64, bn_recalibrate=True), tiny_bundle, tmp_path / "c"
    )
    finetune(FinetuneConfig(init=str(tmp_path / "c"), **RECOVER), tmp_path / "r")
    rec = export(ExportConfig(verify_samples=32), tmp_path / "r", tmp_path / "onnx")
    check = rec["verification"]["onnxruntime"]
    assert check["passed"] and check["weight_zeros_onnx"] >= check["weight_zeros_bundle"] > 0


def test_recovery_refuses_what_it_cannot_do(tiny_bundle, tmp_path):
    with pytest.raises(CraftError, match="cannot start from --checkpoint"):
        FinetuneConfig(init="a", checkpoint="b")
    with pytest.raises(CraftError, match="--kd-alpha >= 0"):
        FinetuneConfig(kd_alpha=-1.0)
    # a bundle with no recorded source needs --teacher (or --kd-alpha 0)
    compress(from_flags(sparsity="2:4", calib_samples=64), tiny_bundle, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["stages"][-1].pop("source")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CraftError, match="pass --teacher"):
        finetune(FinetuneConfig(init=str(tmp_path / "c"), **RECOVER), tmp_path / "r")
    other = dict(TINY, model="test_resnet", epochs=1)
    finetune(FinetuneConfig(**{**other, "data": "digits", "img_size": 48}), tmp_path / "other")
    with pytest.raises(CraftError, match="input_size"):
        finetune(FinetuneConfig(init=str(tmp_path / "c"), teacher=str(tmp_path / "other"), **RECOVER), tmp_path / "r")


def test_learn_scales_trains_the_activation_scales_and_the_bundle_still_loads(tiny_w8a8, tmp_path):
    from craft_deploy.toolkit.qmodules import ActQuantizer

    frozen = load_bundle(tiny_w8a8).model
    learning = load_bundle(tiny_w8a8).model
    q = next(m for m in learning.modules() if isinstance(m, ActQuantizer))
    q.learn_scale()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(frozen(x), learning(x))  # the learnable op computes the same fake-quant
    finetune(FinetuneConfig(init=str(tiny_w8a8), learn_scales=True, kd_alpha=0.0, **RECOVER), tmp_path / "r")
    before, after = load_bundle(tiny_w8a8).model.state_dict(), load_bundle(tmp_path / "r").model.state_dict()
    scales = [k for k in before if k.endswith("input_quantizer.scale")]
    assert any(not torch.equal(before[k], after[k]) for k in scales) and all((after[k] > 0).all() for k in scales)
    with pytest.raises(CraftError, match="use it with --init"):
        FinetuneConfig(learn_scales=True)


def test_plain_finetune_distils_from_a_teacher(tiny_bundle, tmp_path):
    rec = finetune(FinetuneConfig(**{**TINY, "teacher": str(tiny_bundle), "kd_temperature": 2.0}), tmp_path / "s")
    assert rec["teacher"] == str(tiny_bundle) and rec["metrics"]["test_top1"] > 50
    assert load_bundle(tmp_path / "s").manifest["stages"][-1]["teacher"] == str(tiny_bundle)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_recovery_on_a_gpu_keeps_masks_exact(amp, tiny_bundle, tmp_path):
    """The masks are made on the CPU bundle and follow the model to CUDA (found on an H100: they did not)."""
    compress(from_flags(sparsity="2:4", quant="w8a8", calib_samples=64), tiny_bundle, tmp_path / "c")
    rec = finetune(FinetuneConfig(init=str(tmp_path / "c"), device="cuda", amp=amp, **RECOVER), tmp_path / "r")
    assert rec["device"].startswith("cuda")
    before, after = _zeros(tmp_path / "c"), _zeros(tmp_path / "r")
    assert before and all(torch.equal(before[n], after[n]) for n in before)
