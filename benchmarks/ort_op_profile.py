"""Where ONNX Runtime CPU spends its time, per kind of operator, for one or more exported models: ORT's own profiler
(kernel time of every node over `--runs` runs at one batch size), each node classed by its operator and, for Conv, as
depthwise (group = channels), pointwise (1x1) or other, from the exported graph. Answers "what is left" once some
layers are made cheaper (e.g. the 1x1 convs factorised by TuneComp while the depthwise convs stay).

    python benchmarks/ort_op_profile.py runs/tunecomp/onnx-adam-s0/model.onnx \\
        runs/tunecomp/onnx-tunecomp-r0.25-p0-s0/model.onnx --batch 1 --out benchmarks/results/ort_op_profile.json

Profiling adds overhead to every node, so the totals are above bench's latencies: read the shares, not the ms (at
batch 1, where kernels are short, even the shares lean towards the model with more nodes). The models run round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx


def node_classes(path: Path) -> dict[str, str]:
    """Node name -> its class in the graph ORT runs (its optimised graph, where convs are fused and re-laid out):
    Conv split into depthwise (group > 1), 1x1 and other; MatMul into weights (a Linear layer) and activations
    (attention); other ops by type."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    classes = {}
    for node in model.graph.node:
        kind = node.op_type
        if node.op_type in ("MatMul", "FusedMatMul"):  # a Linear layer's (constant B) or attention's (two activations)
            kind += " (weights)" if len(node.input) > 1 and node.input[1] in weights else " (activations)"
        if node.op_type in ("Conv", "FusedConv", "QLinearConv"):
            attrs = {a.name: a for a in node.attribute}
            kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
            if "group" in attrs and attrs["group"].i > 1:
                kind = "Conv depthwise"
            elif kernel and all(k == 1 for k in kernel):
                kind = "Conv 1x1"
            else:
                kind = "Conv other"
        classes[node.name] = kind
    return classes


def profile(paths: list[Path], batch: int, runs: int, threads: int) -> dict[str, dict[str, float]]:
    """Mean kernel milliseconds per run by node class, per model. The models run round-robin (one run of each in
    turn), so a slow phase of the machine weighs on all of them alike."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        sessions, classes, feeds = {}, {}, {}
        for i, path in enumerate(paths):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            # as bench does: threads that spin after a run would take the cores from the next model's run
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            opts.optimized_model_filepath = os.path.join(tmp, f"optimised-{i}.onnx")  # read back for the classes
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            classes[path] = node_classes(Path(opts.optimized_model_filepath))
            opts.optimized_model_filepath = ""
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"ort-{i}")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:]), dtype=np.float32)
            feeds[path] = {inp.name: x}
            for _ in range(5):
                sess.run(None, feeds[path])
            sess.end_profiling()  # the warm-up runs go to a file of their own, discarded
            sessions[path] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            for path, sess in sessions.items():
                sess.run(None, feeds[path])
        result = {}
        for path, sess in sessions.items():
            totals: dict[str, float] = defaultdict(float)
            for e in json.loads(Path(sess.end_profiling()).read_text()):
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                name = e["name"][: -len("_kernel_time")]
                totals[classes[path].get(name, e.get("args", {}).get("op_name", "?"))] += e["dur"] / 1e3 / runs
            result[str(path)] = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = profile(args.models, args.batch, args.runs, args.threads)
    classes = list(dict.fromkeys(c for t in result.values() for c in t))
    print("| operator | " + " | ".join(f"{Path(m).parent.name} ms (share)" for m in result) + " |")
    print("|---|" + "---|" * len(result))
    for c in classes:
        cells = []
        for t in result.values():
            total = sum(t.values())
            cells.append(f"{t.get(c, 0.0):.3f} ({t.get(c, 0.0) / total:.0%})")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{sum(t.values()):.3f}" for t in result.values()) + " |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ms": result}, indent=2))


if __name__ == "__main__":
    main()
