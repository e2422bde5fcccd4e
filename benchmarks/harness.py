"""What the benchmark scripts share: the common options, the round-robin timing loop, and a results record that
carries the command and the environment it ran in.

    from harness import add_common, round_robin, write_results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from craft_deploy.bench.measure import measure_latency
from craft_deploy.records import environment


def add_common(ap: argparse.ArgumentParser, *, images: int = 2000, rounds: int = 7) -> None:
    """--images, --batch-sizes, --threads, --rounds, --out: the options every timing script takes."""
    ap.add_argument("--images", type=int, default=images, help="Test images for top-1 (a seeded permutation's first).")
    ap.add_argument("--batch-sizes", default="1,16", help="Comma-separated batch sizes to time.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds, help="Round-robin passes; each p50 is the median pass's.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def batch_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.batch_sizes.split(",")]


def round_robin(runners: dict[Any, tuple[Any, np.ndarray]], rounds: int) -> dict[Any, list[float]]:
    """p50 ms per pass of every (key -> backend, batch), all keys timed once per pass, `rounds` passes: drift of the
    machine lands on every key alike."""
    passes: dict[Any, list[float]] = {k: [] for k in runners}
    for _ in tqdm(range(rounds), desc="round-robin passes", unit="pass"):
        for key, (backend, batch) in runners.items():
            passes[key].append(measure_latency(backend, batch, warmup=5, iters=30, min_seconds=0.3)["p50_ms"])
    return passes


def write_results(out: Path, stem: str, table: str, **record: Any) -> None:
    """`<stem>.json` (the command, the environment, `record`) and `<stem>.md` (the table) in `out`; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    extra = record.pop("environment_extra", {})
    full = {"command": " ".join(sys.argv), "environment": {**environment(), **extra}, **record, "table": table}
    (out / f"{stem}.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
