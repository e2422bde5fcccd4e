"""Repeat-run stability: the same bench twice back to back; p50 difference and CV per batch size.

python benchmarks/bench_stability.py runs/demo/adam-fp32-onnx runs/demo/adam-w7a8-cpu-onnx --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from craft_deploy.bench import run
from craft_deploy.config import BenchConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = BenchConfig(
        backend=args.backend,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        threads=args.threads,
        iters=50,
        min_seconds=args.min_seconds,
        eval_subset=200,
    )
    with tempfile.TemporaryDirectory() as tmp:
        first = run(cfg, args.models, Path(tmp) / "a")["results"]
        second = run(cfg, args.models, Path(tmp) / "b")["results"]
    rows = []
    for a, b in zip(first, second):
        rows.append(
            {
                "model": a["model"],
                "batch": a["batch"],
                "p50_ms_run1": a["p50_ms"],
                "p50_ms_run2": b["p50_ms"],
                "p50_change": b["p50_ms"] / a["p50_ms"] - 1,
                "cv_run1": a["cv"],
                "cv_run2": b["cv"],
                "remeasured": [a["remeasured"], b["remeasured"]],
            }
        )
    lines = [
        "| model | batch | p50 run 1 (ms) | p50 run 2 (ms) | change | CV run 1 | CV run 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['p50_ms_run1']:.2f} | {r['p50_ms_run2']:.2f} | "
            f"{100 * r['p50_change']:+.1f}% | {r['cv_run1']:.3f} | {r['cv_run2']:.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_stability.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "bench_stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
