"""Latency on the backend a recipe ships to (`tune --objective latency`), measured, not assumed.

**Price per layer.** The dense bundle and, per treatment, the bundle with every candidate layer at that treatment are
exported as the backend runs them (ONNX; Q/DQ with the backend's placement) and profiled together, round-robin, by
ONNX Runtime's own profiler (runtimes.onnx_profile). Each node of the graph ONNX Runtime runs (its optimised graph:
fused, requantized, re-laid out) is attributed to a layer:
- by its name scope, the torch exporter's module path (`/blocks/blocks.1/blocks.1.0/conv_pwl/Conv_token_1` is
  `blocks.1.0.conv_pwl`, its weight's DequantizeLinear too);
- else through the exported node or tensor it is named after: ONNX Runtime names a Conv fused with its ReLU6 after the
  Clip's output (`/blocks/.../bn1/act/Clip_output_0_nchwc`), and the exported Clip is walked back through the norm and
  activation ops to the layer it follows;
- else, for a Q/DQ, transpose or layout node, the layer it feeds (an activation quantizer is paid for by its reader).
A treatment's value on a layer is the kernel time it saves there: float ms - treated ms (search.OBJECTIVES). Nodes
that belong to no layer (residual adds, pooling, the head) are not priced; their totals are in the record, so a
reader sees how much of the model the prices cover.

**Finalists.** After its held-out accuracy check, every finalist within budget is exported for the backend and timed
side by side with the dense model's file and the uniform one (every layer treated), round-robin (bench --rounds): the
fastest measured finalist wins, and its speed-up is a ratio measured in one run. Layers next to each other interact
(every float <-> integer boundary costs a Q/DQ pair and a layout transpose, which no per-layer price sees), so the
timing, not the sum of the prices, decides.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import onnx

from craft_deploy import CraftError
from craft_deploy.bench import run as bench_run
from craft_deploy.compress import run as compress_run
from craft_deploy.compress.recipe import LayerRecipe, parse_treatment
from craft_deploy.config import BenchConfig, ExportConfig, TuneConfig
from craft_deploy.export import run as export_run
from craft_deploy.runtimes.onnx_profile import node_times

LATENCY_BACKENDS = {"ort-cpu": "ort-cpu"}
"""--backend -> the placement of its activation quantizers and the Q/DQ flavour it is exported with."""

PASS_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput"}
"""Ops that carry a tensor to a layer without computing on it: outside a layer's scope, the layer they feed pays."""

ELEMENTWISE = {"BatchNormalization", "Clip", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Tanh", "Gelu"}
"""What follows a layer without being one (its norm, its activation; SiLU's and SE's Mul, whose first input is the
layer's): the layer before it pays. Residual adds and pooling are no layer's."""


def check_latency(cfg: TuneConfig, treatments: tuple[str, ...]) -> None:
    """A CraftError for a backend tune cannot time, or treatments it cannot run faster there (one Q/DQ bit width with
    quantized activations; no N:M: ONNX Runtime on a CPU has no sparse kernels)."""
    if cfg.backend not in LATENCY_BACKENDS:
        raise CraftError(f"--backend {cfg.backend}: tune times {', '.join(LATENCY_BACKENDS)} (--objective latency)")
    parsed = [parse_treatment(t) for t in treatments]
    if any(t.nm for t in parsed):
        raise CraftError(
            f"--treatments {','.join(treatments)}: N:M buys no time on {cfg.backend} (no sparse kernels on a CPU); "
            "use --objective sparse-share for 2:4"
        )
    if any(t.bits is None or t.bits[1] >= 16 for t in parsed) or len({t.bits for t in parsed}) > 1:
        raise CraftError(
            f"--treatments {','.join(treatments)}: --objective latency on {cfg.backend} takes one bit width with "
            "quantized activations (its integer kernels), e.g. w7a8 or int8"
        )


def module_of(node_name: str) -> str:
    """The module path in a torch-exported node's name: `/blocks/blocks.1/blocks.1.0/conv_pwl/Conv_token_1` ->
    `blocks.1.0.conv_pwl` (each scope level names its child, or its full dotted path for numbered containers)."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def _in_scope(name: str, layers: list[str]) -> str | None:
    """The innermost layer whose module path holds the node named `name`."""
    module = module_of(name)
    inside = [n for n in layers if module == n or module.startswith(n + ".")]
    return max(inside, key=len) if inside else None


def _exported_layer(graph: onnx.GraphProto, layers: list[str]) -> dict[str, str]:
    """In the exported graph, node name and output tensor name -> the layer that computes it: nodes in a layer's
    scope, and the BatchNorm / activation nodes after one (their scope is the norm's or the activation's), found by
    walking back through elementwise ops to the layer's node."""
    producer = {t: n for n in graph.node for t in n.output}
    owner: dict[str, str] = {}

    def layer_of(n: onnx.NodeProto, depth: int = 0) -> str | None:
        if n.name in owner:
            return owner[n.name]
        found = _in_scope(n.name, layers)
        if found is None and n.op_type in ELEMENTWISE and depth < 8 and n.input and n.input[0] in producer:
            found = layer_of(producer[n.input[0]], depth + 1)
        return found

    for n in graph.node:
        if (layer := layer_of(n)) is not None:
            owner[n.name] = layer
            owner.update(dict.fromkeys(n.output, layer))
    return owner


def _origin(name: str, exported: dict[str, str]) -> str | None:
    """The layer of an optimised node through the exported node or tensor it is named after: ONNX Runtime names fused
    and re-laid-out nodes after their output tensor (`..._nchwc`), a token (`..._token_7`), a requantization
    (`..._requant_q`) or the node a fusion started from (`/bn1/act/Mul/QuickGeluFusion/`)."""
    base = re.sub(r"(_nchwc|_token_\d+|_requant_q|_pre_requant)+$", "", name)
    while base:
        if base in exported:
            return exported[base]
        base = base.rstrip("/").rpartition("/")[0] if "/" in base.strip("/") else ""
    return None


def attribute_nodes(graph: onnx.GraphProto, layers: list[str], exported: onnx.GraphProto) -> dict[str, str]:
    """Node name -> the layer it belongs to, for the nodes of the optimised `graph` that belong to one (see the module
    docstring); `exported` is the graph as exported, whose names the optimised nodes carry."""
    origin = _exported_layer(exported, layers)
    owner = {}
    for n in graph.node:
        layer = _in_scope(n.name, layers)
        if layer is None and n.op_type not in PASS_THROUGH:  # a pass-through node goes to its reader, below
            layer = _origin(n.name, origin)
        if layer is not None:
            owner[n.name] = layer
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    for n in graph.node:
        if n.name in owner or n.op_type not in PASS_THROUGH:
            continue
        queue, seen = deque([n]), {n.name}
        while queue:
            here = queue.popleft()
            if here.name in owner and here is not n:
                owner[n.name] = owner[here.name]
                break
            if here is n or here.op_type in PASS_THROUGH:
                for nxt in (r for t in here.output for r in readers.get(t, [])):
                    if nxt.name not in seen:
                        seen.add(nxt.name)
                        queue.append(nxt)
    return owner


def layer_ms(
    graph: onnx.GraphProto, times: dict[str, float], layers: list[str], exported: onnx.GraphProto
) -> tuple[dict[str, float], float]:
    """Kernel milliseconds per layer, and those of the nodes no layer owns."""
    owner = attribute_nodes(graph, layers, exported)
    per = dict.fromkeys(layers, 0.0)
    unpriced = 0.0
    for name, ms in times.items():
        if name in owner:
            per[owner[name]] += ms
        else:
            unpriced += ms
    return per, unpriced


def export_for_backend(cfg: TuneConfig, bundle: Path, out: Path) -> Path:
    """The bundle's ONNX file as `cfg.backend` runs it, verified against PyTorch like every export."""
    export_run(ExportConfig(target=LATENCY_BACKENDS[cfg.backend], verify_samples=32, data_root=cfg.data_root),
               bundle, out, overwrite=True)  # fmt: skip
    return out / "model.onnx"


def price_layers(
    cfg: TuneConfig, bundle_path: str | Path, layers: list[str], treatments: tuple[str, ...], work: Path
) -> dict[str, Any]:
    """Each treatment's kernel time saved on each layer (`saved_ms`, float ms - treated ms), from one profile of the
    dense model and of the model with every layer at that treatment, round-robin; `files` are the exported models."""
    files = {"float": export_for_backend(cfg, Path(bundle_path), work / "float")}
    for t in treatments:
        # kernel times do not depend on the ranges: a few calibration images, no BatchNorm re-estimation
        recipe = LayerRecipe(layers={n: parse_treatment(t) for n in layers}, bn_recalibrate=False, calib_samples=64,
                             placement=LATENCY_BACKENDS[cfg.backend], seed=cfg.seed)  # fmt: skip
        compress_run(recipe.compress_config(64, cfg.data_root), bundle_path, work / t / "bundle", overwrite=True)
        files[t] = export_for_backend(cfg, work / t / "bundle", work / t / "onnx")
        shutil.rmtree(work / t / "bundle")
    profiled = node_times(list(files.values()), cfg.latency_batch, cfg.profile_runs, cfg.threads)
    per, unpriced = {}, {}
    for key, path in files.items():
        graph, times = profiled[path]
        per[key], unpriced[key] = layer_ms(graph, times, layers, onnx.load(str(path), load_external_data=False).graph)
    rows = [
        {
            "layer": n,
            "treatment": t,
            "float_ms": per["float"][n],
            "treated_ms": per[t][n],
            "saved_ms": per["float"][n] - per[t][n],
        }
        for n in layers
        for t in treatments
    ]
    return {
        "backend": cfg.backend,
        "batch": cfg.latency_batch,
        "profile_runs": cfg.profile_runs,
        "files": {k: str(v) for k, v in files.items()},
        "priced_ms": {k: sum(v.values()) for k, v in per.items()},
        "unpriced_ms": unpriced,
        "layers": rows,
    }


def time_side_by_side(cfg: TuneConfig, files: dict[str, Path], out: Path) -> dict[str, dict[str, Any]]:
    """bench of `files` (name -> ONNX file; names may share a file) on `cfg.backend`, round-robin over `cfg.rounds`
    passes at batch 1 and `cfg.latency_batch`: per name its p50 ms per batch size, each pass's p50, and top-1 on the
    backend (test images)."""
    unique = list(dict.fromkeys(os.path.normpath(str(p)) for p in files.values()))
    bench_cfg = BenchConfig(backend=cfg.backend, batch_sizes=tuple(sorted({1, cfg.latency_batch})), rounds=cfg.rounds,
                            eval_subset=cfg.eval_subset, threads=cfg.threads, data_root=cfg.data_root)  # fmt: skip
    rec = bench_run(bench_cfg, unique, out, overwrite=True)
    by_file: dict[str, dict[str, Any]] = {p: {"p50_ms": {}, "round_p50_ms": {}} for p in unique}
    for r in rec["results"]:
        got = by_file[r["model"]]
        got["p50_ms"][r["batch"]] = r["p50_ms"]
        got["round_p50_ms"][r["batch"]] = r.get("round_p50_ms", [r["p50_ms"]])
        got["backend_top1"] = r["top1"]
    return {name: by_file[os.path.normpath(str(p))] for name, p in files.items()}
