"""TuneComp against the sequential baseline, one tool against itself, on the default (tf_efficientnet_lite0 ->
Fashion-MNIST, 64 px), and ONNX Runtime CPU latency of the results against the dense FP32 model.

For each seed, rank ratio R and factor pruning ratio P:
- TuneComp: `finetune --method tunecomp --rank-ratio R --prune-ratio P` from the pretrained model, `--epochs` epochs.
- sequential: the dense fine-tune of the same seed (`--dense-dir`/<opt>-s<seed>, made here when missing, same epochs)
  -> `compress --rank-ratio R` (activation-aware SVD) -> `compress --sparsity P --include '*.a' '*.b'` (magnitude, the
  factors only) -> `finetune --init` for `--recovery-epochs` epochs with distillation from the dense model.
Every model is evaluated on the full test split (10000 images: the same images for every cell). Latency: FP32 ONNX
exports on ONNX Runtime CPU (all optimisations, `--threads`), batch 1 and 16, round-robin over the models
(`--rounds` passes, each figure the median of its rounds), as ratios to the dense model measured in the same run.

    python benchmarks/tunecomp.py --seeds 0 --rank-ratios 0.25 --prune-ratios 0 0.6 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import ExportConfig, FinetuneConfig
from craft_deploy.export import run as export
from craft_deploy.finetune import run as finetune


def _dense_top1(path: Path) -> float:
    """The dense bundle on the full test split (its own record may be on a subset)."""
    from craft_deploy.data import splits_for_manifest
    from craft_deploy.evaluate import evaluate
    from craft_deploy.models import load_bundle

    bundle = load_bundle(path)
    return evaluate(bundle.model.eval(), splits_for_manifest(bundle.manifest).test)["top1"]


def _top1(path: Path) -> float:
    for name, key in (("finetune.json", "test_top1"), ("compress.json", "test_top1_after")):
        rec = path / name
        if rec.is_file():
            return json.loads(rec.read_text())["metrics"][key]
    raise FileNotFoundError(path)


def _params(path: Path) -> tuple[int, int]:
    """(all parameters, nonzero parameters) of a bundle's weights."""
    from craft_deploy.models import load_bundle

    sd = load_bundle(path).model.state_dict()
    weights = [v for k, v in sd.items() if k.endswith(("weight", "bias", "original")) and v.is_floating_point()]
    return sum(v.numel() for v in weights), sum(int((v != 0).sum()) for v in weights)


def _latency(onnx_paths: dict[str, Path], shape: list[int], threads: int, rounds: int) -> dict[str, dict[int, float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    cpu = ["CPUExecutionProvider"]
    sessions = {n: ort.InferenceSession(str(p), opts, providers=cpu) for n, p in onnx_paths.items()}
    out: dict[str, dict[int, float]] = {n: {} for n in sessions}
    for batch in (1, 16):
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        runs = {n: [] for n in sessions}
        for s in sessions.values():
            for _ in range(5):
                s.run(None, {"input": x})
        for _ in range(rounds):
            for n, s in sessions.items():
                times = []
                for _ in range(20 if batch == 1 else 5):
                    t0 = time.perf_counter()
                    s.run(None, {"input": x})
                    times.append(time.perf_counter() - t0)
                runs[n].append(statistics.median(times) * 1e3)
        for n in sessions:
            out[n][batch] = statistics.median(runs[n])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rank-ratios", nargs="+", type=float, default=[0.25])
    ap.add_argument("--prune-ratios", nargs="+", type=float, default=[0.0, 0.6])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--recovery-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--dense-dir", default="runs/seeds", help="dense fine-tunes: DIR/adam-s<seed> (made when missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="runs/tunecomp")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(train_subset=args.train_subset, threads=args.threads)
    rows, onnx = [], {}
    for seed in args.seeds:
        dense = Path(args.dense_dir) / f"adam-s{seed}"
        if not (dense / "manifest.json").is_file():
            finetune(FinetuneConfig(epochs=args.epochs, seed=seed, **common), dense, overwrite=True)
        if seed == args.seeds[0]:
            onnx["dense"] = dense
        dense_top1 = _dense_top1(dense)
        for r in args.rank_ratios:
            for p in args.prune_ratios:
                tag = f"r{r:g}-p{p:g}-s{seed}"
                t0 = time.perf_counter()
                tc = work / f"tunecomp-{tag}"
                finetune(
                    FinetuneConfig(epochs=args.epochs, seed=seed, method="tunecomp", rank_ratio=r, prune_ratio=p,
                                   **common),
                    tc,
                    overwrite=True,
                )  # fmt: skip
                tc_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                lr = work / f"seq-lowrank-{tag}"
                compress(from_flags(rank_ratio=r, calib_samples=256), dense, lr, overwrite=True)
                source = lr
                if p > 0:
                    source = work / f"seq-pruned-{tag}"
                    compress(
                        from_flags(sparsity=str(p), include=("*.a", "*.b"), calib_samples=64), lr, source,
                        overwrite=True,
                    )  # fmt: skip
                seq = work / f"seq-recovered-{tag}"
                finetune(
                    FinetuneConfig(init=str(source), teacher=str(dense), epochs=args.recovery_epochs, **common),
                    seq,
                    overwrite=True,
                )
                seq_seconds = time.perf_counter() - t0
                total, nonzero = _params(tc)
                row = {
                    "seed": seed,
                    "rank_ratio": r,
                    "prune_ratio": p,
                    "dense": dense_top1,
                    "tunecomp": _top1(tc),
                    "sequential_one_shot": _top1(source),
                    "sequential": _top1(seq),
                    "params": total,
                    "params_nonzero": nonzero,
                    "params_dense": _params(dense)[0],
                    "tunecomp_seconds": tc_seconds,
                    "sequential_seconds_after_dense": seq_seconds,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "tunecomp.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
                if seed == args.seeds[0]:
                    onnx[f"tunecomp {tag}"] = tc
    exported = {}
    for name, bundle in onnx.items():
        dst = work / f"onnx-{name.replace(' ', '-')}"
        export(ExportConfig(verify_samples=32), bundle, dst, overwrite=True)
        exported[name] = dst / "model.onnx"
    shape = json.loads((onnx["dense"] / "manifest.json").read_text())["input_size"]
    latency = _latency(exported, shape, args.threads, args.rounds)
    record = {"args": vars(args), "rows": rows, "latency_ms": latency}
    (out / "tunecomp.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "| seed | rank ratio | factor pruning | dense | TuneComp | sequential (one-shot -> recovered) | params "
        "(nonzero) / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['rank_ratio']:g} | {r['prune_ratio']:g} | {r['dense']:.2f} | {r['tunecomp']:.2f} | "
            f"{r['sequential_one_shot']:.2f} -> {r['sequential']:.2f} | {r['params'] / r['params_dense']:.2f} "
            f"({r['params_nonzero'] / r['params_dense']:.2f}) |"
        )
    lines += ["", "| model | batch 1 ms | x vs dense | batch 16 ms | x vs dense |", "|---|---|---|---|---|"]
    base = latency["dense"]
    for name, lat in latency.items():
        lines.append(f"| {name} | {lat[1]:.2f} | {base[1] / lat[1]:.2f} | {lat[16]:.2f} | {base[16] / lat[16]:.2f} |")
    (out / "tunecomp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
