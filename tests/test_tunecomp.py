"""TuneComp (finetune --method tunecomp): the dense-to-student schedule, the dense branch gone after T, exact ranks
and factor sparsity, and a bundle that round-trips, exports and recovers like any compressed one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY
from craft_deploy import CraftError
from craft_deploy.compress import LowRankConfig, calib_loop
from craft_deploy.compress.lowrank import LowRankConv
from craft_deploy.config import ExportConfig, FinetuneConfig
from craft_deploy.data import calibration_subset, load_splits
from craft_deploy.export import run as export
from craft_deploy.finetune import run as finetune
from craft_deploy.finetune.tunecomp import Schedule, TuneComp, TuneCompLayer
from craft_deploy.models import load_bundle

TUNECOMP = {**TINY, "method": "tunecomp", "rank_ratio": 0.5, "prune_ratio": 0.5, "calib_samples": 64}


def test_the_schedule_moves_from_dense_to_student_and_ramps_pruning():
    s = Schedule(transition_steps=100, prune_ratio=0.6, reg_weight=1.0)
    expected = {0: 1.0, 25: 1 - math.sin(math.pi / 8), 50: 1 - math.sin(math.pi / 4), 100: 0.0, 150: 0.0}
    for step, alpha in expected.items():
        s.step.fill_(step)
        assert s.alpha() == pytest.approx(alpha, abs=1e-12)
    s.step.fill_(50)
    assert s.sparsity() == pytest.approx(0.6 * (1 - 0.5**3))
    s.step.fill_(100)
    assert s.sparsity() == pytest.approx(0.6)


def test_the_linear_pruning_schedule_ramps_evenly_to_the_same_target():
    s = Schedule(transition_steps=100, prune_ratio=0.6, reg_weight=1.0, prune_schedule="linear")
    for step, sparsity in {0: 0.0, 25: 0.15, 50: 0.3, 100: 0.6, 150: 0.6}.items():
        s.step.fill_(step)
        assert s.sparsity() == pytest.approx(sparsity)


@pytest.fixture(scope="module")
def pretrained_and_calib(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    splits = load_splits("digits", 32, m["mean"], m["std"], None, None, 64, 0)
    return bundle.model.eval(), splits, calib_loop(calibration_subset(splits.train, 64))


def test_at_step_0_the_model_is_the_pretrained_one_and_after_t_only_the_students_run(pretrained_and_calib):
    model, splits, calib = pretrained_and_calib
    x = torch.stack([splits.test[i][0] for i in range(8)])
    with torch.no_grad():
        dense = model(x)
    tc = TuneComp(model, LowRankConfig(rank_ratio=0.25), calib, total_steps=10, transition=0.5, prune_ratio=0.0,
                  reg_weight=1.0)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, TuneCompLayer)]
    assert layers and len(layers) == len(tc.ranks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense)  # a_0 = 1: the students do not contribute yet
        for _ in range(5):
            tc.after_step()
        assert tc.eligible() and tc.schedule.alpha() == 0.0
        calls = []
        hooks = [layer.dense.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
        students = model(x)
        for h in hooks:
            h.remove()
    assert not calls  # the dense branches no longer run
    entries, report = tc.finish()
    assert not any(isinstance(m, TuneCompLayer) for m in model.modules()) and not hasattr(model, tc.SCHEDULE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), students)
    assert [e["method"] for e in entries] == ["lowrank"] and report["params_factors"] < report["params_dense"]


@pytest.fixture(scope="module")
def tunecomp_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tunecomp") / "tc"
    finetune(FinetuneConfig(**TUNECOMP), out)
    return out


def test_a_tunecomp_run_reaches_its_ranks_and_factor_sparsity_exactly(tunecomp_bundle, tiny_bundle):
    rec = json.loads((tunecomp_bundle / "finetune.json").read_text())
    bundle = load_bundle(tunecomp_bundle)
    assert [e["method"] for e in bundle.manifest["methods"]] == ["lowrank", "prune"]
    dense = load_bundle(tiny_bundle).model
    factored = {n: m for n, m in bundle.model.named_modules() if isinstance(m, LowRankConv)}
    assert set(factored) == set(rec["tunecomp"]["layers"]) and factored
    for name, m in factored.items():
        w = dense.get_submodule(name).weight
        assert m.a.out_channels == math.ceil(0.5 * min(w.shape[0], w.shape[1]))
        for f in (m.a.weight, m.b.weight):
            assert int((f == 0).sum()) == round(0.5 * f.numel())  # exactly the target, per factor
    assert rec["metrics"]["test_top1"] > 20 and rec["best_epoch"] == 1
    assert rec["tunecomp"]["transition_steps"] > 0


def test_a_tunecomp_bundle_round_trips_exports_and_recovers_with_its_zeros(tunecomp_bundle, tmp_path):
    a, b = load_bundle(tunecomp_bundle).model.eval(), load_bundle(tunecomp_bundle).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ex = export(ExportConfig(verify_samples=32), tunecomp_bundle, tmp_path / "onnx")
    check = ex["verification"]["onnxruntime"]
    assert check["passed"] and check["weight_zeros_onnx"] >= check["weight_zeros_bundle"] > 0
    finetune(FinetuneConfig(init=str(tunecomp_bundle), epochs=1, threads=2, kd_alpha=0.0, calib_samples=64),
             tmp_path / "rec")  # fmt: skip
    before = {n: m.weight == 0 for n, m in a.named_modules() if isinstance(m, nn.Conv2d) and n.endswith((".a", ".b"))}
    after = load_bundle(tmp_path / "rec").model
    assert before and all(torch.equal(after.get_submodule(n).weight == 0, z) for n, z in before.items())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="tunecomp"), "needs exactly one of --rank-ratio R and --rank-energy E"),
        (dict(method="tunecomp", rank_ratio=0.5, init="x"), "cannot continue --init"),
        (dict(prune_ratio=0.5), "go with --method tunecomp"),
        (dict(method="tunecomp", rank_ratio=0.5, transition=1.0), "--transition must be in \\(0, 1\\)"),
        (dict(method="tunecomp", rank_ratio=0.5, prune_ratio=1.0), "--prune-ratio must be in \\[0, 1\\)"),
        (dict(method="lora"), "--method must be tunecomp"),
        (dict(prune_schedule="linear"), "go with --method tunecomp"),
        (dict(rank_multiple=16), "go with --method tunecomp"),
        (
            dict(method="tunecomp", rank_ratio=0.5, prune_schedule="exp"),
            "--prune-schedule must be one of cubic, linear",
        ),
    ],
)
def test_bad_tunecomp_options(kw, message):
    with pytest.raises(CraftError, match=message):
        FinetuneConfig(**kw)
