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
