import json

import pytest

from craft_deploy import CraftError
from craft_deploy.bench import BACKENDS, run
from craft_deploy.bench.backends import get_backend
from craft_deploy.bench.measure import latency_stats
from craft_deploy.config import BenchConfig


def test_ort_cpu_bench_reads_everything_from_the_model(tiny_w8a8_onnx, tmp_path):
    rec = run(
        BenchConfig(batch_sizes=(1, 4), iters=5, min_seconds=0.0, eval_subset=64),
        tiny_w8a8_onnx / "model.onnx",
        tmp_path / "b",
    )
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved["results"] == rec["results"] and saved["bench_schema"] == "craft-deploy/bench/v1"
    assert [r["batch"] for r in rec["results"]] == [1, 4]
    for r in rec["results"]:
        assert r["dataset"] == "digits" and r["samples"] == 64 and r["top5"] >= r["top1"]
        assert r["iters"] >= 5 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    model = rec["models"][str(tiny_w8a8_onnx / "model.onnx")]
    assert model["size_bytes"] > 0 and model["architecture"] == "test_efficientnet"
    assert model["quantization"]["config"] == "w8a8"
    assert rec["memory"]["peak_rss_mb"] > 0 and rec["environment"]["cpu"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "| 1 |" in report and "| 4 |" in report


def test_rounds_time_the_models_round_robin(tiny_bundle, tiny_w8a8_onnx, tmp_path, monkeypatch):
    """--rounds N: every (model, batch) is timed once per pass, passes interleaved across models, and p50 is the
    median pass's."""
    from craft_deploy import bench
    from craft_deploy.config import ExportConfig
    from craft_deploy.export import run as export

    export(ExportConfig(verify_samples=8), tiny_bundle, tmp_path / "fp32")
    models = [tmp_path / "fp32" / "model.onnx", tiny_w8a8_onnx / "model.onnx"]
    order = []
    timed = bench._timed
    monkeypatch.setattr(
        bench, "_timed", lambda backend, batch, cfg: order.append(len(batch)) or timed(backend, batch, cfg)
    )
    rec = run(
        BenchConfig(batch_sizes=(1, 2), iters=3, min_seconds=0.0, eval_subset=32, rounds=3), models, tmp_path / "b"
    )
    assert order == [1, 2, 1, 2] * 3  # pass by pass over both models, not model by model
    assert len(rec["results"]) == 4
    for r in rec["results"]:
        passes = r["round_p50_ms"]
        assert len(passes) == 3 and r["p50_ms"] == sorted(passes)[1]
    with pytest.raises(CraftError, match="--rounds must be >= 1"):
        BenchConfig(rounds=0)


def test_pytorch_backend_agrees_with_onnx_on_accuracy(tiny_w8a8, tiny_w8a8_onnx, tmp_path):
    cfg = dict(batch_sizes=(2,), iters=2, min_seconds=0.0, eval_subset=128)
    pt = run(BenchConfig(backend="pytorch", **cfg), tiny_w8a8, tmp_path / "pt")["results"][0]
    ox = run(BenchConfig(backend="ort-cpu", **cfg), tiny_w8a8_onnx, tmp_path / "ox")["results"][0]
    assert abs(pt["top1"] - ox["top1"]) <= 3.0


def test_latency_stats():
    s = latency_stats([1.0, 2.0, 3.0, 4.0], batch=8)
    assert s["p50_ms"] == 2.5 and s["mean_ms"] == 2.5 and s["images_per_second"] == pytest.approx(3200.0)
    assert s["cv"] == pytest.approx(s["std_ms"] / 2.5)


@pytest.mark.parametrize("name", [n for n, c in BACKENDS.items() if not c.availability()[0]])
def test_unavailable_backends_say_what_to_install(name):
    with pytest.raises(CraftError, match=f"backend {name} is not usable here: .*(pip install|not implemented)"):
        get_backend(name)


def test_unknown_backend():
    with pytest.raises(CraftError, match="unknown backend 'tpu'; registered: ort-cpu"):
        get_backend("tpu")


def test_a_file_that_is_not_onnx_is_rejected(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_text("definitely not protobuf")
    with pytest.raises(CraftError, match="is not an ONNX model"):
        run(BenchConfig(), f, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_bundle_needs_export_before_onnx_backends(tiny_bundle, tmp_path):
    with pytest.raises(CraftError, match="export it first"):
        run(BenchConfig(), tiny_bundle, tmp_path / "b")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_backends_need_their_artifacts(tmp_path):
    """On a GPU machine with TensorRT: the engine backends are usable and refuse a directory without an engine."""
    for name in ("tensorrt", "torch-tensorrt"):
        cls = get_backend(name)
        with pytest.raises(CraftError, match="is not a"):
            run(BenchConfig(backend=name), tmp_path, tmp_path / f"b-{name}")
        assert cls.needs in ("engine", "ep")


@pytest.mark.gpu
def test_pytorch_backend_runs_on_cuda(tiny_w8a8, tmp_path):
    rec = run(
        BenchConfig(backend="pytorch", batch_sizes=(1, 8), iters=5, min_seconds=0.0, eval_subset=64),
        tiny_w8a8,
        tmp_path / "b",
    )
    assert next(iter(rec["models"].values()))["backend_info"]["device"] == "cuda"
