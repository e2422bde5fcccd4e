"""ONNX Runtime's own profiler: the kernel time of every node of the graph it runs (its optimised graph, where Q/DQ
pairs are fused into integer kernels and convs re-laid out), several models round-robin so that a drifting machine
weighs on all of them alike. Profiling adds overhead to every node: read the times as a comparison between nodes and
models profiled together, not as latencies (bench measures those).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from craft_deploy import CraftError
from craft_deploy.runtimes.onnx_session import timing_options


def _options(threads: int | None):
    opts = timing_options(threads)  # as bench times a model
    opts.log_severity_level = 3
    return opts


def node_times(
    paths: list[Path], batch: int, runs: int, threads: int | None = None, warmup: int = 5
) -> dict[Path, tuple[onnx.GraphProto, dict[str, float]]]:
    """Per model: the optimised graph ONNX Runtime runs, and the mean kernel milliseconds per run of each of its nodes
    (by node name) over `runs` runs at batch `batch` on random inputs, the models run round-robin."""
    import onnxruntime as ort

    out: dict[Path, tuple[onnx.GraphProto, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, graphs, feeds = {}, {}, {}
        for i, path in enumerate(paths):
            opts = _options(threads)
            opts.optimized_model_filepath = os.path.join(tmp, f"optimised-{i}.onnx")
            try:
                ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise CraftError(f"{path} could not be loaded by onnxruntime: {str(e)[:300]}") from e
            graphs[path] = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
            opts = _options(threads)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"ort-{i}")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            feeds[path] = {inp.name: np.random.default_rng(0).standard_normal((batch, *inp.shape[1:]), np.float32)}
            for _ in range(warmup):
                sess.run(None, feeds[path])
            sess.end_profiling()  # the warm-up runs go to a file of their own, discarded
            sessions[path] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            for path, sess in sessions.items():
                sess.run(None, feeds[path])
        for path, sess in sessions.items():
            totals: dict[str, float] = defaultdict(float)
            for e in json.loads(Path(sess.end_profiling()).read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    totals[e["name"][: -len("_kernel_time")]] += e["dur"] / 1e3 / runs
            out[path] = (graphs[path], dict(totals))
    return out
