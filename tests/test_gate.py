"""The regression gate: passes on the same model, fails with exit 3 on injected regressions, explains mismatches."""

import json

import pytest
from click.testing import CliRunner

from craft_deploy import CraftError
from craft_deploy.bench.gate import EXIT_REGRESSION, compare, read_baseline
from craft_deploy.cli.main import main

FAST = ["--batch-sizes", "1,4", "--iters", "5", "--min-seconds", "0", "--eval-subset", "64", "--threads", "1"]


def _invoke(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def baseline(tiny_w8a8_onnx, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    path = tmp / "baseline.json"
    res = _invoke(
        ["bench", str(tiny_w8a8_onnx), *FAST, "--baseline", str(path), "--update-baseline", "--out", str(tmp / "b0")]
    )
    assert res.exit_code == 0, res.output
    assert "baseline written" in res.output and path.is_file()
    return path


def _edit(src, dst, fn):
    rec = json.loads(src.read_text())
    fn(rec)
    dst.write_text(json.dumps(rec))
    return dst


def test_same_model_passes(tiny_w8a8_onnx, baseline, tmp_path):
    # generous latency threshold: this checks the plumbing; real noise is measured in benchmarks/
    res = _invoke(
        [
            "bench",
            str(tiny_w8a8_onnx),
            *FAST,
            "--baseline",
            str(baseline),
            "--max-latency-regression",
            "5.0",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert "gate: passed" in res.output
    gate = json.loads((tmp_path / "b" / "bench.json").read_text())["gate"]
    assert gate["passed"] and len(gate["rows"]) == 2
    assert (tmp_path / "b" / "report.md").read_text().count("Regression gate") == 1


def test_halved_baseline_latency_fails_with_exit_3(tiny_w8a8_onnx, baseline, tmp_path):
    def halve(rec):
        for r in rec["results"]:
            r["p50_ms"] /= 10.0

    fast = _edit(baseline, tmp_path / "fast.json", halve)
    res = _invoke(["bench", str(tiny_w8a8_onnx), *FAST, "--baseline", str(fast), "--out", str(tmp_path / "b")])
    assert res.exit_code == EXIT_REGRESSION, res.output
    assert "gate: FAILED" in res.output and "p50 +" in res.output
    assert "latency re-checked 2x" in res.output  # a latency failure must reproduce before it fails the build
    assert (tmp_path / "b" / "bench.json").is_file()  # the evidence is kept


def test_higher_baseline_accuracy_fails(tiny_w8a8_onnx, baseline, tmp_path):
    def better(rec):
        for r in rec["results"]:
            r["top1"] += 5.0

    acc = _edit(baseline, tmp_path / "acc.json", better)
    res = _invoke(
        [
            "bench",
            str(tiny_w8a8_onnx),
            *FAST,
            "--baseline",
            str(acc),
            "--max-latency-regression",
            "5.0",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert res.exit_code == EXIT_REGRESSION, res.output
    assert "top-1 -5.00 pt > 0.50 pt" in res.output


def test_mismatched_rows_are_listed(baseline):
    base = json.loads(baseline.read_text())
    run = json.loads(baseline.read_text())
    run["results"] = [dict(r, batch=r["batch"] * 8) if r["batch"] == 4 else r for r in run["results"]]
    verdict = compare(run, base, 0.1, 0.5)
    assert len(verdict.rows) == 1 and not verdict.failed
    assert verdict.only_in_run[0].endswith("batch 32") and verdict.only_in_baseline[0].endswith("batch 4")
    run["results"] = [dict(r, backend="ort-cuda") for r in run["results"]]
    with pytest.raises(CraftError, match="no row of this run matches the baseline"):
        compare(run, base, 0.1, 0.5)


def test_baseline_of_another_model_or_schema_is_refused(tiny_w8a8_onnx, baseline, tmp_path):
    other = _edit(
        baseline,
        tmp_path / "other.json",
        lambda rec: [m.update(architecture="resnet50") for m in rec["models"].values()],
    )
    res = _invoke(["bench", str(tiny_w8a8_onnx), *FAST, "--baseline", str(other), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "is another model" in res.output
    old = _edit(baseline, tmp_path / "old.json", lambda rec: rec.update(bench_schema="craft-deploy/bench/v0"))
    with pytest.raises(CraftError, match="bench schema 'craft-deploy/bench/v0'"):
        read_baseline(old)
    with pytest.raises(CraftError, match="does not exist"):
        read_baseline(tmp_path / "missing.json")


def test_update_baseline_needs_a_path(tiny_w8a8_onnx, tmp_path):
    res = _invoke(["bench", str(tiny_w8a8_onnx), *FAST, "--update-baseline", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "--update-baseline needs --baseline PATH" in res.output


def test_several_models_give_a_pareto_plot(tiny_bundle, tiny_w8a8_onnx, tmp_path):
    from craft_deploy.config import ExportConfig
    from craft_deploy.export import run as export

    export(ExportConfig(verify_samples=16), tiny_bundle, tmp_path / "fp32")
    res = _invoke(["bench", str(tmp_path / "fp32"), str(tiny_w8a8_onnx), *FAST, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert len(rec["models"]) == 2 and len(rec["results"]) == 4
    assert rec["plots"] == ["latency_vs_batch.png", "accuracy_vs_latency.png"]
    for png in rec["plots"]:
        assert (tmp_path / "b" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noisy_rows_are_remeasured(tiny_w8a8_onnx, tmp_path):
    from craft_deploy.bench import run
    from craft_deploy.config import BenchConfig

    # a CV threshold nothing can meet forces every row through its re-measurements
    rec = run(
        BenchConfig(batch_sizes=(1,), iters=5, min_seconds=0.0, eval_subset=32, max_cv=1e-9, retries=2),
        tiny_w8a8_onnx,
        tmp_path / "b",
    )
    assert rec["results"][0]["remeasured"] == 2


# --- the paired gate (--against) and the structural gate -----------------------------------------------------------

PAIRED = ["--batch-sizes", "1,4", "--eval-subset", "64", "--threads", "1", "--min-blocks", "6", "--max-blocks", "12"]


def test_hodges_lehmann_is_the_median_of_walsh_averages_with_the_wilcoxon_interval():
    import itertools

    import numpy as np

    from craft_deploy.bench.paired import hodges_lehmann

    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, 40)
    est, lo, hi = hodges_lehmann(d, 0.95)
    walsh = sorted((a + b) / 2 for a, b in itertools.combinations_with_replacement(d, 2))
    assert est == pytest.approx(float(np.median(walsh)))
    assert lo < 0.1 < hi and lo < est < hi and hi - lo < 0.05  # about 2 x 1.96 x 0.05 / sqrt(40)
    assert hodges_lehmann(d, 0.99)[1] < lo  # a higher confidence, a wider interval
    assert hodges_lehmann(d - d.mean(), 0.95)[1] < 0 < hodges_lehmann(d - d.mean(), 0.95)[2]


def _slower_copy(src, dst, channels: int) -> None:
    """The ONNX file at `src` with a convolution of the input whose result, times zero, is added to the logits:
    identical logits, more work (no runtime folds x * 0 away, since x may be inf)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    g = proto.graph
    x, y = g.input[0].name, g.output[0].name
    g.initializer.extend(
        [
            numpy_helper.from_array(np.random.default_rng(0).normal(size=(channels, 3, 3, 3)).astype(np.float32), "xw"),
            numpy_helper.from_array(np.zeros((), np.float32), "xzero"),
        ]
    )
    for node in g.node:
        node.output[:] = ["logits_before_extra" if o == y else o for o in node.output]
    g.node.extend(
        [
            helper.make_node("Conv", [x, "xw"], ["xconv"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["xconv"], ["xmean"], keepdims=0),
            helper.make_node("Mul", ["xmean", "xzero"], ["xnothing"]),
            helper.make_node("Add", ["logits_before_extra", "xnothing"], [y]),
        ]
    )
    onnx.save(proto, str(dst))


def test_paired_gate_passes_the_same_artifact_and_fails_a_much_slower_one(tiny_w8a8_onnx, tmp_path):
    # thresholds far from the effects (1x vs ~5x): this checks the plumbing and the record; the false-alarm and
    # detection rates at 10% are measured in benchmarks/gate_false_alarms.py
    import numpy as np

    from craft_deploy.bench.paired import hodges_lehmann

    res = _invoke(["bench", str(tiny_w8a8_onnx), "--against", str(tiny_w8a8_onnx), *PAIRED, "--max-latency-regression",
                   "1.0", "--out", str(tmp_path / "same")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "paired gate:" in res.output and "gate: passed" in res.output and "structure: ok (no change)" in res.output
    rec = json.loads((tmp_path / "same" / "bench.json").read_text())
    gate = rec["gate"]
    assert gate["mode"] == "paired" and gate["sha256"]["candidate"] == gate["sha256"]["baseline"]
    assert [r["batch"] for r in gate["rows"]] == [1, 4] and rec["environment"]
    for row in gate["rows"]:  # the verdict can be recomputed from what bench.json holds
        assert len(row["baseline_block_ms"]) == len(row["candidate_block_ms"]) == row["blocks"] >= 6
        d = np.log(np.array(row["candidate_block_ms"]) / np.array(row["baseline_block_ms"]))
        assert np.exp(hodges_lehmann(d, row["confidence"])[0]) == pytest.approx(row["ratio"])
        assert row["ratio_interval"][1] < 2.0 and row["verdict"] == "passed"
    slow = tmp_path / "slow.onnx"
    _slower_copy(tiny_w8a8_onnx / "model.onnx", slow, channels=256)
    res = _invoke(["bench", str(slow), "--against", str(tiny_w8a8_onnx), *PAIRED, "--max-latency-regression", "0.5",
                   "--out", str(tmp_path / "slow")])  # fmt: skip
    assert res.exit_code == EXIT_REGRESSION, res.output
    gate = json.loads((tmp_path / "slow" / "bench.json").read_text())["gate"]
    assert all(r["verdict"] == "failed" and r["ratio_interval"][0] > 1.5 for r in gate["rows"])
    assert not gate["structure"]["failures"]  # an added float layer is a change, not a fallback
    assert any(c.startswith("Conv ") for c in gate["structure"]["changes"])


def test_structural_gate_fails_a_layer_that_falls_back_to_float(tiny_w8a8_onnx, tmp_path):
    # no timing involved: one weighted layer's int8 weights replaced by their float values (same logits within
    # rounding) is a deterministic failure, whatever the latency says
    import onnx
    from onnx import numpy_helper

    from craft_deploy.runtimes.onnx_graph import initializers, producers

    proto = onnx.load(str(tiny_w8a8_onnx / "model.onnx"))
    inits, writers = initializers(proto.graph), producers(proto.graph)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in writers)
    dq = writers[conv.input[1]]
    q, scale = (numpy_helper.to_array(inits[n]).astype("float32") for n in dq.input[:2])
    proto.graph.initializer.append(numpy_helper.from_array(q * scale.reshape(-1, 1, 1, 1), "float_weight"))
    conv.input[1] = "float_weight"
    proto.graph.node.remove(dq)
    onnx.save(proto, str(tmp_path / "float.onnx"))
    res = _invoke(["bench", str(tmp_path / "float.onnx"), "--against", str(tiny_w8a8_onnx), *PAIRED,
                   "--max-latency-regression", "10", "--out", str(tmp_path / "g")])  # fmt: skip
    assert res.exit_code == EXIT_REGRESSION, res.output
    assert f"structure: FAILED: layer {conv.name} falls back to float weights (int8 -> float)" in res.output
    assert "dequantize_linear" in res.output and "a Q/DQ pair disappeared" in res.output


def test_against_refuses_what_it_cannot_compare(tiny_w8a8_onnx, tmp_path):
    with pytest.raises(CraftError, match="--against .* and --baseline .* are two gates: give one"):
        from craft_deploy.config import BenchConfig

        BenchConfig(against=str(tiny_w8a8_onnx), baseline="b.json")
    res = _invoke(["bench", str(tiny_w8a8_onnx), str(tiny_w8a8_onnx), "--against", str(tiny_w8a8_onnx),
                   "--out", str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2 and "--against compares one candidate with its baseline; got 2" in res.output
    assert not (tmp_path / "x").exists()
