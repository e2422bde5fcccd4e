"""craft-deploy tune --analyze-only: every treatment on every layer alone, scored against the dense model and
validated on held-out images; the search itself is not built and says so."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from craft_deploy.cli.main import main
from craft_deploy.config import TuneConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.tune import run
from craft_deploy.tune.sensitivity import sensitivity_table, spearman


def test_each_treatment_is_scored_on_each_layer_alone(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    model = bundle.model.eval()
    calib = calibration_subset(splits_for_manifest(bundle.manifest).train, 32, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity_table(model, calib, ("int8", "w4", "2:4"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched
    layers = set(select_layers(model)[0])
    by = {t: {r["layer"]: r for r in rows if r["treatment"] == t and "kl" in r} for t in ("int8", "w4", "2:4")}
    assert set(by["int8"]) == layers and set(by["w4"]) == layers and by["2:4"]
    assert all(r["kl"] >= 0 and r["logit_mse"] >= 0 for r in rows if "kl" in r)
    # coarser treatments cost more: 4-bit weights against W8A8 on the same layers
    common = sorted(set(by["int8"]) & set(by["w4"]))
    assert statistics.median(by["w4"][n]["kl"] for n in common) > statistics.median(by["int8"][n]["kl"] for n in common)


def test_tune_analyze_only_writes_the_table_its_validation_and_a_plot(tiny_bundle, tmp_path):
    rec = run(TuneConfig(analyze_only=True, calib_samples=32, eval_subset=64, validate=3), tiny_bundle, tmp_path / "t")
    saved = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert saved["stage"] == "tune" and (tmp_path / "t" / "sensitivity.png").stat().st_size > 0
    validated = [r for r in rec["sensitivity"] if "test_top1_drop" in r]
    assert len(validated) == rec["validation"]["pairs"] == 3
    top = max((r for r in rec["sensitivity"] if "kl" in r), key=lambda r: r["kl"])
    assert "test_top1_drop" in top  # the highest score is always among the validated
    assert "spearman_kl_vs_drop" in rec["validation"]


def test_tune_refuses_what_it_cannot_do(tiny_bundle, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["tune", str(tiny_bundle), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "not built yet" in res.output and not (tmp_path / "a").exists()
    res = runner.invoke(main, ["tune", str(tiny_bundle), "--analyze-only", "--treatments", "int8,int3",
                               "--out", str(tmp_path / "b")])  # fmt: skip
    assert res.exit_code == 2 and "--treatments int3 is unknown" in res.output and not (tmp_path / "b").exists()


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.8944, abs=1e-3)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
