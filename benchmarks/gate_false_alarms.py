"""The latency gate under a noisy neighbour: false alarms on an unchanged artifact and detections of a slower copy, for
the stored-baseline gate (--baseline bench.json) and the paired gate (--against ARTIFACT), side by side.

The slower copy is the model with a convolution of the input whose result, times zero, is added to the logits:
identical logits, about `--extra` more time (calibrated here, then measured). The baseline bench.json is recorded once,
on a quiet machine; then, per condition (quiet; a neighbour process busy half of one core; one busy a full core,
started after the baseline), `--runs` gate runs of each mode on each candidate, in an alternating order. Every gate
run is a real `craft_deploy.bench.run` (accuracy on --eval-subset images, both batch sizes), in this process.

python benchmarks/gate_false_alarms.py runs/demo/adam-fp32-onnx/model.onnx --runs 30 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from craft_deploy.bench import run
from craft_deploy.config import BenchConfig
from craft_deploy.records import environment

NEIGHBOURS = {
    "quiet": None,
    # busy 10 ms, asleep 10 ms: half of one core
    "half-core": "import time\nwhile True:\n    t = time.perf_counter()\n"
    "    while time.perf_counter() - t < 0.01: pass\n    time.sleep(0.01)\n",
    "full-core": "while True: pass\n",
}


def slower_copy(src: Path, dst: Path, channels: int) -> None:
    """`src` plus Conv(input, channels x 3 x 3 x 3) -> ReduceMean -> x 0 -> + logits: the same logits, more work."""
    proto = onnx.load(str(src))
    g = proto.graph
    x, y = g.input[0].name, g.output[0].name
    w = np.random.default_rng(0).normal(size=(channels, 3, 3, 3)).astype(np.float32)
    g.initializer.extend(
        [numpy_helper.from_array(w, "extra_w"), numpy_helper.from_array(np.zeros((), np.float32), "z")]
    )
    for node in g.node:
        node.output[:] = ["logits_before" if o == y else o for o in node.output]
    g.node.extend(
        [
            helper.make_node("Conv", [x, "extra_w"], ["extra_conv"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["extra_conv"], ["extra_mean"], keepdims=0),
            helper.make_node("Mul", ["extra_mean", "z"], ["extra_zero"]),
            helper.make_node("Add", ["logits_before", "extra_zero"], [y]),
        ]
    )
    onnx.save(proto, str(dst))


def gate(cfg: BenchConfig, candidate: Path, out: Path) -> dict:
    """One gate run; its verdict ('passed', 'failed', 'undecided') and wall time."""
    t0 = time.perf_counter()
    rec = run(cfg, [candidate], out, overwrite=True)
    g = rec["gate"]
    verdict = g.get("verdict") or ("passed" if g["passed"] else "failed")
    return {"verdict": verdict, "seconds": time.perf_counter() - t0, "rows": _rows(g)}


def _rows(g: dict) -> list:
    if g.get("mode") == "paired":
        return [
            {"batch": r["batch"], "ratio": r["ratio"], "interval": r["ratio_interval"], "blocks": r["blocks"]}
            for r in g["rows"]
        ]
    return [{"row": r["row"], "latency_change": r["latency_change"]} for r in g["rows"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="An exported ONNX file (the demo's FP32 export).")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--conditions", default="quiet,half-core,full-core")
    ap.add_argument("--threshold", type=float, default=0.05, help="--max-latency-regression of both gates.")
    ap.add_argument("--extra", type=float, default=0.10, help="How much slower the slow copy should be.")
    ap.add_argument("--channels", type=int, help="Extra channels of the slow copy (default: calibrated to --extra).")
    ap.add_argument("--modes", default="stored,paired", help="Which gates to run: stored, paired or both.")
    ap.add_argument("--name", default="gate-false-alarms", help="Results file name (JSON and Markdown).")
    ap.add_argument("--eval-subset", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    common = dict(batch_sizes=(1, 16), eval_subset=args.eval_subset, max_latency_regression=args.threshold)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the slow copy: the fewest extra channels that make both batch sizes at least --extra slower (paired, quiet)
        slow, calibration = tmp / "slow.onnx", []
        for channels in [args.channels] if args.channels else (2, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            slower_copy(args.model, slow, channels)
            probe = BenchConfig(against=str(args.model), min_blocks=30, max_blocks=30, **common)
            ratios = [r["ratio"] for r in run(probe, [slow], tmp / "probe", overwrite=True)["gate"]["rows"]]
            calibration.append({"channels": channels, "ratios": ratios})
            print(f"extra work: {channels} channels -> ratios {[round(r, 3) for r in ratios]}", flush=True)
            if min(ratios) >= 1 + args.extra:
                break
        # the stored gate matches rows by model path: every candidate is written to the same path before its run
        candidate = tmp / "candidate" / "model.onnx"
        candidate.parent.mkdir()
        files = {"unchanged": args.model.read_bytes(), "slower": slow.read_bytes()}
        candidate.write_bytes(files["unchanged"])
        baseline = tmp / "baseline.json"
        run(BenchConfig(baseline=str(baseline), update_baseline=True, **common), [candidate], tmp / "b0")
        modes = {
            "stored": BenchConfig(baseline=str(baseline), **common),
            "paired": BenchConfig(against=str(args.model), **common),
        }
        modes = {m: modes[m] for m in args.modes.split(",")}
        results = []
        for condition in args.conditions.split(","):
            neighbour = NEIGHBOURS[condition]
            proc = subprocess.Popen([sys.executable, "-c", neighbour]) if neighbour else None
            try:
                time.sleep(1.0 if proc else 0.0)
                for i in range(args.runs):
                    order = ["unchanged", "slower"]
                    for name in order if i % 2 == 0 else order[::-1]:
                        candidate.write_bytes(files[name])
                        for mode, cfg in modes.items():
                            r = gate(cfg, candidate, tmp / "g")
                            results.append({"condition": condition, "mode": mode, "candidate": name, "run": i, **r})
                    print(f"{condition} run {i + 1}/{args.runs}", flush=True)
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
    table = summarise(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(sys.argv),
        "model": str(args.model),
        "threshold": args.threshold,
        "calibration": calibration,
        "environment": environment(),
        "results": results,
        "table": table,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(table + "\n")
    print(table)


def summarise(results: list[dict], args) -> str:
    lines = [
        f"gate threshold {100 * args.threshold:.0f}%, {args.runs} runs per cell; slower copy: +{100 * args.extra:.0f}% "
        "target (measured ratios in the JSON's calibration)",
        "",
        "| condition | gate | false alarms (unchanged) | undecided (unchanged) | caught (slower) | undecided (slower) "
        "| median s per gate run |",
        "|---|---|---|---|---|---|---|",
    ]
    for condition in args.conditions.split(","):
        for mode in args.modes.split(","):
            cell = [r for r in results if r["condition"] == condition and r["mode"] == mode]
            same = [r for r in cell if r["candidate"] == "unchanged"]
            slow = [r for r in cell if r["candidate"] == "slower"]
            cells = [
                _count(same, "failed"),
                _count(same, "undecided"),
                _count(slow, "failed"),
                _count(slow, "undecided"),
            ]
            lines.append(
                f"| {condition} | {mode} | " + " | ".join(cells) + f" | {np.median([r['seconds'] for r in cell]):.1f} |"
            )
    return "\n".join(lines)


def _count(rows: list[dict], verdict: str) -> str:
    return f"{sum(r['verdict'] == verdict for r in rows)}/{len(rows)}"


if __name__ == "__main__":
    main()
