"""tune --objective latency: each layer priced by ONNX Runtime's own profile of the exported models, the finalists
timed side by side. Which layers run faster in INT8 depends on the CPU's kernels, so no test asserts it: they assert
what the prices are made of, and what the search does with prices it is given."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner

import craft_deploy.tune as tune_module
from craft_deploy import CraftError
from craft_deploy.cli.main import main
from craft_deploy.config import TuneConfig
from craft_deploy.models import load_bundle
from craft_deploy.runtimes.onnx_profile import node_times
from craft_deploy.tune import run
from craft_deploy.tune.latency import attribute_nodes, module_of, price_layers
from craft_deploy.tune.sensitivity import candidate_layers

CONVS = ("Conv", "FusedConv", "QLinearConv", "NhwcFusedConv")


def test_a_node_name_gives_its_module_path():
    assert module_of("/blocks/blocks.1/blocks.1.0/conv_pwl/Conv_token_1") == "blocks.1.0.conv_pwl"
    assert module_of("/conv_stem/Conv_output_0_nchwc") == "conv_stem"
    assert module_of("/blocks/blocks.4/blocks.4.0/conv_dw/weight/weight.0/DequantizeLinear") == (
        "blocks.4.0.conv_dw.weight.weight.0"
    )
    assert module_of("ReorderInput_token_32") == ""


@pytest.fixture(scope="module")
def priced(tiny_bundle, tmp_path_factory):
    cfg = TuneConfig(objective="latency", profile_runs=10, latency_batch=4)
    layers = list(candidate_layers(load_bundle(tiny_bundle).model))
    return layers, price_layers(cfg, tiny_bundle, layers, ("w7a8",), tmp_path_factory.mktemp("latency"))


def test_every_layer_is_priced_from_its_own_kernels_in_both_models(priced):
    layers, res = priced
    assert [r["layer"] for r in res["layers"]] == layers and {r["treatment"] for r in res["layers"]} == {"w7a8"}
    for r in res["layers"]:
        assert (
            r["float_ms"] > 0
            and r["treated_ms"] > 0
            and r["saved_ms"] == pytest.approx(r["float_ms"] - r["treated_ms"])
        )
    for key, path in res["files"].items():
        graph, times = node_times([Path(path)], 1, 2)[Path(path)]
        owner = attribute_nodes(graph, layers, onnx.load(path).graph)
        convs = [n for n in graph.node if n.op_type in CONVS]
        # every conv kernel ONNX Runtime runs is some layer's (the SE gate's conv too, fused into its Sigmoid)
        assert len(convs) == len(layers) and {owner[n.name] for n in convs} == set(layers), key
        assert set(times) <= {n.name for n in graph.node}
        if key != "float":  # the input's quantizer is paid for by the stem that reads it
            first_q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and graph.input[0].name in n.input)
            assert owner[first_q.name] == "conv_stem"
    assert set(res["priced_ms"]) == set(res["unpriced_ms"]) == {"float", "w7a8"}


def _given_prices(saved):
    """price_layers as measured, with each row's saved_ms replaced by saved(row): the search's input, given."""
    real = tune_module.price_layers

    def priced(*a, **k):
        res = real(*a, **k)
        for r in res["layers"]:
            r["saved_ms"] = saved(r)
        return res

    return priced


@pytest.fixture(scope="module")
def tuned_fast(tiny_bundle, tmp_path_factory):
    """A latency search on the tiny bundle, with prices given (every layer gains its float time) and no speed-up
    required, so that the path from prices to a timed recipe runs on any CPU (the tiny model's INT8 kernels may well
    be slower than its float ones): the held-out checks, the exports and the timing are real."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tune_module, "price_layers", _given_prices(lambda r: r["float_ms"]))
    out = tmp_path_factory.mktemp("tune") / "fast"
    cfg = TuneConfig(objective="latency", max_drop=5.0, margin=3.0, calib_samples=128, eval_subset=None, validate=0,
                     profile_runs=5, latency_batch=4, rounds=2, min_speedup=0.0)  # fmt: skip
    try:
        return out, cfg, run(cfg, tiny_bundle, out)
    finally:
        mp.undo()


def test_the_fastest_finalist_within_budget_is_chosen_by_its_measured_time(tuned_fast):
    out, cfg, rec = tuned_fast
    passing = [f for f in rec["finalists"] if f.get("passed")]
    best = next(f for f in passing if f["search"] == rec["chosen"])
    assert best["test_top1_drop"] <= cfg.max_drop
    models = rec["timing"]["models"]
    assert {"float", "w7a8 (every layer)", *(f["search"] for f in passing)} == set(models)
    for m in models.values():  # timed side by side at batch 1 and the priced batch, and run on the backend
        assert set(m["p50_ms"]) == {1, 4} and all(v > 0 for v in m["p50_ms"].values()) and 0 <= m["backend_top1"]
        assert all(len(rounds) == cfg.rounds for rounds in m["round_p50_ms"].values())
    assert best["latency"]["p50_ms"][4] == min(f["latency"]["p50_ms"][4] for f in passing)
    assert best["latency"]["speedup_vs_float"] == pytest.approx(
        models["float"]["p50_ms"][4] / models[best["search"]]["p50_ms"][4]
    )
    recipe = yaml.safe_load((out / "tune.yaml").read_text())
    assert recipe["placement"] == "ort-cpu" and set(recipe["layers"].values()) == {"w7a8"}
    assert recipe["layers"] == best["layers"] and "on ort-cpu" in (out / "tune.yaml").read_text()


def test_compress_recipe_reproduces_the_latency_tuned_bundle(tiny_bundle, tuned_fast, tmp_path):
    out, _, _ = tuned_fast
    res = CliRunner().invoke(main, ["compress", str(tiny_bundle), "--recipe", str(out / "tune.yaml"),
                                    "--out", str(tmp_path / "again")])  # fmt: skip
    assert res.exit_code == 0, res.output
    a = load_bundle(out / "bundle").model.state_dict()
    b = load_bundle(tmp_path / "again").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_where_no_layer_runs_faster_the_float_model_is_the_answer(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "price_layers", _given_prices(lambda r: -abs(r["float_ms"])))
    cfg = TuneConfig(objective="latency", calib_samples=32, eval_subset=64, validate=0, profile_runs=2,
                     latency_batch=2)  # fmt: skip
    with pytest.raises(CraftError, match=r"no layer runs faster on ort-cpu with w7a8 than in float"):
        run(cfg, tiny_bundle, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_recipe_no_faster_than_the_float_model_is_not_returned(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "price_layers", _given_prices(lambda r: r["float_ms"]))
    # any recipe is within a 100-point budget; none is a million times faster than the float model
    cfg = TuneConfig(objective="latency", max_drop=100.0, margin=0.0, calib_samples=32, eval_subset=64, validate=0,
                     profile_runs=2, latency_batch=2, rounds=1, min_speedup=1e6)  # fmt: skip
    with pytest.raises(CraftError, match=r"against the float model's .* ms .* under --min-speedup 1000000.0"):
        run(cfg, tiny_bundle, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    (partial,) = tmp_path.iterdir()  # what a rerun reuses: the table, not the exports and timings
    names = {p.name for p in partial.iterdir()}
    assert "sensitivity.partial.json" in names and not names & {"latency", "finalists", "bundle"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--treatments", "2:4"], "N:M buys no time on ort-cpu"),
        (["--treatments", "int8,w4"], "takes one bit width with quantized activations"),
        (["--latency-batch", "0"], "--latency-batch must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--min-speedup", "-1"], "--min-speedup must be >= 0"),
    ],
)
def test_latency_refuses_what_it_cannot_time_with_one_line(tiny_bundle, tmp_path, args, message):
    res = CliRunner().invoke(main, ["tune", str(tiny_bundle), "--objective", "latency", *args,
                                    "--out", str(tmp_path / "t")])  # fmt: skip
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "t").exists()
