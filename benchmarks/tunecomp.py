"""TuneComp against the sequential baseline, one tool against itself, and ONNX Runtime CPU latency of the results
(FP32 and W7A8 `--placement ort-cpu`) against the dense FP32 model, timed side by side.

For each seed, rank ratio R, factor pruning ratio P (and pruning schedule):
- TuneComp: `finetune --method tunecomp --rank-ratio R --prune-ratio P` for `--epochs` epochs, from the timm pretrained
  model (`--start pretrained`, the default CNN) or from the dense model's own weights (`--start dense`: a model with no
  pretrained weights at hand, such as the ViT we train from scratch; both arms then start from the same trained model),
  or from a checkpoint of a source task (`--start FILE`: a model pretrained by us on other classes, see
  benchmarks/transfer_split.py; the dense fine-tunes given by `--dense` must start from the same file).
- sequential: the dense fine-tune of the seed (`--dense`, `{seed}` filled in; the default model's is made when
  missing) -> `compress --rank-ratio R` (activation-aware SVD) -> `compress --sparsity P --include '*.a' '*.b'`
  (magnitude, the factors only) -> `finetune --init` for `--recovery-epochs` epochs, distilling from the dense model.
Every model is evaluated on the full test split (10000 images, the same for every cell), so cells of one seed are
paired. Each finished cell is kept under `--work` and reused when the script runs again (a killed run loses one cell).

With `--speed`: the dense model and the first seed's TuneComp models at P = 0 (or `--speed-tags`), each as FP32 and
as W7A8 `--placement ort-cpu` + BatchNorm re-estimation, exported to ONNX and benched on ONNX Runtime CPU at batch 1
and 16 in one `bench --rounds` run (round-robin: every model once per pass), with their ORT top-1 on the full test.
`--bound-ranks R ...` adds the dense model factorised one-shot at rank ratio R (activation-aware SVD + BatchNorm
re-estimation, no training): at a tiny R (0.02) the factorised layers cost almost nothing, so its speed-up is the most
that factorising those layers can buy on this backend, whatever the accuracy.

Writes `<out>/tunecomp-<name>.{json,md,png}`: every cell, mean +- std over seeds with the paired TuneComp - sequential
difference (95% t-interval), the latency table, and accuracy against pruning ratio per rank (the paper's Figure 3).

    python benchmarks/tunecomp.py --name grid --seeds 0 1 2 --rank-ratios 0.25 0.5 \\
        --prune-ratios 0 0.2 0.4 0.6 0.8 0.9 0.95 --dense 'runs/r14/adam-s{seed}' --speed
    python benchmarks/tunecomp.py --name vit --start dense --dense runs/vit-adam --lr 2e-4 --epochs 2 --speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from craft_deploy import CraftError
from craft_deploy.compress import from_flags
from craft_deploy.compress import run as compress
from craft_deploy.config import BenchConfig, ExportConfig, FinetuneConfig
from craft_deploy.study.report import mean_std, paired


def _test_top1(path: Path) -> float:
    """A bundle on the full test split (the dense fine-tune's own record may be on a subset)."""
    from craft_deploy.data import splits_for_manifest
    from craft_deploy.evaluate import evaluate
    from craft_deploy.models import load_bundle

    bundle = load_bundle(path)
    return evaluate(bundle.model.eval(), splits_for_manifest(bundle.manifest).test)["top1"]


def _record_top1(path: Path) -> float:
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


def fill_costs(record: dict[str, Any]) -> None:
    """Multiply-adds per image (Conv/Linear layers, `craft_deploy.analyze.model_cost`) of each row's TuneComp model and
    of its dense model, dense and over nonzero weights, where a row has none yet."""
    from craft_deploy.analyze.structure import model_cost
    from craft_deploy.models import load_bundle

    args, cache = record["args"], {}

    def cost(path: Path) -> dict[str, int]:
        if path not in cache:
            bundle = load_bundle(path)
            cache[path] = model_cost(bundle.model.eval(), tuple(bundle.manifest["input_size"]))
        return cache[path]

    for row in record["rows"]:
        if "macs" not in row:
            tc = cost(Path(args["work"]) / f"tunecomp-{row['tag']}")
            dense = cost(Path(args["dense"].format(seed=row["seed"])))
            row.update(macs=tc["multiply_adds"], macs_nonzero=tc["nonzero_multiply_adds"],
                       macs_dense=dense["multiply_adds"])  # fmt: skip


def _done(path: Path) -> bool:
    return (path / "manifest.json").is_file() and any((path / n).is_file() for n in ("finetune.json", "compress.json"))


def _finetune(cfg: FinetuneConfig, out: Path) -> float:
    """Seconds spent (0 when the cell was already there)."""
    from craft_deploy.finetune import run

    if _done(out):
        return 0.0
    t0 = time.perf_counter()
    run(cfg, out, overwrite=True)
    return time.perf_counter() - t0


def _compress(cfg, source: Path, out: Path) -> None:
    if not _done(out):
        compress(cfg, source, out, overwrite=True)


def _dense_config(dense: Path) -> dict[str, Any]:
    return json.loads((dense / "finetune.json").read_text())["config"]


def tag_of(r: float, p: float, seed: int, schedule: str, epochs: int, kd: bool = False, multiple: int = 1) -> str:
    extra = ("" if schedule == "cubic" else f"-{schedule}") + ("" if epochs == 2 else f"-e{epochs}")
    return f"r{r:g}-p{p:g}-s{seed}{extra}" + ("-kd" if kd else "") + ("" if multiple == 1 else f"-m{multiple}")


def run_cell(args, seed: int, dense: Path, r: float, p: float, schedule: str, dense_top1: float, dense_params: int
             ) -> dict[str, Any]:  # fmt: skip
    """One (seed, R, P, schedule) point: TuneComp and (for the cubic schedule's tag) the sequential baseline."""
    work = Path(args.work)
    dcfg = _dense_config(dense)
    common: dict[str, Any] = dict(
        model=dcfg["model"], img_size=dcfg["img_size"], data=dcfg["data"], train_subset=args.train_subset,
        threads=args.threads, seed=seed, **({"lr": args.lr} if args.lr else {}),
    )  # fmt: skip
    start: dict[str, Any] = {}
    if args.start == "dense":
        start = dict(pretrained=False, checkpoint=str(dense / "model.safetensors"))
    elif args.start != "pretrained":
        start = dict(pretrained=False, checkpoint=args.start)
    elif not dcfg["pretrained"]:
        raise CraftError(f"{dense} was trained from scratch: give --start dense (there are no pretrained weights)")
    if args.kd:
        start["teacher"] = str(dense)
    tag = tag_of(r, p, seed, schedule, args.epochs, args.kd, args.rank_multiple)
    tc = work / f"tunecomp-{tag}"
    tc_seconds = _finetune(
        FinetuneConfig(epochs=args.epochs, method="tunecomp", rank_ratio=r, rank_multiple=args.rank_multiple,
                       prune_ratio=p, prune_schedule=schedule, **start, **common),
        tc,
    )  # fmt: skip
    total, nonzero = _params(tc)
    row = {
        "seed": seed, "rank_ratio": r, "rank_multiple": args.rank_multiple, "prune_ratio": p, "schedule": schedule,
        "epochs": args.epochs, "kd": args.kd,
        "tag": tag,
        "dense": dense_top1, "tunecomp": _record_top1(tc), "params": total, "params_nonzero": nonzero,
        "params_dense": dense_params, "tunecomp_seconds": tc_seconds,
    }  # fmt: skip
    # the baseline does not depend on TuneComp's schedule, epochs or KD
    seq_tag = tag_of(r, p, seed, "cubic", 2, multiple=args.rank_multiple) + ("-bn" if args.seq_bn else "")
    lowrank = work / f"seq-lowrank-{seq_tag}"
    bn = dict(bn_recalibrate=args.seq_bn)
    _compress(from_flags(rank_ratio=r, rank_multiple=args.rank_multiple, calib_samples=256, **bn), dense, lowrank)
    source = lowrank
    if p > 0:
        source = work / f"seq-pruned-{seq_tag}"
        _compress(from_flags(sparsity=str(p), include=("*.a", "*.b"), calib_samples=256, **bn), lowrank, source)
    rec_tag = "" if args.recovery_epochs == 1 else f"-rec{args.recovery_epochs}"
    seq = work / f"seq-recovered-{seq_tag}{rec_tag}"
    seconds = _finetune(
        FinetuneConfig(init=str(source), teacher=str(dense), epochs=args.recovery_epochs, **common), seq
    )
    row.update(sequential_one_shot=_record_top1(source), sequential=_record_top1(seq), sequential_seconds=seconds,
               recovery_epochs=args.recovery_epochs, seq_bn=args.seq_bn)  # fmt: skip
    return row


def speed(args, dense: Path, others: dict[str, Path]) -> dict[str, Any]:
    """FP32 and W7A8 ort-cpu (+BN) of the dense model and `others` (label -> bundle), exported and benched round-robin
    in one run."""
    from craft_deploy import bench
    from craft_deploy.export import run as export

    work = Path(args.work)
    models = {"dense": dense, **others}
    quant = from_flags(quant="w7a8", placement="ort-cpu", bn_recalibrate=True, calib_samples=256)
    exports, failed = {}, {}
    for name, bundle in models.items():
        for precision in ("fp32", "w7a8"):
            source = bundle
            label = f"{name} {precision}"
            if precision == "w7a8":
                source = work / f"q-{bundle.name}-w7a8"
                _compress(quant, bundle, source)
            dst = work / f"onnx-{source.name}"
            try:
                if not (dst / "model.onnx").is_file():
                    export(ExportConfig(target="ort-cpu", verify_samples=32), source, dst, overwrite=True)
            except CraftError as e:  # a model whose export fails its verification is reported, not timed
                failed[label] = str(e)
                continue
            exports[label] = dst
    conf = BenchConfig(backend="ort-cpu", batch_sizes=(1, 16), rounds=args.rounds, threads=args.threads)
    rec = bench.run(conf, [str(p) for p in exports.values()], work / "bench", overwrite=True)
    by_path = {str(p): label for label, p in exports.items()}
    rows: dict[str, dict[str, Any]] = {}
    for res in rec["results"]:
        row = rows.setdefault(by_path[res["model"]], {"top1_ort": res["top1"], "samples": res["samples"]})
        row[f"b{res['batch']}_ms"] = res["p50_ms"]
        row[f"b{res['batch']}_passes_ms"] = res.get("round_p50_ms")
    return {"rows": rows, "export_failed": failed, "rounds": args.rounds, "threads": args.threads}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (R, P, schedule, epochs): mean +- std over seeds and the paired TuneComp - sequential difference."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["rank_ratio"], r.get("rank_multiple", 1), r["prune_ratio"], r["schedule"], r["epochs"],
               r.get("recovery_epochs", 1), r.get("kd", False), r.get("seq_bn", False))  # fmt: skip
        groups.setdefault(key, []).append(r)
    out = []
    for (rank, multiple, p, schedule, epochs, recovery_epochs, kd, seq_bn), rs in sorted(groups.items()):
        diff = paired([r["tunecomp"] - r["sequential"] for r in rs])
        out.append({
            "rank_ratio": rank, "rank_multiple": multiple, "prune_ratio": p, "schedule": schedule, "epochs": epochs,
            "recovery_epochs": recovery_epochs, "kd": kd, "seq_bn": seq_bn, "seeds": len(rs),
            **{k: mean_std([r[k] for r in rs]) for k in ("dense", "tunecomp", "sequential")},
            "tunecomp_minus_sequential": diff, "params": rs[0]["params"] / rs[0]["params_dense"],
            "params_nonzero": statistics.mean([r["params_nonzero"] / r["params_dense"] for r in rs]),
            "macs": rs[0]["macs"] / rs[0]["macs_dense"] if "macs" in rs[0] else None,
        })  # fmt: skip
    return out


def schedules(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """TuneComp with the cubic minus the linear pruning schedule, paired by seed: per (R, P) and over all pairs."""
    same = ("seed", "rank_ratio", "prune_ratio", "epochs")
    cubic = {tuple(r[k] for k in same): r["tunecomp"] for r in rows if r["schedule"] == "cubic"}
    diffs: dict[str, list[float]] = {}
    for r in rows:
        key = tuple(r[k] for k in same)
        if r["schedule"] == "linear" and key in cubic:
            diffs.setdefault(f"rank {r['rank_ratio']:g}, pruning {r['prune_ratio']:g}", []).append(
                cubic[key] - r["tunecomp"]
            )
    if diffs:
        diffs["all pairs"] = [d for ds in diffs.values() for d in ds]
    return {name: paired(ds) for name, ds in diffs.items()}


def _ms(v: tuple[float, float], n: int) -> str:
    return f"{v[0]:.2f}" + (f" ± {v[1]:.2f}" if n > 1 else "")


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "| rank ratio (multiple) | factor pruning | TuneComp schedule | epochs (TuneComp / recovery) | seeds | dense | "
        f"TuneComp | sequential{' (BN re-estimated before recovery)' if record['args'].get('seq_bn') else ''} | "
        "TuneComp - sequential [95% CI] | params (nonzero) / dense | multiply-adds / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in record["summary"]:
        d, n = s["tunecomp_minus_sequential"], s["seeds"]
        ci = f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] {d['verdict']}" if d["ci"] else ""
        lines.append(
            f"| {s['rank_ratio']:g}{'' if s['rank_multiple'] == 1 else ' (x' + str(s['rank_multiple']) + ')'} | "
            f"{s['prune_ratio']:g} | {s['schedule'] + (' + KD' if s['kd'] else '')} | "
            f"{s['epochs']} / {s['recovery_epochs']} "
            f"| {n} | "
            f"{_ms(s['dense'], n)} | {_ms(s['tunecomp'], n)} | {_ms(s['sequential'], n)} | {d['mean']:+.2f}{ci} | "
            f"{s['params']:.2f} ({s['params_nonzero']:.2f}) | {s['macs']:.2f} |"
        )
    cl = schedules(record["rows"])
    if cl:
        lines += ["", "TuneComp, cubic minus linear pruning schedule (paired by seed):", "",
                  "| points | pairs | cubic - linear [95% CI] |", "|---|---|---|"]  # fmt: skip
        for name, d in cl.items():
            ci = f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] {d['verdict']}" if d["ci"] else ""
            lines.append(f"| {name} | {d['n']} | {d['mean']:+.2f}{ci} |")
    lines += ["", "Every cell (sequential: one-shot -> recovered):", "",
              "| tag | dense | TuneComp | sequential |", "|---|---|---|---|"]  # fmt: skip
    for r in record["rows"]:
        lines.append(f"| {r['tag']} | {r['dense']:.2f} | {r['tunecomp']:.2f} | "
                     f"{r['sequential_one_shot']:.2f} -> {r['sequential']:.2f} |")  # fmt: skip
    sp = record.get("speed")
    if sp:
        base = sp["rows"]["dense fp32"]
        lines += [
            "",
            f"ONNX Runtime CPU, {sp['threads']} threads, round-robin over {sp['rounds']} passes (p50 of the median "
            "pass):",
            "",
            "| model | ORT top-1 | batch 1 ms | x vs dense FP32 | batch 16 ms | x vs dense FP32 |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in sp["rows"].items():
            lines.append(
                f"| {name} | {row['top1_ort']:.2f} | {row['b1_ms']:.3f} | {base['b1_ms'] / row['b1_ms']:.2f} | "
                f"{row['b16_ms']:.3f} | {base['b16_ms'] / row['b16_ms']:.2f} |"
            )
        for name, why in sp["export_failed"].items():
            lines.append(f"| {name} | export failed: {why} | | | | |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain = ("cubic", 2, 1, False, 1, record["args"].get("seq_bn", False))
    variant = ("schedule", "epochs", "recovery_epochs", "kd", "rank_multiple", "seq_bn")
    rows = [s for s in record["summary"] if tuple(s[k] for k in variant) == plain] or record["summary"]
    for i, rank in enumerate(sorted({s["rank_ratio"] for s in rows})):
        pts = sorted((s for s in rows if s["rank_ratio"] == rank), key=lambda s: s["prune_ratio"])
        x = [100 * s["prune_ratio"] for s in pts]
        for key, style in (("tunecomp", "-"), ("sequential", "--")):
            ax.errorbar(x, [s[key][0] for s in pts], yerr=[s[key][1] for s in pts], fmt=style, marker="o",
                        color=f"C{i}", capsize=3, label=f"{key} rank {rank:g}")  # fmt: skip
    dense = [s["dense"][0] for s in rows]
    if dense:
        ax.axhline(statistics.mean(dense), color="grey", lw=1, ls=":", label="dense fine-tune")
        floor = statistics.mean(dense) - 20  # a collapsed model (chance) would flatten every other difference
        off = sorted(
            {f"{100 * s['prune_ratio']:g}%" for s in rows for k in ("tunecomp", "sequential") if s[k][0] < floor}
        )
        if off:
            ax.set_ylim(bottom=floor)
            ax.set_title(f"below {floor:.0f}% (not shown): at {', '.join(off)}", fontsize=8, loc="right", y=0.0)
    ax.set_xlabel("pruning ratio of the factors (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"TuneComp vs fine-tune -> SVD -> prune -> recover ({record['model']})", loc="center")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="grid", help="results: <out>/tunecomp-<name>.{json,md,png}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rank-ratios", nargs="+", type=float, default=[0.25])
    ap.add_argument("--prune-ratios", nargs="+", type=float, default=[0.0, 0.6])
    ap.add_argument("--schedules", nargs="+", default=["cubic"], choices=["cubic", "linear"])
    ap.add_argument("--epochs", type=int, default=2, help="TuneComp's epochs")
    ap.add_argument("--recovery-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--lr", type=float, help="learning rate of TuneComp and recovery (default: finetune's)")
    ap.add_argument(
        "--start", default="pretrained",
        help="pretrained (timm's weights), dense (the --dense model's own), or FILE (a source-task state dict)",
    )  # fmt: skip
    ap.add_argument("--rank-multiple", type=int, default=1, help="round ranks up to a multiple of this")
    ap.add_argument("--seq-bn", action="store_true", help="the baseline re-estimates BatchNorm before its recovery")
    ap.add_argument(
        "--kd", action="store_true", help="TuneComp distils from the dense fine-tune too (as recovery does)"
    )
    ap.add_argument("--dense", default="runs/seeds/adam-s{seed}", help="the dense fine-tune of each seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="also time FP32 and W7A8 exports round-robin")
    ap.add_argument("--speed-tags", nargs="*", help="TuneComp cells to time (default: the first seed's at P = 0)")
    ap.add_argument(
        "--bound-ranks", nargs="*", type=float, default=[],
        help="with --speed: also time the dense model factorised one-shot at these rank ratios (the speed bound)",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", default="runs/tunecomp")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the .md and .png from <out>/tunecomp-<name>.json"
    )
    args = ap.parse_args()
    if args.start not in ("pretrained", "dense") and not Path(args.start).is_file():
        ap.error(f"--start {args.start}: give pretrained, dense or an existing checkpoint file")
    if args.bound_ranks and not args.speed:
        ap.error("--bound-ranks times models: give --speed as well")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = out / f"tunecomp-{args.name}.json"
    if args.render:
        record = json.loads(result.read_text())
        return write(record, out, args.name)
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"args": vars(args)}
    for seed in args.seeds:
        dense = Path(args.dense.format(seed=seed))
        if not _done(dense):
            if args.start != "pretrained":
                raise CraftError(f"--dense {dense}: no finished bundle there")
            _finetune(FinetuneConfig(epochs=2, seed=seed, train_subset=args.train_subset, threads=args.threads), dense)
        dcfg = _dense_config(dense)
        record["model"] = dcfg["model"]
        if args.start not in ("pretrained", "dense") and dcfg["checkpoint"] != args.start:
            raise CraftError(f"--dense {dense} did not start from --start {args.start}: the arms would not be paired")
        dense_top1, dense_params = _test_top1(dense), _params(dense)[0]  # once per seed, not per cell
        for r in args.rank_ratios:
            for p in args.prune_ratios:
                for schedule in args.schedules:
                    if schedule != "cubic" and p == 0:
                        continue  # nothing to prune: the same run as the cubic one
                    row = run_cell(args, seed, dense, r, p, schedule, dense_top1, dense_params)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    record.update(rows=rows, summary=summary(rows))
                    result.write_text(json.dumps(record, indent=2) + "\n")
    if args.speed:
        first = args.seeds[0]
        tags = args.speed_tags or [r["tag"] for r in rows if r["seed"] == first and r["prune_ratio"] == 0]
        work = Path(args.work)
        dense = Path(args.dense.format(seed=first))
        models = {f"tunecomp {t}": work / f"tunecomp-{t}" for t in tags}
        for r in args.bound_ranks:  # the most factorising can buy: layers at a rank where they cost almost nothing
            bound = models[f"one-shot r{r:g}"] = work / f"oneshot-r{r:g}-s{first}"
            _compress(from_flags(rank_ratio=r, bn_recalibrate=True, calib_samples=256), dense, bound)
        record["speed"] = speed(args, dense, models)
        result.write_text(json.dumps(record, indent=2) + "\n")
    write(record, out, args.name)


def write(record: dict[str, Any], out: Path, name: str) -> None:
    fill_costs(record)
    record["summary"] = summary(record["rows"])
    (out / f"tunecomp-{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"tunecomp-{name}.md").write_text(markdown(record))
    plot(record, out / f"tunecomp-{name}.png")
    print(markdown(record))


if __name__ == "__main__":
    main()
