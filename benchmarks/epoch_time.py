"""Seconds per fine-tuning epoch, side by side in rounds (this VM drifts by 15-30% for minutes): a plain epoch of the
demo's recipe with this checkout and, optionally, with another checkout (`--before PATH`, its code on PYTHONPATH),
and a recovery epoch (`finetune --init`) of a compressed bundle, with distillation from `--teacher`.

    python benchmarks/epoch_time.py --before /tmp/base --init runs/recovery/adam-2of4-W8A8 --teacher runs/demo/adam
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PLAIN = ["finetune", "--data", "fashion-mnist", "--epochs", "1", "--img-size", "64", "--train-subset", "6000",
         "--eval-subset", "1000", "--threads", "2"]  # fmt: skip


def seconds_per_epoch(args: list[str], out: Path, pythonpath: str | None = None) -> float:
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    cmd = [sys.executable, "-m", "craft_deploy.cli.main", *args, "--out", str(out), "--overwrite"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((out / "finetune.json").read_text())["timings"]["seconds_per_epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="another checkout to time the plain epoch with (e.g. the previous main)")
    ap.add_argument("--init", help="a compressed bundle to time a recovery epoch of")
    ap.add_argument("--teacher", help="its dense bundle")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    variants: dict[str, tuple[list[str], str | None]] = {"plain (this checkout)": (PLAIN, None)}
    if args.before:
        variants["plain (--before)"] = (PLAIN, args.before)
    if args.init:
        rec = ["finetune", "--init", args.init, "--epochs", "1", "--train-subset", "6000", "--eval-subset", "1000",
               "--threads", "2"] + (["--teacher", args.teacher] if args.teacher else [])  # fmt: skip
        variants["recovery epoch"] = (rec, None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, (cmd, path)) in enumerate(variants.items()):
                times[name].append(seconds_per_epoch(cmd, Path(tmp) / f"{r}-{i}", path))
                print(f"round {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    for name, ts in times.items():
        print(f"{name:24} median {statistics.median(ts):.1f} s/epoch  {[round(t, 1) for t in ts]}")


if __name__ == "__main__":
    main()
