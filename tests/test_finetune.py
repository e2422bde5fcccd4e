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


def test_adam_is_registered_with_sam():
    assert {"adam", "sam"} <= set(OPTIMIZERS)


def test_unknown_optimizer_lists_registered_ones_and_writes_nothing(tmp_path):
    with pytest.raises(CraftError, match="unknown optimizer 'lion'; registered: adam, sam"):
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
