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
from collections import defaultdict
from pathlib import Path

import onnx

from craft_deploy.runtimes.onnx_profile import node_times


def node_classes(graph: onnx.GraphProto) -> dict[str, str]:
    """Node name -> its class in the graph ORT runs (its optimised graph, where convs are fused and re-laid out):
    Conv split into depthwise (group > 1), 1x1 and other; MatMul into weights (a Linear layer) and activations
    (attention); other ops by type."""
    weights = {init.name for init in graph.initializer}
    classes = {}
    for node in graph.node:
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
    """Mean kernel milliseconds per run by node class, per model, the models run round-robin
    (craft_deploy.runtimes.onnx_profile)."""
    result = {}
    for path, (graph, times) in node_times(paths, batch, runs, threads).items():
        classes = node_classes(graph)
        totals: dict[str, float] = defaultdict(float)
        for name, ms in times.items():
            totals[classes.get(name, "?")] += ms
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
