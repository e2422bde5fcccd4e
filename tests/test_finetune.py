import json

import pytest
import torch
from torch import nn

from conftest import TINY
from craft_deploy import CraftError
from craft_deploy.config import FinetuneConfig
from craft_deploy.finetune import OPTIMIZERS, build_method, run
from craft_deploy.models import load_bundle


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_sam_steps_with_the_gradient_at_the_perturbed_point():
    """At the base step SAM's weights are back at w and their gradient is the one taken at w + rho * g / ||g||."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    rho = 0.5
    model = _net().train()
    start = [p.detach().clone() for p in model.parameters()]
    method = build_method(model, FinetuneConfig(optimizer="sam", rho=rho))
    seen = {}

    def spy_step():
        seen["weights"] = [p.detach().clone() for p in model.parameters()]
        seen["grads"] = [p.grad.clone() for p in model.parameters()]

    method.optimizer.step = spy_step
    method.step(x, y, loss_fn)

    ref = _net().train()
    loss_fn(ref(x), y).backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    stats_after_first = (ref[1].running_mean.clone(), ref[1].running_var.clone())
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p.add_(g * rho / norm)
    ref.zero_grad()
    loss_fn(ref(x), y).backward()

    for w0, w in zip(start, seen["weights"]):
        assert torch.allclose(w0, w, atol=1e-7)  # restored before the base step
    for g_sam, p in zip(seen["grads"], ref.parameters()):
        assert torch.allclose(g_sam, p.grad, rtol=1e-4, atol=1e-7)
    assert not all(torch.allclose(a, b) for a, b in zip(seen["grads"], grads))  # not the clean gradient
    bn = model[1]  # the perturbed pass left the running statistics as the first pass set them
    assert torch.allclose(bn.running_mean, stats_after_first[0]) and torch.allclose(
        bn.running_var, stats_after_first[1]
    )
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1


def test_the_optimizer_family_is_registered():
    assert {"adam", "sgd", "sam", "asam", "cram"} <= set(OPTIMIZERS)


def test_unknown_optimizer_lists_registered_ones_and_writes_nothing(tmp_path):
    with pytest.raises(CraftError, match="unknown optimizer .lion.; registered: adam, asam, cram, sam, sgd"):
        run(FinetuneConfig(**{**TINY, "optimizer": "lion"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_finetune_writes_a_bundle_and_a_complete_record(tiny_bundle):
    rec = json.loads((tiny_bundle / "finetune.json").read_text())
    assert rec["schema"] == "craft-deploy/record/v1" and rec["stage"] == "finetune"
    assert len(rec["history"]) == TINY["epochs"]
    row = rec["history"][0]
    assert row["train_seconds"] > 0 and row["images_per_second"] > 0 and row["train_loss"] > 0
    assert 0 <= rec["metrics"]["test_top1"] <= 100 and rec["environment"]["libraries"]["torch"]
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest["stages"][0]["stage"] == "finetune" and bundle.num_classes == 10
    assert not list(tiny_bundle.parent.glob(".*partial"))  # no staging directory left behind


def test_out_that_is_not_empty_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CraftError, match="not empty"):
        run(FinetuneConfig(**TINY), out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_default_model_learns_fashion_mnist():
    """The bundled pretrained default, one short epoch: far above chance (10%) on held-out test images."""
    from craft_deploy.data import load_splits
    from craft_deploy.evaluate import evaluate
    from craft_deploy.finetune.trainer import train
    from craft_deploy.models import load_model

    cfg = FinetuneConfig(epochs=1, train_subset=1500, eval_subset=400, threads=2)
    try:
        splits = load_splits("fashion-mnist", 64, [0.5] * 3, [0.5] * 3, train_subset=1500, eval_subset=400)
    except CraftError as e:
        pytest.skip(str(e))
    model = load_model(num_classes=10)
    train(model, splits, cfg)
    assert evaluate(model, splits.test)["top1"] > 70.0


def _spy(method, model):
    """Record weights and gradients at the moment the base optimizer steps."""
    seen = {}
    original = method.optimizer.step

    def spy_step():
        seen["weights"] = [p.detach().clone() for p in model.parameters()]
        seen["grads"] = [p.grad.clone() for p in model.parameters()]
        original()

    method.optimizer.step = spy_step
    return seen


def _grads_at(point_fn, x, y):
    """Gradient of a fresh copy of _net() after moving its weights with point_fn(params, clean_grads)."""
    ref = _net().train()
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(ref(x), y).backward()
    params = list(ref.parameters())
    clean = [p.grad.clone() for p in params]
    with torch.no_grad():
        point_fn(params, clean)
    ref.zero_grad()
    ref[1].momentum = 0.0
    loss_fn(ref(x), y).backward()
    return [p.grad for p in params], clean


def test_asam_scales_the_neighbourhood_by_weight_magnitude():
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = _net().train()
    start = [p.detach().clone() for p in model.parameters()]
    method = build_method(model, FinetuneConfig(optimizer="asam"))
    assert method.rho == 0.5  # ASAM's larger default radius
    seen = _spy(method, model)
    method.step(x, y, nn.CrossEntropyLoss())

    def asam_point(params, g):
        t = [(p.abs() + 0.01) * gi for p, gi in zip(params, g)]
        norm = torch.linalg.vector_norm(torch.stack([ti.norm() for ti in t]))
        for p, ti in zip(params, t):
            p.add_((p.abs() + 0.01) * ti * 0.5 / norm)

    expected, _ = _grads_at(asam_point, x, y)
    for w0, w in zip(start, seen["weights"]):
        assert torch.allclose(w0, w, atol=1e-7)
    for g, e in zip(seen["grads"], expected):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)


def test_efficient_sam_computes_a_fresh_direction_every_k_steps():
    """--sam-every 3: 2 passes on steps 1 and 4, 1 pass (at w + the stored direction) on the steps between."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = _net().train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    method = build_method(model, FinetuneConfig(optimizer="sam", sam_every=3))
    passes = []
    for _ in range(5):
        before = len(calls)
        method.step(x, y, nn.CrossEntropyLoss())
        passes.append(len(calls) - before)
    assert passes == [2, 1, 1, 2, 1]
    # a stale step: the gradient comes from w + e_stored and w is restored before the base step
    seen = _spy(method, model)
    start = [p.detach().clone() for p in model.parameters()]
    stored = {id(p): e.clone() for p, e in method.stale}  # keyed by parameter: groups order them differently
    method.step(x, y, nn.CrossEntropyLoss())
    for w0, w in zip(start, seen["weights"]):
        assert torch.allclose(w0, w, atol=1e-7)
    probe = _net().train()
    probe.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p, w0, own in zip(probe.parameters(), start, model.parameters()):
            p.copy_(w0 + stored[id(own)])
    nn.CrossEntropyLoss()(probe(x), y).backward()
    for g, p in zip(seen["grads"], probe.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("plus", [False, True])
def test_cram_takes_the_gradient_at_the_compressed_ascent_point(plus):
    from craft_deploy.finetune.optimizers import CrAM

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = _net().train()
    model.pretrained_cfg = {"classifier": "3", "first_conv": ""}  # layer 0 is compressed, the head is not
    start = [p.detach().clone() for p in model.parameters()]
    method = build_method(model, FinetuneConfig(optimizer="cram", cram_sparsities=(0.5,), cram_plus=plus))
    assert isinstance(method, CrAM) and len(method.layers) == 1
    seen = _spy(method, model)
    method.step(x, y, nn.CrossEntropyLoss())

    def cram_point(params, g):
        for p, gi in zip(params, g):
            p.add_(gi, alpha=0.05)
        w = params[0]
        k = int(round(0.5 * w.numel()))
        w.mul_(w.abs() > w.abs().flatten().kthvalue(k).values)

    expected, clean = _grads_at(cram_point, x, y)
    for w0, w in zip(start, seen["weights"]):
        assert torch.allclose(w0, w, atol=1e-7)  # dense weights restored; compression only shaped the gradient
    for g, e, c in zip(seen["grads"], expected, clean):
        assert torch.allclose(g, e + c if plus else e, rtol=1e-4, atol=1e-6)


def test_cram_nm_compresses_along_the_input_dimension():
    model = _net()
    model.pretrained_cfg = {"classifier": "3", "first_conv": ""}
    method = build_method(model, FinetuneConfig(optimizer="cram", cram_nm="2:4"))
    with torch.no_grad():
        method.compress()
    w = model[0].weight  # 8 x 6: 6 inputs are not a multiple of 4, so this layer stays dense
    assert torch.count_nonzero(w) == w.numel()


def test_sgd_base():
    model = _net()
    assert isinstance(build_method(model, FinetuneConfig(optimizer="sgd")).optimizer, torch.optim.SGD)
    assert isinstance(build_method(model, FinetuneConfig(optimizer="sam", base="sgd")).optimizer, torch.optim.SGD)
    assert isinstance(build_method(model, FinetuneConfig(optimizer="sam")).optimizer, torch.optim.AdamW)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(base="lion"), "--base must be adam or sgd"),
        (dict(sam_every=0), "--sam-every must be >= 1"),
        (dict(cram_sparsities=(1.2,)), "--cram-sparsities"),
        (dict(cram_nm="0.5"), "--cram-nm must be an N:M"),
    ],
)
def test_optimizer_options_are_validated(kw, message):
    with pytest.raises(CraftError, match=message):
        FinetuneConfig(**kw)


@pytest.mark.parametrize("optimizer", ["adam", "sam", "cram"])
def test_clip_grad_bounds_the_norm_the_base_step_sees(optimizer):
    x, y = torch.randn(16, 6) * 50, torch.randint(0, 3, (16,))
    model = _net().train()
    model.pretrained_cfg = {"classifier": "3", "first_conv": ""}
    method = build_method(model, FinetuneConfig(optimizer=optimizer, clip_grad=0.01))
    seen = _spy(method, model)
    method.step(x, y, nn.CrossEntropyLoss())
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen["grads"]]))
    assert norm <= 0.01 * (1 + 1e-4)
    with pytest.raises(CraftError, match="--clip-grad must be a positive"):
        FinetuneConfig(clip_grad=0.0)


def test_parameter_groups_honour_the_models_no_weight_decay():
    from craft_deploy.finetune.optimizers import param_groups
    from craft_deploy.models import load_model

    vit = load_model("test_vit", num_classes=10, pretrained=False, img_size=32)
    assert {"pos_embed", "cls_token"} <= set(vit.no_weight_decay())
    decay, no_decay = param_groups(vit, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in vit.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "pos_embed" not in decayed and "cls_token" not in decayed
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_embed", "cls_token", "blocks.0.norm1.weight"}
    assert "blocks.0.attn.qkv.weight" in decayed
