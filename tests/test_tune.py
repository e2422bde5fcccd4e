"""craft-deploy tune: every treatment on every layer alone, scored against the dense model and validated on held-out
images; the search for a per-layer recipe within an accuracy budget; the recipe file that compress --recipe applies."""

from __future__ import annotations

import copy
import json
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

import craft_deploy.tune as tune_module
from craft_deploy import CraftError
from craft_deploy.cli.main import main
from craft_deploy.config import ExportConfig, TuneConfig
from craft_deploy.data import calibration_subset, splits_for_manifest
from craft_deploy.evaluate import evaluate
from craft_deploy.models import load_bundle
from craft_deploy.toolkit.layers import select_layers
from craft_deploy.toolkit.registry import method_state
from craft_deploy.tune import run
from craft_deploy.tune.sensitivity import candidate_layers, sensitivity_table, spearman


def test_each_treatment_is_scored_on_each_layer_alone(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    model = bundle.model.eval()
    calib = calibration_subset(splits_for_manifest(bundle.manifest).train, 32, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity_table(model, calib, ("w8a8", "w4", "2:4", "2:4+int8"))  # w8a8 is int8 by its short name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched
    layers = set(candidate_layers(model))
    assert layers > set(select_layers(model)[0])  # the stem and depthwise convs too: what quantize selects
    by = {
        t: {r["layer"]: r for r in rows if r["treatment"] == t and "kl" in r} for t in ("int8", "w4", "2:4", "2:4+int8")
    }
    assert set(by["int8"]) == layers and set(by["w4"]) == layers and by["2:4"] and set(by["2:4+int8"]) == set(by["2:4"])
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
    res = runner.invoke(main, ["tune", str(tiny_bundle), "--analyze-only", "--treatments", "int8,int3",
                               "--out", str(tmp_path / "b")])  # fmt: skip
    assert (
        res.exit_code == 2 and "--treatments 'int3' is not a treatment" in res.output and not (tmp_path / "b").exists()
    )
    for bad, why in (("2:4,4:8", "takes one N:M pattern (a recipe prunes with one), got 2:4, 4:8"),
                     ("float", "every layer can stay float already")):  # fmt: skip
        res = runner.invoke(main, ["tune", str(tiny_bundle), "--treatments", bad, "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and why in res.output and not (tmp_path / "b").exists()
    res = runner.invoke(main, ["tune", str(tiny_bundle), "--searches", "fallback,greedy", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--searches greedy is unknown" in res.output and not (tmp_path / "c").exists()
    res = runner.invoke(main, ["tune", str(tiny_bundle), "--max-drop", "1", "--margin", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--margin must be in [0, --max-drop 1.0], got 2.0" in res.output
    with pytest.raises(CraftError, match="--objective speed is not one of size, sparse-share, latency"):
        run(TuneConfig(objective="speed"), tiny_bundle, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.8944, abs=1e-3)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [5, 5, 5]) is None


@pytest.fixture(scope="module")
def tuned(tiny_bundle, tmp_path_factory):
    """A size search on the tiny bundle (int8 and w4 per layer) with a loose budget, and its record."""
    out = tmp_path_factory.mktemp("tune") / "size"
    cfg = TuneConfig(
        max_drop=5.0, margin=3.0, calib_samples=256, eval_subset=None, validate=0, treatments=("int8", "w4")
    )
    return out, cfg, run(cfg, tiny_bundle, out)


def test_the_tuned_bundle_is_within_budget_on_the_held_out_images(tiny_bundle, tuned):
    out, cfg, rec = tuned
    best = next(f for f in rec["finalists"] if f["search"] == rec["chosen"])
    assert best["passed"] and best["test_top1_drop"] <= cfg.max_drop
    assert all(f["value"] <= best["value"] for f in rec["finalists"] if f["passed"])
    # judged again here, outside tune: the bundle it wrote on the test images, against the dense bundle
    test = splits_for_manifest(load_bundle(tiny_bundle).manifest, eval_subset=cfg.eval_subset).test
    dense = evaluate(load_bundle(tiny_bundle).model, test)["top1"]
    tuned_top1 = evaluate(load_bundle(out / "bundle").model, test)["top1"]
    assert dense - tuned_top1 == pytest.approx(best["test_top1_drop"]) and dense - tuned_top1 <= cfg.max_drop
    # the recipe quantizes layers (the budget allows it) and every finalist's prediction comes from the fitted slope
    recipe = yaml.safe_load((out / "tune.yaml").read_text())
    assert recipe["layers"] == best["layers"] and set(recipe["layers"].values()) <= {"int8", "w4"}
    assert rec["search"]["slope_drop_per_kl"] is None or best["predicted_drop"] == pytest.approx(
        rec["search"]["slope_drop_per_kl"] * best["sum_kl"]
    )
    assert rec["candidates"] and all(c["val_top1_drop"] is not None for c in rec["candidates"])
    assert (out / "front.png").stat().st_size > 0 and not any(out.glob("finalists"))


def test_compress_recipe_reproduces_the_tuned_bundle_exactly(tiny_bundle, tuned, tmp_path):
    out, cfg, _ = tuned
    args = ["--recipe", str(out / "tune.yaml"), "--out", str(tmp_path / "again")]  # every test image, as tuned
    res = CliRunner().invoke(main, ["compress", str(tiny_bundle), *args])
    assert res.exit_code == 0, res.output
    a = load_bundle(out / "bundle").model.state_dict()
    b = load_bundle(tmp_path / "again").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_search_never_returns_a_recipe_over_budget_on_its_held_out_check(tiny_bundle, tmp_path, monkeypatch):
    # the validation measurements lie (every recipe loses nothing), so the search proposes its most aggressive
    # recipes; the held-out check on the test images, done by compress itself, must still refuse them
    monkeypatch.setattr(tune_module, "evaluate", lambda *a, **k: {"top1": 100.0})
    cfg = TuneConfig(max_drop=0.0, margin=0.0, calib_samples=32, eval_subset=200, validate=0, treatments=("w4",))
    with pytest.raises(CraftError, match=r"no recipe within --max-drop 0.0 on the held-out images") as e:
        run(cfg, tiny_bundle, tmp_path / "t")
    drops = [float(d) for d in re.findall(r"test drop (-?\d+\.\d+)", str(e.value))]
    assert len(drops) == 2 and all(d > 0 for d in drops)
    assert not (tmp_path / "t").exists()  # the table is kept for a rerun with a larger budget, nothing else
    kept = [p.name for p in tmp_path.iterdir()]
    assert len(kept) == 1 and "sensitivity.partial.json" in [p.name for p in next(tmp_path.iterdir()).iterdir()]


def test_a_killed_tune_keeps_its_table_and_the_rerun_scores_nothing_twice(tiny_bundle, tmp_path, monkeypatch):
    cfg = TuneConfig(analyze_only=True, calib_samples=16, eval_subset=64, validate=0, treatments=("int8",))
    real = tune_module.sensitivity_table
    scored, killed = [], []

    def killed_after_three(model, calib, treatments, prune_method, done, on_row, **kw):
        def save(row):
            on_row(row)
            scored.append(row["layer"])
            if len(scored) == 3 and not killed:
                killed.append(True)
                raise KeyboardInterrupt

        return real(model, calib, treatments, prune_method, done, save, **kw)

    monkeypatch.setattr(tune_module, "sensitivity_table", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tiny_bundle, tmp_path / "t")
    assert not (tmp_path / "t").exists() and len(scored) == 3
    scored.clear()
    rec = run(cfg, tiny_bundle, tmp_path / "t")
    layers = [r["layer"] for r in rec["sensitivity"]]
    assert len(scored) == len(layers) - 3 and not set(scored) & set(layers[:3])
    assert rec["sensitivity"] == run(cfg, tiny_bundle, tmp_path / "fresh")["sensitivity"]


def _manual_2_4(weight: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude along input channels, written out here: keep the 2 largest |w| of every 4 inputs."""
    w = weight.permute(0, 2, 3, 1) if weight.ndim == 4 else weight
    groups = w.reshape(-1, 4)
    keep = groups.abs().argsort(1, descending=True)[:, :2]
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0).reshape(w.shape)
    return weight * (mask.permute(0, 3, 1, 2) if weight.ndim == 4 else mask)


def test_the_table_matches_a_brute_force_single_layer_evaluation(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    model = bundle.model.eval()
    calib = calibration_subset(splits_for_manifest(bundle.manifest).train, 32, 0)
    rows = {r["layer"]: r for r in sensitivity_table(model, calib, ("2:4",)) if "kl" in r}
    images = torch.stack([calib[i][0] for i in range(len(calib))])
    with torch.no_grad():
        ref = F.log_softmax(model(images), 1)
    for name in list(rows)[:3] + list(rows)[-2:]:
        treated = copy.deepcopy(model)
        layer = treated.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(_manual_2_4(layer.weight))
            got = F.log_softmax(treated(images), 1)
        kl = float((ref.exp() * (ref - got)).sum(1).mean())
        assert rows[name]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7), name


def _write_recipe(path, layers, **extra):
    body = {"recipe": "craft-deploy per-layer", "version": 1, "calib_samples": 32, **extra, "layers": layers}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_a_mixed_recipe_compresses_records_each_layers_bits_and_exports_verified(tiny_bundle, tmp_path):
    from craft_deploy.export import run as export_run

    model = load_bundle(tiny_bundle).model
    names = list(select_layers(model)[0])
    layers = {names[0]: "int8", names[1]: "w4", names[2]: "2:4+int8", names[-1]: "w6a8"}
    nm = next((n for n in names[3:-1] if model.get_submodule(n).weight.shape[1] % 4 == 0), None)
    layers[nm] = "2:4"
    recipe = _write_recipe(tmp_path / "r.yaml", layers)
    args = ["--recipe", str(recipe), "--eval-subset", "64", "--out", str(tmp_path / "c")]
    res = CliRunner().invoke(main, ["compress", str(tiny_bundle), *args])
    assert res.exit_code == 0, res.output
    manifest = load_bundle(tmp_path / "c").manifest
    quant = method_state(manifest, "quantize")["layers"]
    assert {n: (s["w_bits"], s["a_bits"]) for n, s in quant.items()} == {
        names[0]: (8, 8),
        names[1]: (4, 16),
        names[2]: (8, 8),
        names[-1]: (6, 8),
    }
    pruned = method_state(manifest, "prune")
    assert pruned is not None and names[2] in json.dumps(pruned) and nm in json.dumps(pruned)
    rec = export_run(ExportConfig(verify_samples=32, target="ort-cpu"), tmp_path / "c", tmp_path / "onnx")  # INT4: ORT
    # INT4 weights beside uint8 activations: a valid file (ONNX's checker) that ONNX Runtime runs like PyTorch
    assert rec["verification"]["onnxruntime"]["passed"], rec["verification"]
    assert rec["verification"]["onnxruntime_fused_kernels"]["within_tolerance"], rec["verification"]


def test_compress_recipe_refuses_bad_recipes_with_one_line_and_writes_nothing(tiny_bundle, tmp_path):
    runner = CliRunner()
    name = next(iter(select_layers(load_bundle(tiny_bundle).model)[0]))
    cases = [
        (
            _write_recipe(tmp_path / "ghost.yaml", {name: "int8", "blocks.99.conv": "w4"}),
            "blocks.99.conv named for compression are not Linear/Conv layers",
        ),
        (_write_recipe(tmp_path / "t.yaml", {name: "int3"}), "is not a treatment"),
        (_write_recipe(tmp_path / "k.yaml", {name: "int8"}, lr=0.1), "unknown key(s) lr"),
        (_write_recipe(tmp_path / "v.yaml", {name: "int8"}, version=7), "version 7 is not one this craft-deploy reads"),
        (_write_recipe(tmp_path / "f.yaml", {name: "float"}), "leaves every layer float"),
        (_write_recipe(tmp_path / "s.yaml", {name: "int8"}, seed="zero"), "seed must be int, got 'zero'"),
        (tmp_path / "missing.yaml", "no such file"),
    ]
    (tmp_path / "bad.yaml").write_text("layers: [unclosed\n")
    cases.append((tmp_path / "bad.yaml", "is not readable YAML"))
    (tmp_path / "other.yaml").write_text("quant: w8a8\n")
    cases.append((tmp_path / "other.yaml", "is not a per-layer recipe"))
    for i, (recipe, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = runner.invoke(main, ["compress", str(tiny_bundle), "--recipe", str(recipe), "--out", str(out)])
        assert res.exit_code == 2 and message in res.output, (recipe.name, res.output)
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    res = runner.invoke(main, ["compress", str(tiny_bundle), "--recipe", str(tmp_path / "t.yaml"), "--quant", "w8a8",
                               "--out", str(tmp_path / "both")])  # fmt: skip
    assert res.exit_code == 2 and "drop --quant" in res.output and not (tmp_path / "both").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
